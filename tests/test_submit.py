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

from tests.conftest import kill_session, make_imdb_dir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group, stopped (the whole group) even on failure.

    As the README says: a token is generated first (in a HOME of its own, so that no token left by
    another run is used), and a head started where a token exists requires it."""
    gcs, dash = free_port(), free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    home = tmp_path / "home"
    home.mkdir()
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "HOME": str(home)}
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").exists()
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
         f"--ray-client-server-port={free_port()}",
            # Its own agent ports: another Ray (the tests' local one) may hold the defaults.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}"],
        env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{dash}", tmp_path / "head.log", env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        kill_session(proc.pid)  # whatever is left of the head, its workers included
        proc.wait()


def test_ray_job_submit_runs_the_pipeline_on_a_token_auth_cluster(ray_head, tmp_path, tiny_model_dir):
    address, head_log, head_env = ray_head
    ray_bin = str(Path(sys.executable).parent / "ray")
    # What the README tells a client: token mode on; the token comes from ~/.ray/auth_token.
    env = {**head_env, "RAY_AUTH_MODE": "token"}
    corpus = make_imdb_dir(tmp_path / "data", {"train": 40, "test": 20, "unsup": 10})
    out = tmp_path / "out"
    config = {
        "input": str(corpus), "output_dir": str(out), "model": tiny_model_dir, "max_length": 32, "num_workers": 1,
        "name": "submit-test", "prepare": {"head_tokens": 8},
        "train": {"epochs": 1, "batch_size": 16, "cpus_per_worker": 1, "mixed_precision": "off"},
    }  # fmt: skip
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    deadline = time.time() + 90
    while True:  # wait for the head's dashboard and job agent
        probe = subprocess.run(
            [ray_bin, "job", "list", "--address", address], env=env, capture_output=True, text=True
        )
        if probe.returncode == 0:
            break
        if time.time() > deadline:
            raise AssertionError(
                f"the Ray head did not come up:\n{probe.stderr[-2000:]}\n{head_log.read_text()[-2000:]}"
            )
        time.sleep(1)
    # The head really requires the token: a wrong one is refused.
    wrong = subprocess.run([ray_bin, "job", "list", "--address", address], env={**env, "RAY_AUTH_TOKEN": "0" * 32},
                           capture_output=True, text=True)  # fmt: skip
    assert wrong.returncode != 0, wrong.stdout
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/pipeline.py", "--config", str(tmp_path / "tiny.yaml")]  # fmt: skip
    for _ in range(30):  # the job agent may still be registering right after start-up
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(2)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-5000:]
    assert "succeeded" in logs.lower()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["prepare"]["rows"] == {"train": 72, "validation": 8, "test": 40, "unsup": 10}
    assert summary["stages"]["evaluate"]["rows_scored"] == 40
    assert summary["stages"]["infer"]["rows_scored"] == 10
    assert (out / "train" / "model" / "model.safetensors").exists()
    assert "bertjob pipeline summary" in logs
