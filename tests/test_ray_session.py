"""Which Ray cluster a command joins: ray.address, else RAY_ADDRESS (what Ray Jobs and KubeRay set), else a new
local one; checked against a real `ray start --head` cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crv_ray.config import load_config
from crv_ray.ray_session import cluster_address

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "tiny_scripted.yaml"


def test_address_order(monkeypatch):
    cfg = load_config(CONFIG)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(cfg) == (None, "local")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address(cfg) == ("10.0.0.5:6379", "RAY_ADDRESS")
    assert cluster_address(load_config(CONFIG, ["ray.address=ray://head:10001"])) == ("ray://head:10001",
                                                                                     "ray.address")
    # `ray job submit` users point RAY_ADDRESS at the dashboard: not a driver's address, and the error says so.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ValueError, match=r"RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard.*crv-ray submit"):
        cluster_address(cfg)


# In a fresh interpreter, as a command (or a Ray job's entrypoint) runs: which cluster init_ray ends up on.
PROBE = """
import json, ray
from crv_ray.config import load_config
from crv_ray.ray_session import init_ray
init_ray(load_config({config!r}, ["ray.num_cpus=1"]))
print("PROBE", json.dumps({{"gcs": ray.get_runtime_context().gcs_address, "cpus": ray.cluster_resources()["CPU"],
                          "nodes": len(ray.nodes())}}))
ray.shutdown()
"""


def _probe(env: dict) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(config=str(CONFIG))], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE ")), out.stdout


@pytest.mark.slow
def test_joins_ray_address_else_starts_a_local_cluster(ray_head):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    joined, stdout = _probe({**env, "RAY_ADDRESS": ray_head["gcs_address"]})
    # Ray names the head by the machine's IP rather than 127.0.0.1: the same GCS, by its port.
    assert joined["gcs"].rsplit(":", 1)[1] == str(ray_head["gcs_port"])
    assert joined["cpus"] == 6  # the head's --num-cpus, not the config's ray.num_cpus (that sizes a local Ray only)
    assert f"joining the Ray cluster at {ray_head['gcs_address']} (from RAY_ADDRESS)" in stdout
    # Neither set: a private local cluster, even with a `ray start` cluster running on this machine.
    local, stdout = _probe(env)
    assert local["gcs"].rsplit(":", 1)[1] != str(ray_head["gcs_port"])
    assert (local["cpus"], local["nodes"]) == (1, 1)
    assert "joining" not in stdout
