"""`crv-ray refine`: resume-aware driver of the refine stage (ingest, pending shards, run, commit, manifest)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from crv_ray import storage
from crv_ray.config import RunConfig
from crv_ray.data.fingerprint import fingerprint_changes, input_fingerprint
from crv_ray.engines import EnginePools
from crv_ray.refine.assemble import assemble_shard
from crv_ray.refine.manifest import table_summary, write_manifest
from crv_ray.refine.pipeline import (
    CriticFallbackGuard,
    RefineError,
    check_resources,
    ingest,
    required_local_cpus,
    run_staged,
    run_streaming,
)
from crv_ray.refine.roles import build_stages
from crv_ray.refine.store import DATASETS, RefineStore
from crv_ray.ray_session import init_ray, quiet_ray_data  # noqa: F401 - their home before crv_ray.ray_session
from crv_ray.run_paths import RunPaths
from crv_ray.storage import AnyPath

log = logging.getLogger("crv_ray.refine")


@dataclass
class RefineResult:
    run_dir: AnyPath
    manifest: dict
    shards_run: int
    shards_skipped: int

    def path(self, name: str) -> AnyPath:
        return RunPaths(self.run_dir).refine / name


class ConfigChanged(RefineError):
    pass


class InputChanged(RefineError):
    pass


def _check_config(cfg: RunConfig, store: RefineStore) -> None:
    state = store.read_state()
    if state is None or state.get("config_hash") == cfg.refine_hash():
        return
    if state.get("config_hash") == cfg.legacy_refine_hash():
        # Written by a crv-ray whose hash also covered runtime knobs: the same config, so adopt the new hash.
        log.info("refine: %s was written under the older config hash %s; now %s (same config)", store.root,
                 state["config_hash"], cfg.refine_hash())
        state["config_hash"] = cfg.refine_hash()
        store.write_state(state)
        return
    policy = cfg.refine.on_config_change
    if policy == "restart":
        log.warning("refine config changed (%s -> %s): removing old refine outputs", state.get("config_hash"),
                    cfg.refine_hash())
        store.reset()
    elif policy == "continue":
        log.warning("refine config changed; continuing with old shards kept (refine.on_config_change=continue)")
        state.setdefault("previous_config_hashes", []).append(state["config_hash"])
        state["config_hash"] = cfg.refine_hash()
        store.write_state(state)
    else:
        raise ConfigChanged(
            f"{store.root} holds outputs of a different config (hash {state.get('config_hash')}, now "
            f"{cfg.refine_hash()}). Use another run_dir, or set refine.on_config_change=restart (discard them) "
            "or =continue (keep them and mix)."
        )


def check_input(cfg: RunConfig, store: RefineStore) -> None:
    """An input edited after ingest refuses to mix with the shards of its old rows (refine.on_config_change=restart
    or --restart starts over); a run directory from before fingerprints gets one now."""
    state = store.read_state()
    if state is None or not state.get("ingested"):
        return
    old = state.get("input_fingerprint")
    if cfg.input.source == "file" and not storage.as_path(cfg.input.path).exists():  # type: ignore[arg-type]
        # The ingested rows are all a resume needs; there is just nothing to compare them with.
        log.warning("refine: input %s is gone; resuming from the rows ingested before", cfg.input.path)
        return
    new = input_fingerprint(cfg.input, previous=old)
    changes = fingerprint_changes(old, new) if old is not None else []
    if not changes:
        if new != old:  # first fingerprint of an old run directory, or mtimes that moved with the same bytes
            state["input_fingerprint"] = new
            store.write_state(state)
        return
    listed = "; ".join(changes[:10]) + (f"; and {len(changes) - 10} more" if len(changes) > 10 else "")
    if cfg.refine.on_config_change == "restart":
        log.warning("refine: the input changed since it was ingested (%s): removing old refine outputs", listed)
        store.reset()
        return
    raise InputChanged(
        f"the input changed since it was ingested into {store.root}: {listed}. Its rows were cut into shards when "
        "they were first read, and refine outputs of the old rows must not be mixed with new ones: rerun with "
        "--restart (refine.on_config_change=restart) to discard them and ingest again, or use another run_dir "
        "(refine.on_config_change=continue does not apply to an edited input)."
    )


def run_refine(cfg: RunConfig) -> RefineResult:
    storage.check_access(cfg.run_dir)
    store = RefineStore(cfg.run_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    _check_config(cfg, store)
    check_input(cfg, store)
    t_start = time.time()
    state = ingest(cfg, store)
    shards = state["shards"]
    pending = [s for s in shards if not store.is_done(s["shard"])]
    if cfg.refine.max_shards_per_run is not None:
        pending = pending[: cfg.refine.max_shards_per_run]
    skipped = len(shards) - len([s for s in shards if not store.is_done(s["shard"])])
    log.info("refine: %d rows in %d shard(s); %d done, %d to run (%s mode)", state["rows_in"], len(shards),
             skipped, len(pending), cfg.refine.mode)
    # s.get: shards ingested before the no_answer count existed may need the judge.
    stages = build_stages(cfg, judge_original=any(s.get("no_answer", 1) for s in pending))
    config_hash = cfg.refine_hash()
    done_now = 0
    critic_guard = CriticFallbackGuard(cfg)

    def commit(shard: int, by_problem: dict) -> None:
        nonlocal done_now
        critic_guard(shard, [rows[0] for rows in by_problem.values()])  # raises before a bad first shard commits
        tables = assemble_shard(cfg, by_problem, config_hash)
        info = {name: tables[name].num_rows for name in DATASETS}
        # The manifest adds these up instead of reading every trace row back.
        info.update(shard=shard, committed_at=time.time(), summary=table_summary(tables["trace"]))
        store.commit_shard(shard, tables, info)
        done_now += 1
        elapsed = time.time() - t_start
        print(f"[refine] shard {shard} committed ({info['trace']} rows: {info['sft']} sft, {info['pairs']} pairs, "
              f"{info['errors']} errors); {done_now}/{len(pending)} this run, {elapsed:.0f}s", flush=True)

    if pending:
        init_ray(cfg, required_local_cpus(cfg))
        check_resources(cfg, stages)
        t0 = time.time()
        pools = EnginePools(cfg, cfg.refine.startup_timeout_s)
        try:
            if cfg.refine.mode == "streaming":
                stage_walls = run_streaming(cfg, store, stages, pending, commit, pools)
            else:
                stage_walls = run_staged(cfg, store, stages, pending, commit, pools, critic_guard=critic_guard)
        finally:
            pools.close()
        state = store.read_state() or state
        state.setdefault("runs", []).append({"mode": cfg.refine.mode, "shards": len(pending),
                                             "wall_s": round(time.time() - t0, 3), "started_at": t_start,
                                             "stage_wall_s": stage_walls, "engine_pools": pools.stats()})
        store.write_state(state)
    manifest = write_manifest(cfg, store)
    return RefineResult(storage.as_path(cfg.run_dir), manifest, shards_run=len(pending), shards_skipped=skipped)
