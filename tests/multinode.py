"""A real Ray cluster of several nodes on this machine, started the way users start one.

`ray start --head` with token authentication and no CPUs for work (as a KubeRay head), then
`ray start --address ...` per worker node: each its own raylet, object store, temp directory and
custom resource `node_<name>`, in a session of its own, so that `kill` can SIGKILL exactly that
node's processes (the `ray start` process, raylet, agents, its workers). Jobs are run as clients in
subprocesses (`client_env()`), so one test process can hold several clusters in turn. Used by
tests/test_multinode.py and bench scripts; `python -m tests.multinode` starts one by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
DROP = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing is bound to, and never one handed out before: a node's ports are all chosen
    before any component binds them, and the kernel may offer a released port again (a node's
    metrics port was once its agent's, and the node did not start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _agent_ports() -> list[str]:
    """Ports of a node's agents: free ones, as another Ray on this host may hold the defaults."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]  # fmt: skip


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        """Every live process of this node: its session (Ray's workers keep the raylet's session)."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat="], capture_output=True, text=True).stdout
        return [int(p) for p, sid, stat in (line.split() for line in out.splitlines())
                if int(sid) == self.proc.pid and not stat.startswith("Z")]  # fmt: skip


class RayCluster:
    """Head plus worker nodes; `shutdown()` (also on test failure) leaves no process behind."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.shared = root / "shared"  # what every node sees, as NFS would on a real cluster
        self.shared.mkdir(exist_ok=True)
        self.port, self.dashboard_port = free_port(), free_port()
        # Ray's sockets live in its temp directory, and a socket path may have 107 bytes at most.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.nodes: dict[str, Node] = {}
        self.head: Node | None = None
        # As the README says: a token is generated (in a HOME of the cluster's own, so no token of
        # another run is used), and every process of the cluster and its clients uses it.
        # Ray Train finds the state API by RAY_API_SERVER_ADDRESS, else by the file a `ray start`
        # without --temp-dir writes on each node (/tmp/ray/ray_current_cluster): name it.
        self.env = {**{k: v for k, v in os.environ.items() if k not in DROP}, "HOME": str(self.home),
                    "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": self.dashboard,
                    # A job's `python` is the nodes' Python, as on a cluster's image: this venv's,
                    # also when the tests run as .venv/bin/python without activating it.
                    "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
                    # A dead node is declared after 5 missed 1 s health checks (Ray: 5 x 3 s).
                    "RAY_health_check_period_ms": "1000"}  # fmt: skip
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a driver on this cluster (a bertjob command)."""
        return {**self.env, "RAY_ADDRESS": self.address, **extra}

    def _start(self, name: str, args: list[str]) -> Node:
        log = self.root / f"{name}.log"
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                                 f"--temp-dir={self.ray_tmp / name}", *_agent_ports(), *args],
                                env=self.env, start_new_session=True, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT)  # fmt: skip
        return Node(name, proc, log)

    def start_head(self) -> None:
        self.head = self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=true",
                                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                         f"--ray-client-server-port={free_port()}"])  # fmt: skip

    def add_node(self, name: str, cpus: int = 1, wait: bool = True, gpus: int = 0) -> Node:
        """A worker node with `cpus` CPUs, `gpus` GPUs (Ray's resource only: nothing runs on a GPU
        here) and the resource `node_<name>`: 1."""
        assert name not in self.nodes or not self.nodes[name].pids(), f"node {name} is running"
        node = self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                                  f"--resources={json.dumps({f'node_{name}': 1})}",
                                  f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"])  # fmt: skip
        self.nodes[name] = node
        if wait:
            self.wait_for(alive=[name])
        return node

    def wait_for(self, alive: list[str] = (), dead: list[str] = (), timeout: float = 180) -> None:
        """Until the GCS sees these nodes alive / dead (a client polling `ray.nodes()`)."""
        script = (
            "import ray, sys, time, json\n"
            "alive, dead, deadline = json.loads(sys.argv[1]), json.loads(sys.argv[2]), time.time() + float(sys.argv[3])\n"
            "ray.init(logging_level='ERROR')\n"
            "while True:\n"
            "    seen = {k[5:]: n['Alive'] for n in ray.nodes() for k in n['Resources'] if k.startswith('node_')}\n"
            "    if all(seen.get(a) for a in alive) and all(not seen.get(d) for d in dead): break\n"
            "    if time.time() > deadline: sys.exit(f'nodes: {seen}; wanted alive {alive}, dead {dead}')\n"
            "    time.sleep(0.5)\n"
        )
        probe = subprocess.Popen([sys.executable, "-c", script, json.dumps(list(alive)), json.dumps(list(dead)),
                                  str(timeout)], env=self.client_env())  # fmt: skip
        watched = [self.nodes[a] for a in alive] + ([self.head] if self.head else [])
        while probe.poll() is None:
            if gone := [n for n in watched if n.proc.poll() is not None]:
                probe.kill()
                raise RuntimeError(f"node {gone[0].name} exited:\n{gone[0].log.read_text()[-3000:]}")
            time.sleep(0.2)
        if probe.returncode:
            raise RuntimeError(
                f"the cluster's nodes did not come up or go down as expected (see {self.root})"
            )

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of node `name`, until none is left; returns their pids."""
        node = self.nodes[name]
        killed: list[int] = []
        while pids := node.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed += pids
            time.sleep(0.05)  # a raylet may have forked a worker as it died: look again
        node.proc.wait()
        return killed

    def shutdown(self) -> None:
        for node in [*self.nodes.values(), *([self.head] if self.head else [])]:
            if node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGTERM)
        for name in list(self.nodes):
            self.kill(name)
        if self.head:
            self.nodes["head"] = self.head
            self.kill("head")
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


if __name__ == "__main__":  # a cluster by hand: python -m tests.multinode DIR [NODES]
    cluster = RayCluster(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()))
    try:
        cluster.start_head()
        for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
            cluster.add_node(chr(ord("a") + i))
        print(
            f"RAY_ADDRESS={cluster.address} HOME={cluster.home} RAY_AUTH_MODE=token; Ctrl-C stops it",
            flush=True,
        )
        signal.pause()
    finally:
        cluster.shutdown()
