"""Connecting to Ray: the cluster named by RAY_ADDRESS, else a local Ray sized to this machine."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from bertjob.config import SetupError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10  # to open a TCP connection to RAY_ADDRESS's GCS port


def init_ray(dashboard: bool = True) -> None:
    """Connect once per process; `ray job submit` sets RAY_ADDRESS for us.

    `dashboard` only matters for a local Ray: its dashboard starts about ten Python processes,
    ~2 s of CPU that a short prepare or infer run on a laptop feels. Training keeps it.
    """
    import ray

    if ray.is_initialized():
        return
    own_sigterm = signal.getsignal(signal.SIGTERM)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ValueError, ConnectionError) as err:  # Ray's words: a dashboard's http:// address, no port...
            raise SetupError(
                f"RAY_ADDRESS={address!r}: {' '.join(str(err).split()).rstrip('.')}; or unset RAY_ADDRESS to run "
                "on a local Ray"
            ) from err
        log.info("connected to Ray cluster at %s", address)
    else:
        # "local" always starts a fresh single-node Ray, even if another is running on this host.
        # Ray kills idle workers beyond one per CPU after a second; the zero-CPU read and write tasks
        # that run beside one actor per CPU would then start a fresh Python (~1.5 s of CPU) each time.
        # `None` rather than True: with a minimal Ray (no ray[default]) Ray then starts its API server
        # without the web UI instead of refusing to start.
        # The dashboard also serves the state API that Ray Train's placement-group cleaner polls. Its
        # actor finds it as a driver would: RAY_ADDRESS, else /tmp/ray/ray_current_cluster, which a
        # cluster that was killed leaves behind (each poll then waited out a 10 s timeout, and the run
        # ended late with an RpcError from Ray). The workers are told this Ray's.
        # Ray runs its workers at niceness 15, below its own processes and the driver, so that those
        # stay responsive; in this job the workers are the work. At 15 anything else on the machine
        # at the default priority takes their cores: scoring 5,000 reviews took 136-167 s instead of
        # 59-72 s beside other work on 2 cores.
        cpus = os.cpu_count() or 1
        system = {"num_workers_soft_limit": cpus + 4, "worker_niceness": 0}
        api = {}
        if dashboard:
            port = free_port()
            api = {"dashboard_port": port,
                   "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}  # fmt: skip
        try:
            ray.init(address="local", log_to_driver=True, include_dashboard=None if dashboard else False,
                     _system_config=system, **api)  # fmt: skip
        except Exception as err:  # Ray raises a plain Exception, and its traceback was the job's last word
            if "timed out during startup" not in str(err):
                raise
            raise SetupError(
                f"the local Ray did not start within the 30 s Ray gives its processes (load average "
                f"{os.getloadavg()[0]:.1f} on {cpus} CPUs): run the command again when the machine is less busy, "
                f"or start a Ray once (`ray start --head`) and run with RAY_ADDRESS=auto"
            ) from err
        log.info("started a local Ray with %s CPUs", int(ray.cluster_resources().get("CPU", 0)))
    # ray.init handles SIGTERM itself: in Python by exiting, then in C, installed after that, by
    # abseil's failure handler, which prints a stack dump and kills the process. The process's own
    # handling comes back (the CLI's ends the run as Ctrl-C does).
    if own_sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, own_sigterm)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    # Smaller blocks than Ray's 128 MiB: a single streamed archive (the IMDb tar) then hands its
    # first rows to the tokenize/score actors after ~6k reviews instead of half the corpus.
    ctx.target_max_block_size = 8 * 2**20


def leave_ray() -> None:
    """ray.shutdown(), a second sooner where this process started its Ray. Ray stops a local Ray's
    GCS before its autoscaler monitor, whose SIGTERM handler then reports to the stopped GCS until
    Ray kills it a second later: 1.0 of the 1.4 s that leaving took, at the end of every command.
    On one node the monitor has nothing to keep, so it is killed first. Connected to a running
    cluster, this process started none of its processes and stops none."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # Ray's own handle on the Ray it started
    for info in node.all_processes.get("monitor", []) if node is not None and node.head else []:
        info.process.kill()
        info.process.wait()
    ray.shutdown()


