"""Driver run by test_autoscaling.py in its own process (the test session's Ray stays untouched): joins the
autoscaling cluster at argv[1], runs the refine pre-check for a GPU pool with use_gpu unset, then places the pool's
replica actor, then asks for more GPUs than the
node types allow; prints one JSON line of what it saw."""

import json
import sys
import time

import ray

from crv_ray.config import load_config_dict
from crv_ray.engines.vllm_pool import pool_resources, uses_gpu


def main(address: str, run_dir: str, probe_timeout_s: float) -> None:
    for _ in range(60):  # the head is still starting
        try:
            ray.init(address=address, log_to_driver=False)
            break
        except (ConnectionError, RuntimeError):
            time.sleep(1)
    from crv_ray import cluster_resources
    from crv_ray.refine.pipeline import RefineError, check_resources
    from crv_ray.refine.roles import build_stages

    for _ in range(30):  # the autoscaler's first report
        if cluster_resources.growth().can_grow:
            break
        time.sleep(0.5)
    cfg = load_config_dict({
        "run_dir": run_dir,
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "engines": {"agent": {"kind": "vllm", "model": "builtin:tiny", "replicas": 1},
                    "student": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}},
        "refine": {"mode": "staged"},
        "ray": {"autoscale_timeout_s": 60},
    })
    out = {"growth": cluster_resources.growth().autoscaler, "gpus_before": ray.cluster_resources().get("GPU", 0),
           "nodes_before": len([n for n in ray.nodes() if n["Alive"]]),
           "uses_gpu": uses_gpu(cfg.engines["agent"]), "pool": pool_resources(cfg.engines["agent"])}
    t0 = time.time()
    try:
        out["need"] = check_resources(cfg, build_stages(cfg))
    except RefineError as e:
        out["error"] = str(e)
    out["check_s"] = round(time.time() - t0, 1)
    out["gpus_after"] = ray.cluster_resources().get("GPU", 0)
    out["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
    if "error" not in out:
        # The pool's replica shape (VLLMPool.start: num_gpus=1, cpus_per_replica) lands on the added node.
        @ray.remote(num_gpus=1, num_cpus=cfg.engines["agent"].cpus_per_replica)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
        out["replica_on_head"] = ray.get(where.remote(), timeout=60) in head
        # More GPUs than the GPU group's max_workers allow.
        t0 = time.time()
        try:
            cluster_resources.ensure({"GPU": 3.0}, subject="the probe", timeout_s=probe_timeout_s)
        except cluster_resources.ClusterTooSmall as e:
            out["too_big"] = {"error": str(e), "s": round(time.time() - t0, 1)}
    out["growth_after"] = cluster_resources.growth().autoscaler
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
