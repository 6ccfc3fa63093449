"""Shared helpers for the benchmarks: machine description, timing a command with its peak memory."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB{gpu}"


def _tree_rss(session: int) -> int:
    """RSS of the process, its descendants, and everything else in its session (Ray's workers
    get process groups of their own but stay in the session)."""
    import psutil

    total = 0
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == session:
                total += p.memory_info().rss
        except (psutil.Error, OSError):
            continue
    return total


def run_measured(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run `cmd` in a new session; wall time and the peak summed RSS of the session's processes.
    A command past `timeout` seconds is killed with its session and fails."""
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
        out, _ = proc.communicate()
        out += f"\n(killed after {timeout:.0f} s)"
    done.set()
    t.join()
    subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)  # leftover Ray processes
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return {"wall_s": time.time() - t0, "peak_rss_gib": peak[0] / 2**30, "output": out}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int | None = None, num_gpus: int = 0) -> Iterator[dict[str, str]]:
    """A running single-node Ray (`ray start --head`, token auth as in the README), in a HOME of its
    own; yields the environment a client needs to use it (RAY_ADDRESS, RAY_AUTH_MODE, HOME). CPUs and
    GPUs are what it tells Ray's scheduler it has (logical), by default this machine's."""
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]  # `ray`, also where Ray lacks its scripts
    with tempfile.TemporaryDirectory() as home:
        drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        env = {**{k: v for k, v in os.environ.items() if k not in drop}, "HOME": home}
        subprocess.run([*ray_cli, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        port = _free_port()
        proc = subprocess.Popen(
            [*ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             f"--num-cpus={num_cpus or os.cpu_count()}", *([f"--num-gpus={num_gpus}"] if num_gpus else []),
             "--include-dashboard=false", "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"}
            deadline = time.time() + 60
            while subprocess.run([*ray_cli, "status"], env=client, capture_output=True).returncode != 0:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("ray start --head did not come up")
                time.sleep(0.5)
            time.sleep(2)  # let the head settle before timing anything on it
            yield client
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
            proc.wait()
