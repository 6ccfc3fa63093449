"""A training run's record of its worker groups and restarts (bertjob/runlog.py), in the bucket."""

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
