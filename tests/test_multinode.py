"""bertjob on a real multi-node Ray cluster (tests/multinode.py): nodes SIGKILLed mid-run, nodes that
join, capacity that never comes. Every job runs as a client process of the cluster, as a user's
would; inputs, outputs and checkpoints are on the directory every node sees."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from bertjob import runlog
from tests.conftest import make_imdb_dir, review, tar_dir
from tests.multinode import RayCluster

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3) -> RayCluster:
    """Head (no CPUs for work) and two worker nodes of 1 CPU; tests kill and add nodes. Started
    after the S3 endpoint: every node has its AWS_* variables, as nodes configured for S3 would."""
    c = RayCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head()
        c.add_node("a", wait=False)
        c.add_node("b", wait=False)
        c.wait_for(alive=["a", "b"])
        yield c
    finally:
        c.shutdown()


def live_nodes(cluster: RayCluster, n: int) -> list[str]:
    """At least `n` live worker nodes: fresh ones join for those killed before."""
    alive = [name for name, node in cluster.nodes.items() if node.pids()]
    if len(alive) >= n:  # nodes that were seen up and were never killed: nothing to wait for
        return alive
    for _ in range(n - len(alive)):
        name = f"n{len(cluster.nodes)}"
        cluster.add_node(name, wait=False)
        alive.append(name)
    cluster.wait_for(alive=alive)
    return alive


JOBS: list[subprocess.Popen] = []  # the bertjob commands started, for `no_job_outlives_its_test`


def bertjob(cluster: RayCluster, *args: str, log: Path, **env: str) -> subprocess.Popen:
    """A bertjob command as a driver on the cluster (`env`: variables of its own), its output in `log`."""
    JOBS.append(subprocess.Popen([sys.executable, "-m", "bertjob", *args], env=cluster.client_env(**env),
                                 cwd=cluster.shared, stdout=open(log, "w"), stderr=subprocess.STDOUT))  # fmt: skip
    return JOBS[-1]


@pytest.fixture(autouse=True)
def no_job_outlives_its_test():
    """A test that fails while its job runs kills the job: its workers would hold the cluster's CPUs
    in the next test. Ray ends a driver's actors (Ray Train's controller and workers) with it."""
    yield
    while JOBS:
        proc = JOBS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(
            f"the job did not finish in {timeout:.0f} s:\n{log.read_text()[-4000:]}"
        ) from None


def wait_until(what, proc: subprocess.Popen, log: Path, timeout: float = 300):
    """Poll `what()` (a file appearing, a record written) until it is true; fail if the job ended first."""
    deadline = time.time() + timeout
    while not (found := what()):
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) first:\n{log.read_text()[-4000:]}")
        assert time.time() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    return found


def jsonl_corpus(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            pos = rng.random() < 0.5
            f.write(json.dumps({"id": f"r{i}", "text": review(rng, pos, words=60), "label": int(pos)}) + "\n")
    return path


def node_names(cluster: RayCluster) -> dict[str, str]:
    """Ray node id -> the fixture's name, for every node the cluster has seen (a client's `ray.nodes()`)."""
    script = ("import ray, json\nray.init(logging_level='ERROR')\n"
              "print(json.dumps({n['NodeID']: k[5:] for n in ray.nodes() for k in n['Resources'] if k.startswith('node_')}))")  # fmt: skip
    return json.loads(subprocess.run([sys.executable, "-c", script], env=cluster.client_env(), capture_output=True,
                                     text=True, check=True).stdout.strip().splitlines()[-1])  # fmt: skip


@pytest.fixture(scope="module")
def prepared(cluster, tiny_model_dir) -> Path:
    """A small prepared corpus, written by prepare on the cluster."""
    live_nodes(cluster, 2)
    corpus = make_imdb_dir(cluster.shared / "imdb", {"train": 160, "test": 40})
    out = cluster.shared / "prepared"
    log = cluster.root / "prepare.log"
    proc = bertjob(cluster, "prepare", "--input", str(corpus), "--output", str(out), "--model", tiny_model_dir,
                   "--max-length", "128", log=log)  # fmt: skip
    assert finish(proc, log) == 0, log.read_text()[-4000:]
    return out


def test_elastic_training_survives_a_killed_node_and_grows_back_when_one_joins(
    cluster, prepared, tiny_model_dir
):
    """2 workers on 2 nodes; after the first checkpoint the node of rank 0 (which wrote it) is
    SIGKILLed mid-epoch: the run goes on with 1 worker on the other node from that checkpoint,
    grows back to 2 when a fresh node joins, and trains every row exactly once per epoch."""
    live_nodes(cluster, 2)
    out, ckpts = cluster.shared / "elastic", cluster.shared / "elastic-ckpt"
    log = cluster.root / "elastic.log"
    # Ray sees nodes come and go at a resource tick of its own (every 20 s): the 1-worker group is
    # placed at the first attempt after the tick that drops the dead node (attempts of 5 s), and
    # grows at the first check (every 6 s) after the tick that sees the fresh node. That node joins
    # once the 1-worker group has started training (its start recorded): joining sooner, it can be
    # seen before that group has finished starting, which is then replaced at once by 2 workers.
    # Steps keep Ray Train's default pace (a report every 4th step, collected each 2 s poll): 3
    # epochs outlast the 1-worker phase (up to ~30 s: the node's start, a tick, a check).
    epochs = 3
    proc = bertjob(cluster, "train", "--data", str(prepared), "--output", str(out), "--model", tiny_model_dir,
                   "--storage-path", str(ckpts), "--name", "e", "--num-workers", "1-2", "--epochs", str(epochs),
                   "--batch-size", "8", "--checkpoint-every-steps", "4", "--sample-log", "true",
                   "--resize-check-s", "6", "--placement-timeout-s", "5", "--mixed-precision", "off", "--cpus-per-worker", "1",
                   log=log, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="2")  # fmt: skip
    events = ckpts / "e" / "events"
    names = node_names(cluster)  # while Ray Train starts: the nodes' ids, to kill rank 0's at once

    def starts():
        return [json.loads(p.read_text()) for p in sorted(events.glob("*-start-*.json"))]

    first = wait_until(lambda: starts(), proc, log)[0]
    assert first["workers"] == 2, first
    # A checkpoint counts once Ray Train has registered it (its snapshot of the run's checkpoints),
    # not when its directory appears: a report the controller never collected from the dead node
    # leaves a directory that no restart resumes from.
    wait_until(lambda: (ckpts / "e" / "checkpoint_manager_snapshot.json").exists(), proc, log)
    victim = names[first["node"]]
    cluster.kill(victim)
    killed_at = time.time()
    one = wait_until(lambda: [s for s in starts() if s["at"] > killed_at], proc, log)[0]
    assert one["workers"] == 1 and one["from_step"] > 0, one
    live_nodes(cluster, 2)  # a fresh node joins
    assert names[one["node"]] != victim  # the checkpoint rank 0 wrote there, resumed elsewhere
    assert finish(proc, log) == 0, log.read_text()[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    counts = [w["workers"] for w in metrics["workers_over_time"]]
    assert counts[:3] == [2, 1, 2], metrics["workers_over_time"]
    kinds = [(r["event"], r["workers_before"], r["workers_after"]) for r in metrics["restarts"]]
    assert kinds[:2] == [("restart", 2, 1), ("resize", 1, 2)], metrics["restarts"]
    assert all(r["why"] and r["from_step"] is not None for r in metrics["restarts"])
    # Exactly one pass over the train split per epoch, across 2, 1 and 2 workers.
    n_train = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["rows_written"]
    steps = runlog.trained_rows(str(ckpts / "e"))
    per_epoch = -(-n_train // 8)
    assert sorted(steps) == list(range(epochs * per_epoch))
    for epoch in range(epochs):
        rows = [r for s in range(epoch * per_epoch, (epoch + 1) * per_epoch) for r in steps[s]]
        assert sorted(rows) == list(range(n_train)), f"epoch {epoch}"
    assert metrics["steps"] == epochs * per_epoch and metrics["global_batch_size"] == 8


def test_a_fixed_size_run_whose_node_dies_stops_with_a_clear_error_after_the_placement_timeout(
    cluster, prepared, tiny_model_dir
):
    """2 fixed workers; one node is SIGKILLed with no replacement: after placement_timeout_s the
    job stops and says what it asked for and what the cluster has, instead of waiting forever."""
    live_nodes(cluster, 2)
    ckpts, log = cluster.shared / "fixed-ckpt", cluster.root / "fixed.log"
    # 10 s: the dead node is gone from what the error reports once Ray has missed its 5 health
    # checks of 1 s (tests/multinode.py), 4-7 s after the kill.
    proc = bertjob(cluster, "train", "--data", str(prepared), "--output", str(cluster.shared / "fixed"),
                   "--model", tiny_model_dir, "--storage-path", str(ckpts), "--name", "f", "--num-workers", "2",
                   "--epochs", "50", "--batch-size", "8", "--checkpoint-every-steps", "4", "--max-failures", "3",
                   "--placement-timeout-s", "10", "--mixed-precision", "off", "--cpus-per-worker", "1", log=log)  # fmt: skip
    wait_until(lambda: list((ckpts / "f").glob("checkpoint_*")), proc, log)
    victim = live_nodes(cluster, 2)[0]  # one of the 2 nodes the workers run on
    cluster.kill(victim)
    killed_at = time.time()
    rc = finish(proc, log, timeout=300)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert "could not place 2 workers" in text and "placement_timeout_s=10s" in text, text[-3000:]
    assert "CPU 1 free of 1" in text or "CPU 0 free of 1" in text, text[-3000:]  # what is left: one node
    assert time.time() - killed_at < 240
    cluster.wait_for(dead=[victim])


def test_infer_across_nodes_with_a_killed_node_scores_every_input_exactly_once(cluster, tiny_classifier_dir):
    """Predictor actors on 2 nodes; one node SIGKILLed once scoring has committed output: the job
    completes (Ray restarts the lost actors elsewhere) or a rerun does; every id once."""
    live_nodes(cluster, 2)
    corpus = jsonl_corpus(cluster.shared / "infer.jsonl", 6000)
    out, log = cluster.shared / "scored", cluster.root / "infer.log"
    args = ["infer", "--input", str(corpus), "--model", tiny_classifier_dir, "--output", str(out), "--id-column",
            "id", "--num-workers", "1-4", "--rows-per-shard", "300", "--batch-size", "16"]  # fmt: skip
    proc = bertjob(cluster, *args, log=log)
    wait_until(lambda: list((out / "predictions").glob("*.parquet")), proc, log)
    cluster.kill(live_nodes(cluster, 2)[0])
    if finish(proc, log) != 0:
        live_nodes(cluster, 2)
        proc = bertjob(cluster, *args, log=log)
        assert finish(proc, log) == 0, log.read_text()[-4000:]
    ids = pq.read_table(out / "predictions", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_read"] == 6000 and manifest["rows_scored"] == 6000


def test_infer_on_a_gpu_node_of_one_cpu_tokenizes_beside_the_predictor(tmp_path, tiny_classifier_dir):
    """infer's GPU path (tokenize tasks ahead of a GPU predictor actor) on a cluster whose one node
    has 1 CPU and 1 GPU, as a small GPU pod has: the predictor reserves no CPU, so the tokenize tasks
    get it (a predictor holding the only CPU left them none, and the job waited forever). The GPU
    is Ray's resource only: the predictor scores on the CPU here."""
    c = RayCluster(tmp_path / "gpu-cluster")
    try:
        c.start_head()
        c.add_node("gpu", cpus=1, gpus=1)
        corpus = jsonl_corpus(c.shared / "in.jsonl", 2000)
        out, log = c.shared / "scored", c.root / "infer.log"
        proc = bertjob(c, "infer", "--input", str(corpus), "--model", tiny_classifier_dir, "--output", str(out),
                       "--id-column", "id", "--use-gpu", log=log)  # fmt: skip
        assert finish(proc, log, timeout=180) == 0, log.read_text()[-4000:]
    finally:
        c.shutdown()
    ids = pq.read_table(out / "predictions", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 2000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_scored"] == 2000 and manifest["ray_cluster"] == {"CPU": 1.0, "GPU": 1.0}


def test_prepare_across_nodes_with_a_killed_node_is_exact_or_a_rerun_is(cluster, tiny_model_dir):
    """Tokenize actors on 2 nodes; one node SIGKILLed once shards are being written: the job
    completes with exact output or stops with an error, and then a rerun's output is exact."""
    live_nodes(cluster, 2)
    corpus = jsonl_corpus(cluster.shared / "prep.jsonl", 30000, seed=1)
    out, log = cluster.shared / "prep-out", cluster.root / "prep-kill.log"
    args = ["prepare", "--input", str(corpus), "--output", str(out), "--model", tiny_model_dir, "--id-column", "id",
            "--max-length", "64", "--rows-per-shard", "1000", "--batch-size", "200"]  # fmt: skip
    proc = bertjob(cluster, *args, log=log)
    wait_until(lambda: list(out.glob("*/*.parquet")) or list(out.glob("_staging/**/*.parquet")), proc, log)
    cluster.kill(live_nodes(cluster, 2)[0])
    if finish(proc, log) != 0:
        assert "Error" in log.read_text()
        live_nodes(cluster, 2)
        proc = bertjob(cluster, *args, log=log)
        assert finish(proc, log) == 0, log.read_text()[-4000:]
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    train, val = splits["train"], splits["validation"]
    assert train["rows_read"] + val["rows_read"] == 30000  # counted from the input
    for split in (train, val):
        assert split["rows_read"] == split["rows_written"] + split["rows_quarantined"]
        assert sum(split["label_counts"].values()) == split["rows_written"]
    ids = [
        i
        for s in ("train", "validation")
        for i in pq.read_table(out / s, columns=["id"]).column("id").to_pylist()
    ]
    assert len(ids) == len(set(ids)) == 30000
    for label, n in val["label_counts"].items():  # the exact stratified split
        assert n == round(0.1 * (n + train["label_counts"][label]))


def test_ray_job_submit_runs_the_pipeline_on_the_cluster_with_every_path_in_s3(cluster, s3, tiny_model_dir):
    """`ray job submit` as the README says, to the token-auth head; the stages run on the worker
    nodes (the head has no CPUs). Corpus, model, outputs and checkpoints are all in the bucket:
    no stage depends on a directory the nodes share."""
    from bertjob import runlog, storage

    live_nodes(cluster, 2)
    ray_bin = str(Path(sys.executable).parent / "ray")
    local = make_imdb_dir(cluster.root / "submit-data", {"train": 40, "test": 20, "unsup": 10})
    corpus, model, out = s3.uri("imdb.tar.gz"), s3.uri("model"), s3.uri("run")
    storage.copy(str(tar_dir(local, cluster.root / "imdb.tar.gz")), corpus)
    storage.copy(tiny_model_dir, model)
    config = {
        "input": corpus, "output_dir": out, "model": model, "max_length": 32, "num_workers": [1, 2],
        "name": "submit-test", "prepare": {"head_tokens": 8},
        "train": {"epochs": 1, "batch_size": 16, "cpus_per_worker": 1, "mixed_precision": "off"},
        "infer": {"num_workers": 1}, "evaluate": {"num_workers": 1},
    }  # fmt: skip
    (cluster.root / "tiny.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    wrong = subprocess.run([ray_bin, "job", "list", "--address", cluster.dashboard],
                           env={**env, "RAY_AUTH_TOKEN": "0" * 32}, capture_output=True, text=True)  # fmt: skip
    assert wrong.returncode != 0, wrong.stdout  # the head really requires the token
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    cmd = [ray_bin, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/pipeline.py", "--config", str(cluster.root / "tiny.yaml")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-5000:]
    assert "succeeded" in logs.lower() and "bertjob pipeline summary" in logs
    summary = storage.read_json(storage.join(out, "summary.json"))
    assert summary["stages"]["prepare"]["rows"] == {"train": 72, "validation": 8, "test": 40, "unsup": 10}
    assert summary["stages"]["evaluate"]["rows_scored"] == 40
    assert summary["stages"]["infer"]["rows_scored"] == 10
    assert storage.exists(storage.join(out, "train", "model", "model.safetensors"))
    # Ray Train's controller and rank 0 recorded the run's worker groups in the bucket, and
    # metrics.json (in the bucket too) carries them.
    metrics = storage.read_json(storage.join(out, "train", "metrics.json"))
    groups = runlog.timeline(storage.join(metrics["checkpoints"], metrics["config"]["name"]))["workers"]
    assert groups and groups[0]["workers"] in (1, 2) and groups[0]["from_step"] == 0
    assert metrics["workers_over_time"] == groups


def test_a_job_output_in_its_working_directory_is_refused_before_any_work(cluster, tiny_classifier_dir):
    """`ray job submit --working-dir . -- python jobs/infer.py ... --output scored`: the driver wrote
    the output's marker into the head's temporary copy of the working directory, the workers their
    predictions into their own nodes' copies, and the job ended with "1 of 2 input units were never
    read to the end; rerun to complete", as would every rerun. Now one error before any work."""
    live_nodes(cluster, 1)
    corpus = cluster.shared / "wd-corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"great fun {i}"}) + "\n" for i in range(8)))
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
           "--", "python", "jobs/infer.py", "--input", str(corpus), "--model", tiny_classifier_dir,
           "--output", "scored"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    logs = result.stdout + result.stderr
    assert result.returncode != 0, logs[-3000:]
    assert "bertjob: error: output scored is in the job's working directory (" in logs, logs[-3000:]
    assert "give a path every node shares" in logs and "connected to Ray cluster" not in logs
