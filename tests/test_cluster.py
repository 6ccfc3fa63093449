"""Connecting to Ray (bertjob/cluster.py)."""

import json
import os
import subprocess
import sys

from tests.multinode import free_port


def test_a_ray_address_where_no_cluster_answers_is_one_error_at_once(tmp_path, tiny_classifier_dir):
    """A RAY_ADDRESS with a typo, or left exported after its cluster stopped: ray.init retried it for
    minutes, printing only its own connection warnings. Now the command ends at once, saying so."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "great fun"}) + "\n")
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "bertjob", "infer", "--input", str(tmp_path / "c.jsonl"), "--model", tiny_classifier_dir,
           "--output", str(tmp_path / "scored")]  # fmt: skip
    proc = subprocess.run(
        cmd, env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bertjob: error: RAY_ADDRESS={address}: no Ray cluster answers there (")
    assert last.endswith("or unset RAY_ADDRESS to run on a local Ray")
