"""Connecting to Ray (bertjob/cluster.py)."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import run_in_session
from tests.multinode import free_port


@pytest.mark.parametrize(
    "address, says",
    [
        ("127.0.0.1:{port}", "no Ray cluster answers there ("),
        # A Ray Client address: Ray retried it for 30 s, then raised a traceback.
        ("ray://127.0.0.1:{port}", "no Ray cluster answers there ("),
        # What `ray job submit` takes (the dashboard's), and a host without a port: Ray's ValueError,
        # raised as a traceback.
        ("http://127.0.0.1:{port}", "It looks like you set RAY_ADDRESS to an HTTP address"),
        ("localhost", "Invalid address format: localhost"),
    ],
)
def test_a_ray_address_where_no_cluster_answers_is_one_error_at_once(
    tmp_path, tiny_classifier_dir, address, says
):
    """A RAY_ADDRESS with a typo, or left exported after its cluster stopped: ray.init retried it for
    minutes, printing only its own connection warnings. Now the command ends at once, saying so."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "great fun"}) + "\n")
    address = address.format(port=free_port())
    cmd = [sys.executable, "-m", "bertjob", "infer", "--input", str(tmp_path / "c.jsonl"), "--model", tiny_classifier_dir,
           "--output", str(tmp_path / "scored")]  # fmt: skip
    proc = run_in_session(cmd, env={**os.environ, "RAY_ADDRESS": address}, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bertjob: error: RAY_ADDRESS=") and address in last and says in last, last
    assert last.endswith("or unset RAY_ADDRESS to run on a local Ray")


def test_a_local_ray_too_slow_to_start_is_one_line_saying_what_to_do(tmp_path, tiny_model_dir):
    """On a heavily loaded machine a local Ray's raylet may not register within the 30 s Ray waits
    for it (fixed in Ray's node.py): the job ended in Ray's traceback ("The current node timed out
    during startup"). A raylet stopped as it starts stands in for one too slow to (~35 s)."""
    from tests.conftest import kill_session, session_processes

    (tmp_path / "a.jsonl").write_text('{"text": "great", "label": 1}\n')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "bertjob", "prepare", "--input", str(tmp_path / "a.jsonl"),
                             "--output", str(tmp_path / "out"), "--model", tiny_model_dir], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        stopped = False
        while not stopped and proc.poll() is None:
            for p in session_processes(proc.pid, "raylet/raylet"):
                p.suspend()
                stopped = True
            time.sleep(0.01)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    assert stopped and proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"bertjob: error: the local Ray did not start within the 30 s Ray gives its processes \(load average "
        r"[\d.]+ on \d+ CPUs\): run the command again when the machine is less busy, or start a Ray once "
        r"\(`ray start --head`\) and run with RAY_ADDRESS=auto",
        last,
    ), last


def test_a_local_rays_workers_reach_its_state_api_whatever_cluster_was_there_before():
    """Ray Train's placement-group cleaner asks the state API from a worker, which finds it as a driver
    would: RAY_ADDRESS, else the ray_current_cluster file that a killed cluster leaves in Ray's temp
    directory. Naming a dead cluster, every train run ended late, with an RpcError from Ray.
    Its workers run at the driver's priority, not Ray's niceness 15, below everything else on the
    machine (scoring took twice as long beside other work)."""
    script = """
import os
import ray
from ray.util.state import list_nodes
from bertjob.cluster import init_ray

init_ray()
print(len(ray.get(ray.remote(lambda: list_nodes(timeout=10)).remote())), "node")
print("niceness", ray.get(ray.remote(lambda: os.nice(0)).remote()) - os.nice(0))
"""
    with tempfile.TemporaryDirectory(dir="/tmp") as temp:  # short: Ray's sockets are made under it
        (Path(temp) / "ray").mkdir()
        (Path(temp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
        proc = run_in_session(
            [sys.executable, "-c", script], env={**os.environ, "RAY_TMPDIR": temp}, timeout=120
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["1 node", "niceness 0"]


@pytest.mark.parametrize("grows_in", ["__call__", "__init__"])
def test_a_batch_or_an_actor_that_rays_memory_monitor_kills_on_every_try_fails_naming_the_nodes_memory(
    grows_in,
):
    """Ray's memory monitor kills an actor of a pool whose batch (`__call__`) or model loading
    (`__init__`) takes more memory than its node has left, Ray restarts it, and Ray Data handed it
    the same batch again, or restarted it, for ever (its defaults max_task_retries=-1 and
    max_restarts=-1). Now the run fails after BATCH_RETRIES retries, and `killed` says the memory
    monitor did it and what the node had: the actor raised only that it "was restarted";
    `killed_starting` says whether in __init__. The threshold is set 2 GiB above what the node uses
    as Ray starts, whatever its size; the actor takes memory in steps until it is killed, up to a
    cap the node keeps a GiB free of. Other processes that take 2 GiB more meanwhile make the
    monitor kill the run's other tasks instead."""
    script = """
import os, sys, time
import numpy as np
import ray
from ray._private.utils import get_system_memory, get_used_memory
from bertjob.cluster import actor_pool_map, killed, killed_starting

total, used = get_system_memory(), get_used_memory()
threshold = (used + 2 * 2**30) / total
cap = min(3 * 2**30, total - used - 2**30)  # past the threshold, short of the node's end
os.environ["RAY_memory_usage_threshold"] = f"{threshold:.4f}"
os.environ["RAY_memory_monitor_refresh_ms"] = "50"


def grow():
    print("grow: a try in", os.getpid(), flush=True)  # the pid: Ray logs no line twice
    held = []
    while len(held) * 2**27 < cap:
        held.append(np.ones(2**27 // 8))  # 128 MiB, written
        time.sleep(0.02)
    raise RuntimeError("not killed")


class Grow:
    def __init__(self):
        if "GROWS_IN" == "__init__":
            grow()

    def __call__(self, batch):
        grow()


ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own, with the threshold
started = time.time()
try:
    actor_pool_map(ray.data.range(8, override_num_blocks=1), Grow, 1, 1, batch_size=8).materialize()
except Exception as err:
    print(f"killed above {100 * threshold:.1f}%, loading {killed_starting(err)}:", killed(err, started))
    print("it raised", repr(err)[:3000])
""".replace("GROWS_IN", grows_in)
    from bertjob.cluster import BATCH_RETRIES

    proc = run_in_session([sys.executable, "-c", script], timeout=120)
    said = [line for line in proc.stdout.splitlines() if line.startswith("killed above ")]
    assert said, proc.stdout[-2000:] + proc.stderr[-3000:]
    above, why = said[0].removeprefix("killed above ").split(": ", 1)
    assert above.endswith(f"%, loading {grows_in == '__init__'}"), proc.stdout[-5000:]
    assert why.startswith("Ray's memory monitor killed it: its node ran low on memory ("), said
    # Ray rounds the threshold it was given in its own way (10.25% said as 10.2%)
    said_above = re.search(
        r"GB used / [\d.]+GB limit; Ray kills above ([\d.]+)% of it, RAY_memory_usage_threshold\)$", why
    )
    threshold = float(above.split("%")[0])
    assert said_above and abs(float(said_above.group(1)) - threshold) <= 0.1 + 1e-9, said
    tries = proc.stdout.count("grow: a try in")
    # A batch: each of its tries. An actor's starts: a restart the monitor killed before its
    # __init__ printed (it kills several workers at once) counts as one of them.
    assert tries == BATCH_RETRIES + 1 if grows_in == "__call__" else 1 <= tries <= BATCH_RETRIES + 1, (
        proc.stdout
    )
