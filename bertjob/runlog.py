"""What happened to a training run: how many workers trained when, and every restart and resize.

Two writers, one record per event, each a JSON file of its own in `RUN_DIR/events/` (one PUT on an
object store, so nothing is appended and nothing lost when a process dies):
- Ray Train's controller (`RunEvents`, a callback on its state changes): a restart after a failure
  (why: the error) and a resize of an elastic run (why: the cluster changed).
- rank 0 of every worker group as it starts: how many workers, and from which step and epoch.
`timeline()` joins them for metrics.json: each restart with the start that followed it.

A start event's id (its file name, which begins with its time) names its worker group: the sample
log (`--sample-log true`, `RUN_DIR/samples/rank-R.jsonl`) tags each step's rows with it, so that
`trained_rows()` tells a step that a later group ran again (after a restart, a resize or in a rerun)
from its first run, also when both groups resumed from the same checkpoint.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
import uuid
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback

from bertjob.storage import filesystem, join, read_json, write_json

log = logging.getLogger(__name__)
EVENTS_DIR = "events"
SAMPLES_DIR = "samples"


def record(run_dir: str, kind: str, **fields: Any) -> str:
    """Writes one event; returns its id (`AT-KIND-RANDOM`, AT its time in seconds)."""
    at = time.time()
    event_id = f"{at:.6f}-{kind}-{uuid.uuid4().hex[:6]}"
    write_json(join(run_dir, EVENTS_DIR, f"{event_id}.json"), {"at": at, "event": kind, **fields})
    return event_id


def _event_time(event_id: str) -> float:
    return float(event_id.split("-", 1)[0])


def _why(error: BaseException) -> str:
    """One line: the first line of each worker's failure (a dead node: the actor died), else the error's."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        return "; ".join(f"rank {r}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
                         for r, e in sorted(failures.items()))  # fmt: skip
    inner = getattr(error, "controller_failure", None) or error
    return f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:300]}"


def is_placement_timeout(error: BaseException) -> bool:
    """Ray Train gave up placing a worker group (its ControllerError wraps the startup timeout)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError)


class RunEvents(ControllerCallback):
    """On Ray Train's controller: records restarts (with the error) and resizes (with the counts).

    Ray Train's ControllerCallback is a developer API (Ray 2.60); RunConfig accepts it beside user
    callbacks. If it changes, the run still trains; only these records are missing."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.workers = 0

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        kind = type(current_state).__name__
        try:
            decision = getattr(current_state, "scaling_decision", None)
            if kind in ("RestartingState", "ReschedulingState"):
                error = current_state.training_failed_error
                why = _why(error)
                if is_placement_timeout(error):  # a group that never started
                    log.warning("train: %d workers could not be placed in time; trying again", self.workers)
                    record(self.run_dir, "placement_retry", why=why, workers_before=self.workers)
                else:
                    log.warning(
                        "train: the worker group failed (%s); restarting from the latest checkpoint", why
                    )
                    record(self.run_dir, "restart", why=why, workers_before=self.workers)
            elif kind == "ResizingState":
                why = f"the cluster can now hold {decision.num_workers} workers (was {self.workers})"
                log.info("train: resizing: %s", why)
                record(self.run_dir, "resize", why=why, workers_before=self.workers)
            if decision is not None and getattr(decision, "num_workers", None):
                self.workers = decision.num_workers
        except Exception:  # a record must never stop the run
            log.exception("train: could not record the controller's %s", kind)


def timeline(run_dir: str) -> dict[str, list[dict[str, Any]]]:
    """{"workers": [{at, workers, from_step, epoch, node}], "restarts": [{at, event, why,
    workers_before, workers_after, from_step}], "placement_retries": [{at, why, workers_before}]}:
    the run's events, reruns under the same name included."""
    fs, where = filesystem(join(run_dir, EVENTS_DIR))
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
    events = sorted((read_json(join(run_dir, EVENTS_DIR, os.path.basename(i.path))) for i in infos
                     if i.path.endswith(".json")), key=lambda e: e["at"])  # fmt: skip
    starts = [e for e in events if e["event"] == "start"]
    restarts = []
    for e in (e for e in events if e["event"] in ("restart", "resize")):
        after = next((s for s in starts if s["at"] >= e["at"]), None)
        restarts.append(
            {**e, "workers_after": after and after["workers"], "from_step": after and after["from_step"]}
        )
    retries = [e for e in events if e["event"] == "placement_retry"]
    return {"workers": starts, "restarts": restarts, "placement_retries": retries}


def trained_rows(run_dir: str) -> dict[int, list[int]]:
    """{step: the rows all workers trained in it, sorted}, from a local run's sample log. A step that
    a later worker group ran again is logged again: the records of the last group (by its start
    event's time) that ran it stand for it, as its weights are the ones training went on from."""
    records = []
    for path in sorted(glob.glob(join(run_dir, SAMPLES_DIR, "rank-*.jsonl"))):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    last: dict[int, str] = {}
    for r in records:
        if r["step"] not in last or _event_time(r["group"]) > _event_time(last[r["step"]]):
            last[r["step"]] = r["group"]
    steps: dict[int, list[int]] = {}
    for r in records:
        if r["group"] == last[r["step"]]:
            steps.setdefault(r["step"], []).extend(r["rows"])
    return {step: sorted(rows) for step, rows in sorted(steps.items())}
