"""A training run's record of its worker groups and restarts (bertjob/runlog.py), in the bucket."""

import json

from bertjob import runlog


def test_the_timeline_joins_each_restart_with_the_group_that_followed_it(s3):
    run = s3.uri("run")  # on the S3 endpoint: one object per event, listed back
    runlog.record(run, "start", workers=2, from_step=0, epoch=0, node="a")
    runlog.record(run, "restart", why="rank 0: ActorDiedError", workers_before=2)
    runlog.record(run, "placement_retry", why="WorkerGroupStartupTimeoutError: ...", workers_before=2)
    runlog.record(run, "start", workers=1, from_step=4, epoch=0, node="b")
    runlog.record(run, "resize", why="the cluster can now hold 2 workers (was 1)", workers_before=1)
    runlog.record(run, "start", workers=2, from_step=44, epoch=1, node="b")
    t = runlog.timeline(run)
    assert [(w["workers"], w["from_step"], w["node"]) for w in t["workers"]] == [
        (2, 0, "a"),
        (1, 4, "b"),
        (2, 44, "b"),
    ]
    assert [(r["event"], r["workers_before"], r["workers_after"], r["from_step"]) for r in t["restarts"]] == [
        ("restart", 2, 1, 4),
        ("resize", 1, 2, 44),
    ]
    assert len(t["placement_retries"]) == 1
    assert runlog.timeline(s3.uri("nothing")) == {"workers": [], "restarts": [], "placement_retries": []}


def test_the_sample_log_keeps_each_step_of_the_last_group_that_ran_it(tmp_path):
    """Groups b and c both resume from a's checkpoint at step 2 (b fails before checkpointing
    again; c is an elastic resize to 1 worker): they have resumed as often, and only their group
    ids tell their records of steps 2 and 3 apart. A row is 100 x group + 10 x step + rank."""
    run = str(tmp_path)
    groups = [
        runlog.record(run, "start", workers=w, from_step=s, epoch=0, node="n")
        for w, s in ((2, 0), (2, 2), (1, 2))
    ]
    logs: dict[int, list] = {0: [], 1: []}
    for g, world, steps in ((0, 2, range(4)), (1, 2, range(2, 4)), (2, 1, range(2, 5))):
        for step in steps:
            for rank in range(world):
                rows = [100 * g + 10 * step + r for r in range(2) if world == 1 or r == rank]
                logs[rank].append(
                    {"step": step, "epoch": 0, "group": groups[g], "rank": rank, "world": world, "rows": rows}
                )
    (tmp_path / "samples").mkdir()

    def write():
        for rank, records in logs.items():
            (tmp_path / "samples" / f"rank-{rank}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records)
            )

    write()
    expected = {0: [0, 1], 1: [10, 11], 2: [220, 221], 3: [230, 231], 4: [240, 241]}
    assert runlog.trained_rows(run) == expected
    # The groups' order is their start's, not the files': b's records last, c's still stand.
    for records in logs.values():
        records.sort(key=lambda r: r["group"] == groups[1])
    write()
    assert runlog.trained_rows(run) == expected
