"""Connecting to Ray (bertjob/cluster.py)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
    proc = subprocess.run(
        cmd, env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bertjob: error: RAY_ADDRESS=") and address in last and says in last, last
    assert last.endswith("or unset RAY_ADDRESS to run on a local Ray")


def test_a_local_rays_workers_reach_its_state_api_whatever_cluster_was_there_before():
    """Ray Train's placement-group cleaner asks the state API from a worker, which finds it as a driver
    would: RAY_ADDRESS, else the ray_current_cluster file that a killed cluster leaves in Ray's temp
    directory. Naming a dead cluster, every train run ended late, with an RpcError from Ray."""
    script = """
import ray
from ray.util.state import list_nodes
from bertjob.cluster import init_ray

init_ray()
print(len(ray.get(ray.remote(lambda: list_nodes(timeout=10)).remote())), "node")
"""
    with tempfile.TemporaryDirectory(dir="/tmp") as temp:  # short: Ray's sockets are made under it
        (Path(temp) / "ray").mkdir()
        (Path(temp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
        proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RAY_TMPDIR": temp},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "1 node", proc.stderr[-2000:]
