"""Shared fixtures: a tiny BERT (random weights, vocabulary built here), small corpora, a local S3
endpoint, one local Ray."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multinode import free_port  # noqa: F401  (the tests' one free-port helper)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "BERTJOB_CACHE" not in os.environ:  # not ~/.cache; removed when the tests end
    os.environ["BERTJOB_CACHE"] = tempfile.mkdtemp(prefix="bertjob-test-cache-")
    atexit.register(shutil.rmtree, os.environ["BERTJOB_CACHE"], ignore_errors=True)
# Ray Train's controller polls its workers every 2 s, and a worker's report (each checkpoint) waits
# until the previous one was collected: our tiny runs checkpoint every few steps, so they were paced
# by that poll, not by training. Every driver here (this process, the CLI subprocesses, the
# multi-node clusters' jobs) passes this on to its controller, as Ray Train propagates it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

POS_WORDS = "great wonderful superb loved brilliant excellent moving fun beautiful best".split()
NEG_WORDS = "awful terrible boring hated worst dull poor waste bad stupid".split()
FILLER = "the a movie film was is and it this plot acting story of to i with but".split()


def review(rng: random.Random, positive: bool, words: int = 40) -> str:
    strong = POS_WORDS if positive else NEG_WORDS
    out = [rng.choice(strong) if rng.random() < 0.3 else rng.choice(FILLER) for _ in range(words)]
    return " ".join(out) + " <br /><br />" + rng.choice(strong) + " &amp; " + rng.choice(FILLER) + "."


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer BERT with a word-level vocabulary of our review words: a real HF model directory."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + sorted(set(POS_WORDS + NEG_WORDS + FILLER)) + letters + ["##" + c for c in letters]
    vocab += [".", ",", "&", "!", "?", "'", ";", ":", "-", "(", ")", '"', "<", ">", "/"] + [
        str(i) for i in range(10)
    ]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )  # fmt: skip
    BertModel(config).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny BERT with a (random) classification head, as infer expects."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    d = tmp_path_factory.mktemp("tiny-clf")
    model = BertForSequenceClassification.from_pretrained(
        tiny_model_dir,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d)
    (d / "bertjob.json").write_text(
        json.dumps({"max_length": 64, "truncation": "head+tail", "head_tokens": 16, "strip_html": True})
    )
    return str(d)


def kill_session(pid: int) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its session: the
    driver, and the local Ray it started (Ray workers get process groups of their own)."""
    subprocess.run(["pkill", "-KILL", "-s", str(pid)], check=False)