def free_port() -> int:
    """A port no process listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_reachable(address: str) -> None:
    """Refuse a RAY_ADDRESS host:port where nothing answers (a typo, a stopped cluster, a stale
    export): ray.init would retry it for minutes, printing only its own connection warnings."""
    # A Ray Client address (ray://HEAD:10001) too: Ray retried it for 30 s, then raised a traceback.
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if "://" in host or not host or not port.isdigit():
        return  # "auto", http://, ...: Ray's to judge
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise SetupError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({err}); check the address (`ray status` on "
            f"the head prints it) and that the cluster is up, or unset RAY_ADDRESS to run on a local Ray"
        ) from err


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def alive_nodes() -> list[dict[str, float]]:
    """The resources (CPU, GPU, memory, custom) of each node that is alive now."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def placement_problem(workers: int, cpus: float, gpus: float = 0) -> str | None:
    """Why `workers` actors of `cpus` CPUs and `gpus` GPUs each do not fit the nodes alive now, or
    None when they do. Ray would wait for such capacity forever: only an autoscaler can add it."""
    nodes = alive_nodes()

    def fits(node: dict[str, float]) -> float:  # how many of the actors this node can host
        return min(
            node.get("CPU", 0) // cpus if cpus else math.inf, node.get("GPU", 0) // gpus if gpus else math.inf
        )

    if sum(fits(n) for n in nodes) >= workers:
        return None
    each = " and ".join(f"{n:g} {kind}" for n, kind in ((cpus, "CPUs"), (gpus, "GPU")) if n)
    have = ", ".join(f"{n.get('CPU', 0):g} CPUs/{n.get('GPU', 0):g} GPUs" for n in nodes)
    return f"{workers} worker(s) of {each} each do not fit the cluster's alive nodes ({have})"


def resource_problem(workers: int, cpus: float, gpus: float = 0) -> str | None:
    """`placement_problem`, or a GPU asked of a cluster without one, with what to change."""
    if gpus and cluster_gpus() == 0:
        return "use_gpu is set but the Ray cluster has no GPU (set --use-gpu false, or add GPU nodes)"
    problem = placement_problem(workers, cpus, gpus)
    return problem and (
        f"{problem} (lower --num-workers or --cpus-per-worker; on an autoscaling cluster set "
        f"--check-resources false)"
    )


def node_cpus() -> int:
    """CPUs of the smallest node that has any: what an actor that must fit on every node may take."""
    return int(min((c for n in alive_nodes() if (c := n.get("CPU", 0)) >= 1), default=1))


# Ray Data hands the batch of an actor that was killed to its restarted actor, by default for ever
# (max_task_retries=-1): a batch that cannot fit in memory was killed and retried without end. A few
# retries still carry a batch over a lost node or a one-off kill; each takes one. An actor killed
# while it starts is restarted as often (`_counting_starts`).
BATCH_RETRIES = 3
# Ray Data retries its plain tasks (reads, writes, a GPU run's tokenizing) as often by default
# (max_retries=-1): one whose process was killed on every try kept the job waiting without a word.
# They get the batches' bound: `ray_remote_args={"max_retries": BATCH_RETRIES}`.
# A process of the job whose end Ray saw no cause of
KILLED_FROM_OUTSIDE = ("died without an error of its own: killed from outside Ray, most often by the kernel's OOM "
                       "killer (`dmesg` on its node says so), or its node was lost")  # fmt: skip


class KilledStartingError(RuntimeError):
    """A pool actor's start after BATCH_RETRIES restarts whose starts were each killed."""


def actor_pool_map(ds: Any, fn: Any, least: int, most: int | None, cpus: float = 1, gpus: float = 0,
                   **kwargs: Any) -> Any:  # fmt: skip
    """`ds.map_batches(fn, **kwargs)` on a Ray Data actor pool that follows the cluster: it starts
    with as many actors of `cpus` CPUs and `gpus` GPUs as the cluster holds now (at least `least`,
    at most `most`), and Ray Data grows it onto CPUs and GPUs that join later, up to `most` (None:
    no limit), or shrinks it when actors idle or their node dies. A batch whose actor is killed is
    retried BATCH_RETRIES times, and an actor killed while it starts restarted as often, then the
    run fails (`killed` says why, `killed_starting` whether while starting)."""
    from ray.data import ActorPoolStrategy

    fits = cluster_gpus() // gpus if gpus else cluster_cpus() // cpus if cpus else least
    start = int(max(least, min(fits, most or fits)))
    # An error of fn's own (a disk that filled under prepare's writers) reaches the driver as itself,
    # RayTaskError(OSError), which the CLI says in one line, not as a UserCodeException holding it only
    # as text: prepare on a full disk ended in a traceback.
    ds.context.raise_original_map_exception = True
    with retries_allowed():
        return ds.map_batches(
            _counting_starts(fn), compute=ActorPoolStrategy(min_size=least, max_size=most, initial_size=start),
            num_cpus=cpus, num_gpus=gpus, max_task_retries=BATCH_RETRIES, **kwargs,
        )  # fmt: skip


