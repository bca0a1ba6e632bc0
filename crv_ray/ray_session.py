"""Ray session set-up for every command: which cluster to join (or start), and Ray's console noise.

Which cluster, in order: `ray.address` from the config; else the `RAY_ADDRESS` environment variable (what Ray Jobs
and KubeRay set for a job's entrypoint); else a private local cluster. Never whichever `ray start` cluster happens
to run on the machine: `ray.init()` without an address would join that one.
"""

from __future__ import annotations

import logging
import os

from crv_ray import console
from crv_ray.config import RunConfig

log = logging.getLogger("crv_ray.ray")


def quiet_ray_data() -> None:
    """Ray Data logs every operator's progress every few seconds; crv-ray prints one line per stage and shard
    instead. `crv-ray -v` keeps Ray's logs."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... and would then warn "Progress bars disabled" about the choice made just above.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def cluster_address(cfg: RunConfig) -> tuple[str | None, str]:
    """(address to join or None for a local cluster, where it came from). A dashboard URL in RAY_ADDRESS (what
    `ray job submit` users set) is not a driver's address and is refused with what to use instead."""
    if cfg.ray.address:
        return cfg.ray.address, "ray.address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if not env:
        return None, "local"
    if env.startswith(("http://", "https://")):
        raise ValueError(f"RAY_ADDRESS={env} is a dashboard (job submission) address: submit with "
                         "`crv-ray submit CONFIG --address " + env + "`, or set RAY_ADDRESS to the cluster's GCS "
                         "address (host:6379) or ray://host:10001 to run this command as a driver")
    return env, "RAY_ADDRESS"


def init_ray(cfg: RunConfig, need_cpus: int | None = None) -> None:
    """Join the configured cluster (ray.address, else RAY_ADDRESS), or start a local one with enough logical CPUs
    for the role pools."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address, source = cluster_address(cfg)
    if address is not None:
        print(f"[ray] joining the Ray cluster at {address} (from {source})", flush=True)
        ray.init(address=address, log_to_driver=True)
    else:
        # Engine actors and the stage actors that wait on them reserve logical CPUs they mostly sleep on:
        # oversubscribing a small machine is what lets them all start (with 2 logical CPUs a pipeline waits forever).
        cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, need_cpus or 0)
        log.info("starting a local Ray cluster with %d logical CPUs (no ray.address, no RAY_ADDRESS)", cpus)
        ray.init(address="local", num_cpus=cpus, num_gpus=cfg.ray.num_gpus,
                 include_dashboard=cfg.ray.include_dashboard, dashboard_host=cfg.ray.dashboard_host,
                 log_to_driver=False)
    console.after_ray_init()