def run_in_session(args: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    """subprocess.run(args, capture_output=True, text=True) in a session of its own, which is killed
    as the command ends or times out: subprocess.run's timeout killed the command alone, and the
    local Ray it had started lived on, orphaned (its agents under pid 1)."""
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
        proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def session_processes(sid: int, title: str, mapping: str = "") -> list:
    """The processes of session `sid` (a process started with start_new_session=True, and the local
    Ray it started) whose command line holds `title`, such as a Ray actor's `ray::Class.method`,
    and that map a file whose path holds `mapping` (a library it loads, such as libtorch)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and title in " ".join(p.cmdline()):
                if mapping and not any(mapping in m.path for m in p.memory_maps()):
                    continue
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):  # gone since, or another user's
            continue
    return found


def kill_each_try(proc, title: str, timeout: float, stderr: Path, mapping: str = "") -> tuple[int, str, int]:
    """SIGKILL each process of `proc`'s session (started with start_new_session=True) whose command
    line holds `title`, such as a Ray actor while it runs a method (`ray::MapWorker(...).submit`),
    once it maps `mapping` (if given: a library its work loads), as the kernel's OOM killer would
    each time it takes more memory than its node has, until `proc` ends, which it must within
    `timeout` seconds. Returns its exit status, the last line of its `stderr` (a file), and how many
    processes were killed."""
    kills = 0
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            for p in session_processes(proc.pid, title, mapping):
                p.kill()
                kills += 1
            time.sleep(0.05)
        rc = proc.poll()
    finally:
        kill_session(proc.pid)
        proc.wait()
    err = stderr.read_text()
    assert rc is not None, f"it did not end in {timeout:.0f} s ({kills} kills):\n{err[-3000:]}"
    return rc, err.strip().splitlines()[-1], kills


def make_imdb_dir(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """The canonical aclImdb layout with synthetic reviews: {'train': n, 'test': n, 'unsup': n}."""
    rng = random.Random(seed)
    base = root / "aclImdb"
    rid = 0
    for split in ("train", "test"):
        for pol in ("pos", "neg"):
            (base / split / pol).mkdir(parents=True, exist_ok=True)
            for _ in range(per_class.get(split, 0)):
                rating = rng.choice([7, 8, 9, 10]) if pol == "pos" else rng.choice([1, 2, 3, 4])
                (base / split / pol / f"{rid}_{rating}.txt").write_text(review(rng, pol == "pos"))
                rid += 1
    if per_class.get("unsup"):
        (base / "train" / "unsup").mkdir(parents=True, exist_ok=True)
        for _ in range(per_class["unsup"]):
            (base / "train" / "unsup" / f"{rid}_0.txt").write_text(review(rng, rng.random() < 0.5))
            rid += 1
    return base


def tar_dir(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=src.name)
    return dest


@pytest.fixture(scope="session")
def imdb_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic IMDb layout: 100 + 100 train, 40 + 40 test, 30 unsup."""
    return make_imdb_dir(tmp_path_factory.mktemp("imdb"), {"train": 100, "test": 40, "unsup": 30})


class S3Endpoint:
    """A moto S3 server on 127.0.0.1 that checks credentials, with one bucket."""

    bucket = "bertjob-test"

    def __init__(self, url: str, key: str, secret: str, reader: dict[str, str]):
        self.url, self.key, self.secret = url, key, secret
        self.reader = reader  # AWS_* variables of a user who may read the bucket, not write to it

    def uri(self, *parts: str) -> str:
        """A fresh prefix in the bucket per call, so tests never see each other's objects."""
        import uuid

        return "/".join([f"s3://{self.bucket}", uuid.uuid4().hex[:10], *parts])


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Endpoint]:
    """A real S3 HTTP endpoint (moto's server in its own process), reached only through the standard
    AWS_* variables, which are set for the whole session before Ray starts so its workers inherit
    them. The server checks credentials: an IAM user with an S3 policy owns the key pair the tests
    use; from then on a wrong key is refused, as on AWS."""
    import sys
    import urllib.request

    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):  # up to ~60 s on a loaded machine; a fixed sleep would race
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=5)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("the moto S3 server exited at start") from None
                time.sleep(0.1)
        admin = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="admin",
                     aws_secret_access_key="admin")  # fmt: skip
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="bertjob")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="bertjob", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="bertjob")["AccessKey"]
        iam.create_user(UserName="reader")
        read_only = ["s3:Get*", "s3:List*", "s3:Head*"]  # moto's action for HeadBucket: s3:HeadBucket
        reads = {**policy, "Statement": [{**policy["Statement"][0], "Action": read_only}]}
        iam.put_user_policy(UserName="reader", PolicyName="s3-read", PolicyDocument=json.dumps(reads))
        reader = iam.create_access_key(UserName="reader")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket=S3Endpoint.bucket)
        # From here on every request must be signed by a known key with a policy that allows it.
        urllib.request.urlopen(
            urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                   headers={"Content-Type": "text/plain"})
        )  # fmt: skip
        endpoint = S3Endpoint(url, key["AccessKeyId"], key["SecretAccessKey"],
                              {"AWS_ACCESS_KEY_ID": reader["AccessKeyId"],
                               "AWS_SECRET_ACCESS_KEY": reader["SecretAccessKey"]})  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            for name, value in (("AWS_ENDPOINT_URL", url), ("AWS_ACCESS_KEY_ID", endpoint.key),
                                ("AWS_SECRET_ACCESS_KEY", endpoint.secret), ("AWS_REGION", "us-east-1")):  # fmt: skip
                mp.setenv(name, value)
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                mp.delenv(name, raising=False)
            yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_local(s3: S3Endpoint):
    """One local Ray for the in-process integration tests (2 CPUs, as in CI). It starts after the S3
    endpoint so that its workers see the AWS_* variables, as a node configured for S3 would."""
    import ray

    # Ray Train's placement-group cleaner polls the state API, whose address its actor finds as a
    # driver would: RAY_ADDRESS, else /tmp/ray/ray_current_cluster, which names the last cluster
    # `ray start` or a multi-node test started, long gone by now. Each poll then waits out its
    # 10 s timeout, and every train and pretrain run ends ~12 s late. Name this Ray's API server
    # to its workers (only: the CLI's subprocesses start Rays of their own).
    port = free_port()
    # Idle workers are kept as bertjob keeps them on the local Ray it starts (cluster.init_ray: one per
    # CPU and 4 more), so that the zero-CPU read and write tasks beside the actors do not start a
    # fresh Python each time; the workers run at the driver's priority, as there.
    ray.init(address="local", num_cpus=2, log_to_driver=False, dashboard_port=port,
             _system_config={"num_workers_soft_limit": 2 + 4, "worker_niceness": 0},
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})  # fmt: skip
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_small(
    imdb_small: Path, tiny_model_dir: str, ray_local, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from bertjob import prepare
    from bertjob.config import PrepareConfig

    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare.run(
        PrepareConfig(
            input=str(imdb_small), output=str(out), model=tiny_model_dir, max_length=64, head_tokens=16
        )
    )
    return out
