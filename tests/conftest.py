"""Shared, session-scoped fixtures: built-in models (built once into the default cache) and a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports transformers, vLLM or Ray: no hub, a small vLLM KV cache, quiet tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """`builtin:tiny` in the default cache (CRV_RAY_CACHE or ~/.cache/crv-ray), so reruns reuse it."""
    from crv_ray.models.builtin import resolve_model

    return resolve_model("builtin:tiny")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """`builtin:smollm2-135m` in the default cache; the first build takes about 30 s."""
    from crv_ray.models.builtin import resolve_model

    return resolve_model("builtin:smollm2-135m")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto, `crv_ray.testing.S3Server`) with one bucket for the session: `.endpoint`,
    `.bucket`, `.env`, `.uri(path)`. Its AWS_* variables are set in os.environ for the session, before any Ray
    cluster of the session starts (`ray_local` depends on this fixture), so Ray workers inherit them."""
    from crv_ray.testing import S3Server

    server = S3Server().start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A private local Ray cluster for the session (its workers see the `s3_server` environment).

    address="local" never joins a cluster someone else started on this machine. num_cpus=6 oversubscribes the
    2 real cores on purpose: ray.data.llm pipelines need about 3 logical CPUs and hang silently with fewer.
    """
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_started():
    """A Ray cluster for one training test module, unless one is already up (then it is reused, not stopped)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """A real `ray start --head` cluster (GCS and dashboard on free ports, dashboard on 127.0.0.1), as a user starts
    one; stopped after the session by ending only the processes this fixture started (never `ray stop`, which
    would stop every Ray on the machine). Its own temp dir keeps `ray.init()` elsewhere from finding it."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.error
    import urllib.request

    # Every fixed default port on free ones: other Ray clusters on the machine hold 10001 (client) and 52365 (agent).
    gcs_port, dash_port, client_port, agent_port = _free_port(), _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="crvray-")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `crv-ray` for job entrypoints
    # A token in ~/.ray/auth_token would switch token auth on here (not in CI), and drivers given an explicit address
    # do not pick it up: the same, unauthenticated cluster everywhere.
    env["RAY_AUTH_MODE"] = "disabled"
    # 6 logical CPUs on 2 cores, as in ray_local: the engine pools and 2 training workers fit.
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={agent_port}", "--num-cpus=6", "--num-gpus=0", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray_start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    dashboard = f"http://127.0.0.1:{dash_port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{dashboard}/api/version", timeout=5):
                break
        except urllib.error.HTTPError:  # it answers (token auth may refuse an anonymous request): it is up
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"ray start --head did not come up: {log_path.read_text()[-3000:]}")
            time.sleep(1)
    yield {"gcs_address": f"127.0.0.1:{gcs_port}", "gcs_port": gcs_port, "dashboard": dashboard}
    # SIGTERM to `ray start --block` stops the processes it started; then the group, for anything left over.
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
