"""From zero worker nodes to what a run needs, on Ray's fake multi-node provider: a GPU pool with use_gpu unset
asks for a GPU, the pre-check waits for the autoscaler instead of failing, and the replica lands on the added node.
More than the node types allow fails with the numbers (at once with autoscaler v2, which reports it; at the
timeout with v1, which does not), and a cluster without an autoscaler fails at once (test_cannot_grow_fails_fast)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoscaling_cluster import LocalAutoscalingCluster  # tests/cluster_resources/autoscaling_cluster.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Fake GPUs: the raylet of a fake node advertises them, which is all scheduling looks at.
GPU_NODE = {"gpu": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}}


def run_driver(cluster: LocalAutoscalingCluster, tmp_path: Path, probe_timeout_s: float) -> dict:
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(HERE / "autoscaling_driver.py"), cluster.address, str(tmp_path / "run"),
                          str(probe_timeout_s)], env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{cluster.head_log()}"
    return {**json.loads(lines[-1][len("RESULT "):]), "stdout": out.stdout}


@pytest.mark.slow
@pytest.mark.parametrize("v2", [False, True], ids=["autoscaler_v1", "autoscaler_v2"])
def test_gpu_pool_scales_from_zero(tmp_path, v2):
    cluster = LocalAutoscalingCluster(head_cpus=1, worker_node_types=GPU_NODE, v2=v2)
    t0 = time.time()
    cluster.start()
    try:
        res = run_driver(cluster, tmp_path, probe_timeout_s=60 if v2 else 3)
        assert res["growth"] == ("v2" if v2 else "v1")
        assert res["gpus_before"] == 0 and res["nodes_before"] == 1
        assert res["uses_gpu"] is True  # use_gpu unset, no GPU yet: still a GPU pool
        assert res["pool"] == {"CPU": 1, "GPU": 1}
        assert "error" not in res, res["error"]
        assert res["need"] == {"CPU": 1.25, "GPU": 1.0}  # the replica + the stage's caller
        assert res["gpus_after"] == 1 and res["nodes_after"] == 2  # one GPU node added
        assert res["replica_on_head"] is False
        assert "[cluster] asked the autoscaler" in res["stdout"]
        assert "[cluster] the autoscaler added what was needed" in res["stdout"]
        # 3 GPUs from a group of at most 2 one-GPU nodes: v2 says so at once; v1 does not say, so its wait ends
        # at the timeout (ray.autoscale_timeout_s; 3 s here). Both name the numbers.
        too_big = res["too_big"]
        assert re.search(r"GPU: need 3, cluster has [12]\b", too_big["error"]), too_big  # v1 may add the 2nd
        if v2:
            assert "cannot grow enough" in too_big["error"] and too_big["s"] < 30, too_big
        else:
            assert "did not add the resources within 3s" in too_big["error"], too_big
    finally:
        cluster.shutdown()
    print(f"autoscaling cluster ({'v2' if v2 else 'v1'}): {time.time() - t0:.0f}s; check {res['check_s']}s; "
          f"too big: {res['too_big']}")


def test_cannot_grow_fails_fast(ray_local):
    """A local cluster has no autoscaler: a GPU it lacks is an immediate error with the numbers, and a pool with
    use_gpu unset stays on CPUs."""
    from crv_ray import cluster_resources
    from crv_ray.config import VLLMEngineConfig
    from crv_ray.engines.vllm_pool import uses_gpu

    assert cluster_resources.growth().can_grow is False
    assert uses_gpu(VLLMEngineConfig(kind="vllm", model="builtin:tiny")) is False
    t0 = time.time()
    with pytest.raises(cluster_resources.ClusterTooSmall, match=r"GPU: need 2, cluster has 0 \(no autoscaler"):
        cluster_resources.ensure({"CPU": 1, "GPU": 2}, subject="the training workers", timeout_s=600)
    assert time.time() - t0 < 5
