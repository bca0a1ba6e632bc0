"""A multi-node Ray cluster on this one machine: a head and worker nodes, each a `ray start --block` process with its
own temp dir and node name, in its own process group.

Why not `ray.cluster_utils.Cluster`: it writes and later deletes /tmp/ray/ray_current_cluster (the file a plain
`ray.init()` of any other session on the machine would then join), and its nodes live inside the test process.
Here a node dies as a real one does: SIGKILL to its process group takes its raylet, object store and workers at
once (never `ray stop`, which would end every Ray of the machine). The test process reads the node table from the
GCS without joining the cluster (the session's own Ray may be initialised in it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
# A killed node is declared dead after ~period * threshold (the default is ~15 s): the tests wait for that.
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
                      "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "4"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`start_head()`, `add_node(name)`, `kill_node(name)`, `alive()`, `shutdown()`. `env` is given to every node's
    processes (Ray workers inherit their raylet's environment); `node_env[name]` adds per-node variables."""

    def __init__(self, env: dict[str, str] | None = None, object_store_mb: int = 100):
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Token auth would be on for `ray start` clusters where ~/.ray/auth_token exists; drivers join without one.
        self.env.update(RAY_AUTH_MODE="disabled", **FAST_HEALTH_CHECKS, **(env or {}))
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.object_store = str(object_store_mb * 2**20)
        self.root = Path(tempfile.mkdtemp(prefix="crvmn", dir="/tmp"))  # short: socket paths must stay < 108 chars
        self.procs: dict[str, subprocess.Popen] = {}
        self.address: str | None = None
        self._state = None

    # -- nodes
    def _start(self, name: str, args: list[str], extra_env: dict[str, str]) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        cmd = [RAY, "start", "--block", f"--node-name={name}", f"--temp-dir={temp_dir}",
               f"--object-store-memory={self.object_store}", f"--dashboard-agent-listen-port={free_port()}",
               "--disable-usage-stats", *args]
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(cmd, env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def start_head(self, num_cpus: int, resources: str = "{}", env: dict[str, str] | None = None,
                   timeout_s: float = 120) -> str:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._start("head", ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                             "--num-gpus=0", f"--resources={resources}", "--include-dashboard=false",
                             f"--ray-client-server-port={free_port()}"], env or {})
        self.wait_alive({"head"}, timeout_s)
        return self.address

    def add_node(self, name: str, num_cpus: int, resources: str = "{}", env: dict[str, str] | None = None,
                 timeout_s: float = 120) -> None:
        assert self.address is not None, "start_head first"
        self._start(name, [f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                           "--num-gpus=0", f"--resources={resources}"], env or {})
        self.wait_alive(self.alive() | {name}, timeout_s)

    def kill_node(self, name: str, timeout_s: float = 60) -> None:
        """SIGKILL every process of the node at once, then wait until the GCS has declared it dead."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + timeout_s
        while name in self.alive():
            if time.time() > deadline:
                raise TimeoutError(f"node {name} still alive {timeout_s:.0f}s after SIGKILL")
            time.sleep(0.2)

    # -- state
    def nodes(self) -> list[dict]:
        import ray._private.state
        from ray._raylet import GcsClientOptions

        if self._state is None:
            self._state = ray._private.state.GlobalState()
            self._state._initialize_global_state(GcsClientOptions.create(
                self.address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
        return self._state.node_table()

    def alive(self) -> set[str]:
        try:
            return {n["NodeName"] for n in self.nodes() if n["Alive"]}
        except Exception:  # noqa: BLE001 - the GCS is still starting
            return set()

    def wait_alive(self, names: set[str], timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while self.alive() != names:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"nodes {sorted(names)} did not come up (alive: {sorted(self.alive())}, exited: "
                                   f"{dead}):\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.root.glob("*.log"))

    def shutdown(self) -> None:
        # The whole process group of each node at once (as kill_node): a graceful `ray start` stop takes ~30 s per
        # node and leaves nothing the group kill does not take too. Worker nodes first, the head (GCS) last.
        for name in sorted(self.procs, key=lambda n: n == "head"):
            proc = self.procs.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
