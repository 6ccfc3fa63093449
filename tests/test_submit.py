"""`ray job submit` against a real Ray head on 127.0.0.1 with token authentication."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_imdb_dir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group, stopped (the whole group) even on failure."""
    gcs, dash = free_port(), free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
         f"--ray-client-server-port={free_port()}", f"--min-worker-port={free_port()}", "--max-worker-port=0"],
        env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{dash}", tmp_path / "head.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ray_job_submit_runs_the_pipeline_on_a_token_auth_cluster(
    ray_head, tmp_path, tiny_model_dir, monkeypatch
):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, head_log = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the client reads the token Ray wrote at `ray start`
    corpus = make_imdb_dir(tmp_path / "data", {"train": 40, "test": 20, "unsup": 10})
    out = tmp_path / "out"
    config = {
        "input": str(corpus), "output_dir": str(out), "model": tiny_model_dir, "max_length": 32, "num_workers": 1,
        "name": "submit-test", "prepare": {"head_tokens": 8},
        "train": {"epochs": 1, "batch_size_per_worker": 8, "cpus_per_worker": 1, "mixed_precision": "off"},
    }  # fmt: skip
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    client = None
    deadline = time.time() + 90
    while client is None:
        try:
            client = JobSubmissionClient(address)
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            if time.time() > deadline:
                raise AssertionError(
                    "the Ray head did not come up:\n" + head_log.read_text()[-3000:]
                ) from None
            time.sleep(1)
    job = None
    while job is None:  # the head's job agent may still be starting
        try:
            job = client.submit_job(
                entrypoint=f"python jobs/pipeline.py --config {tmp_path / 'tiny.yaml'}",
                runtime_env={
                    "working_dir": str(ROOT),
                    "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                },
            )
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(1)
    deadline = time.time() + 420
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["prepare"]["rows"] == {"train": 72, "validation": 8, "test": 40, "unsup": 10}
    assert summary["stages"]["evaluate"]["rows_scored"] == 40
    assert summary["stages"]["infer"]["rows_scored"] == 10
    assert (out / "train" / "model" / "model.safetensors").exists()
    assert "bertjob pipeline summary" in logs