@contextlib.contextmanager
def retries_allowed() -> Iterator[None]:
    """Ray Data 2.60 takes max_retries and max_task_retries only among the (**)ray_remote_args of
    its reads and maps, which it warns are deprecated (to go in Ray 2.64) while it names no other
    way to pass them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def _counting_starts(cls: type) -> type:
    """`cls` whose actors end the run when killed while starting on each of BATCH_RETRIES + 1 tries:
    a start that finds more restarts of its actor (Ray's count) than when it last finished starting
    (kept in Ray's key-value store under the actor's id) raises KilledStartingError, which Ray Data
    ends the run for (a pool whose actor's __init__ raised). Ray restarts a killed actor for ever
    (Ray Data's max_restarts=-1), as nodes lost now and then need: one killed on every start
    (loading a model too big for its node) kept the job waiting without a word."""

    class Counted(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            import ray
            from ray.experimental import internal_kv as kv  # Ray's own libraries keep state there

            actor, restarts = ray.get_runtime_context().get_actor_id(), 0
            try:  # Ray's private API, as memory_kill_detail's; without it, no bound
                from ray._private.state import state

                restarts = state.actor_table(actor)["NumRestarts"]
            except (ImportError, AttributeError, KeyError, TypeError) as err:
                log.debug("no restart count from Ray: %s", err)
            key = f"bertjob-started-at-{actor}"
            if restarts - int(kv._internal_kv_get(key) or 0) > BATCH_RETRIES:
                raise KilledStartingError(f"killed while starting on each of its {BATCH_RETRIES + 1} tries")
            super().__init__(*args, **kwargs)
            kv._internal_kv_put(key, str(restarts))

    Counted.__name__ = Counted.__qualname__ = cls.__name__  # Ray names the pool and its processes after it
    return Counted


def killed(err: BaseException, since: float) -> str | None:
    """Why a batch of an `actor_pool_map` ran out of retries, an actor of it out of starts, or a
    plain task (a read, a write: `killed_task`) out of retries, where its process was killed (`err`:
    what the run raised; `since`: when the run started, in seconds): by Ray's memory monitor, or by
    a signal from outside Ray. None when `err` is no such failure (an actor whose __init__ raised
    an error of its own)."""
    import ray

    if not isinstance(
        err,
        (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError, ray.exceptions.WorkerCrashedError),
    ):
        return None
    if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed and not killed_starting(err):
        return None
    detail = str(err) if isinstance(err, ray.exceptions.OutOfMemoryError) else memory_kill_detail(since)
    if detail is not None:
        return f"Ray's memory monitor killed it: its node ran low on memory{memory_note(detail)}"
    return f"it {KILLED_FROM_OUTSIDE}"


def killed_task(err: BaseException) -> bool:
    """Whether `err` is a plain task of Ray Data's (a read, a write) out of retries, each killed."""
    import ray

    return isinstance(err, ray.exceptions.WorkerCrashedError)


def killed_starting(err: BaseException) -> bool:
    """Whether `err` is an `actor_pool_map` actor out of starts (each killed, in its __init__)."""
    return KilledStartingError.__name__ in str(err)


def memory_note(detail: str) -> str:
    """' (7.99GB used / 23.54GB limit; Ray kills above 33.3% of it, RAY_memory_usage_threshold)'
    from the words of Ray's memory monitor, or as much of it as they tell."""
    used = re.search(r"was ([\d.]+GB used / [\d.]+GB limit)", detail)
    threshold = re.search(r"threshold of \d+B \(([\d.]+%) of", detail)
    if not used:
        return ""
    above = f"; Ray kills above {threshold.group(1)} of it, RAY_memory_usage_threshold" if threshold else ""
    return f" ({used.group(1)}{above})"


def memory_kill_detail(since: float) -> str | None:
    """What Ray's memory monitor said when it last killed a worker of this job after `since`, or None.
    An actor it killed is restarted, and the task that runs out of retries then raises only that
    the actor "was restarted": the worker's exit is in the GCS' worker table."""
    import ray

    try:  # Ray's private API: where it has changed, the cause is not known here
        from ray._private.state import state
        from ray.core.generated import common_pb2, gcs_pb2

        table = state._connect_and_get_accessor().get_worker_table()
        oom = common_pb2.WorkerExitType.NODE_OUT_OF_MEMORY
    except (ImportError, AttributeError, TypeError) as err:
        log.debug("no worker table from Ray: %s", err)
        return None
    job = ray.get_runtime_context().get_job_id()
    found = []
    for raw in table:
        w = gcs_pb2.WorkerTableData.FromString(raw)
        if w.exit_type == oom and w.job_id.hex() == job and w.end_time_ms >= since * 1000:
            found.append((w.end_time_ms, w.exit_detail))
    return max(found)[1] if found else None
