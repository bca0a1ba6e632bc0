"""The run's stages in order (refine -> sft -> cogpo -> eval), each reading the previous one's
datasets from the run directory and skipped when its outputs are complete for the same config."""

from __future__ import annotations

import time
from pathlib import Path

from crv_ray.config import RunConfig
from crv_ray.run_paths import RunPaths, stage_checkpoints, stage_metrics, stage_model
from crv_ray.storage import as_path, check_access


def stage_paths(cfg: RunConfig | str | Path) -> dict[str, Path]:
    """Where each stage writes, from a config or a run directory (`crv-ray report` has only the latter); the layout
    itself is crv_ray.run_paths."""
    run = RunPaths(cfg.run_dir if isinstance(cfg, RunConfig) else cfg)
    return {
        "refine": run.refine,
        "sft_data": run.refine_dataset("sft"),
        "pairs": run.refine_dataset("pairs"),
        "sft": run.sft,
        "cogpo": run.cogpo,
        "variants": run.variants,
        "eval": run.eval,
    }


def model_dir(cfg: RunConfig, name: str) -> Path:
    """Where a trained model of the run is exported: sft, cogpo or a cogpo variant's name."""
    return RunPaths(cfg.run_dir).model(name)


def _student_dir(cfg: RunConfig) -> Path:
    from crv_ray.engines import resolved_model_path

    p = as_path(resolved_model_path(cfg.student.model))
    if not p.exists():
        raise ValueError(f"student.model {cfg.student.model!r}: no such model directory")
    return p


def check_refine_complete(cfg: RunConfig, allow_partial: bool = False) -> None:
    """Training reads only committed refine shards (crv_ray.train.data.list_parquet_files); a refine that has not
    committed every shard is refused unless `allow_partial`, so a model is never trained on part of the data
    unknowingly."""
    from crv_ray.refine.store import RefineStore

    store = RefineStore(cfg.run_dir)
    done, total = store.committed_shards()
    if total == 0 or len(done) == total:
        return  # no refine state: the missing-data errors below name what to run
    msg = f"refine at {store.root} is incomplete: {len(done)} of {total} shards committed"
    if not allow_partial:
        raise ValueError(f"{msg}. Rerun `crv-ray refine` to finish it, or pass --allow-partial to train on the "
                         "committed shards only.")
    print(f"[train] warning: {msg}; training on the committed shards only (--allow-partial)", flush=True)


def run_train_stage(cfg: RunConfig, stage: str, allow_partial: bool = False) -> dict[str, Path]:
    """`crv-ray train sft|cogpo`: one training stage from the refine datasets in the run directory (committed
    shards only; an incomplete refine is refused unless `allow_partial`)."""
    from crv_ray.ray_session import init_ray
    from crv_ray.train import api

    paths = stage_paths(cfg)
    check_access(cfg.run_dir)  # a bucket that cannot be used fails here, named, before Ray starts
    check_refine_complete(cfg, allow_partial)
    init_ray(cfg)
    _check_train_resources(cfg)
    if stage == "sft":
        if not paths["sft_data"].exists():
            raise ValueError(f"no SFT data at {paths['sft_data']}: run `crv-ray refine` first")
        model = api.run_sft(cfg.train, _student_dir(cfg), paths["sft_data"], paths["sft"])
        return {"sft model": model, "metrics": stage_metrics(paths["sft"]),
                "checkpoints": stage_checkpoints(paths["sft"])}
    if stage == "cogpo":
        sft_model = stage_model(paths["sft"])
        if not sft_model.exists():
            raise ValueError(f"no SFT model at {sft_model}: run `crv-ray train sft` first")
        if not paths["pairs"].exists():
            raise ValueError(f"no pairs at {paths['pairs']}: run `crv-ray refine` first")
        model = api.run_cogpo(cfg.train, sft_model, paths["pairs"], paths["cogpo"])
        return {"cogpo model": model, "metrics": stage_metrics(paths["cogpo"]),
                "checkpoints": stage_checkpoints(paths["cogpo"])}
    if stage in cfg.train.cogpo_variants:
        return _run_variant(cfg, stage)
    raise ValueError(f"unknown training stage {stage!r} (sft, cogpo or a train.cogpo_variants name: "
                     f"{sorted(cfg.train.cogpo_variants)})")


def _check_train_resources(cfg: RunConfig) -> None:
    """Ray Train waits for its workers' placement group without end on a cluster that cannot hold them; fail with
    the numbers instead, or let an autoscaler add the nodes first."""
    from crv_ray.cluster_resources import ensure
    from crv_ray.train.api import worker_resources

    n = cfg.train.scaling.num_workers
    shape = worker_resources(cfg.train)
    need = {k: v * n for k, v in shape.items()}
    ensure(need, subject="the training workers", what={k: f"{n} worker(s) (train.scaling)" for k in need},
           timeout_s=cfg.ray.autoscale_timeout_s, shape=shape,
           hint="lower train.scaling.num_workers or cpus_per_worker, or use a bigger cluster")


def _run_variant(cfg: RunConfig, name: str) -> dict[str, Path]:
    """A cogpo variant: same SFT model and pairs, other cogpo settings (its workers score the pairs with the SFT
    model for its own length settings and precision)."""
    from crv_ray.train import api
    from crv_ray.train.config import variant_config

    paths = RunPaths(cfg.run_dir)
    train = variant_config(cfg.train, name)
    out_dir = paths.stage_dir(name)
    sft_model = paths.model("sft")
    if not sft_model.exists():
        raise ValueError(f"no SFT model at {sft_model}: run `crv-ray train sft` first")
    model = api.run_cogpo(train, sft_model, paths.refine_dataset("pairs"), out_dir)
    return {f"{name} model": model, f"{name} metrics": stage_metrics(out_dir)}


def run_all(cfg: RunConfig) -> dict[str, Path]:
    from crv_ray.eval.runner import eval_engine, run_eval_stage
    from crv_ray.refine.runner import run_refine

    t0 = time.time()
    paths = RunPaths(cfg.run_dir)
    if cfg.eval.enabled:
        eval_engine(cfg)  # a bad eval.engine fails now, not after training
    print(f"[run] 1/3 refine -> {paths.refine}", flush=True)
    res = run_refine(cfg)
    rec = res.manifest["reconciliation"]
    if not rec["complete"]:
        raise RuntimeError(f"refine is incomplete ({res.manifest['shards']}); rerun to resume")
    if rec["sft_rows"] == 0:
        raise RuntimeError("refine produced no SFT rows: nothing to train on (see refine/manifest.json)")
    print(f"[run] 2/3 sft ({rec['sft_rows']} rows) -> {paths.sft}  [{time.time() - t0:.0f}s]", flush=True)
    out = {"refine trace": res.path("trace"), "sft data": res.path("sft"), "pairs": res.path("pairs"),
           "errors": res.path("errors"), "manifest": res.path("manifest.json")}
    out.update(run_train_stage(cfg, "sft"))
    if rec["pairs_rows"] == 0:
        print("[run] no preference pairs: CogPO skipped", flush=True)
    else:
        print(f"[run] 3/3 cogpo ({rec['pairs_rows']} pairs) -> {paths.cogpo}  [{time.time() - t0:.0f}s]",
              flush=True)
        out.update(run_train_stage(cfg, "cogpo"))
        for name in cfg.train.cogpo_variants:
            print(f"[run] cogpo variant {name} -> {paths.stage_dir(name)}  [{time.time() - t0:.0f}s]",
                  flush=True)
            out.update(run_train_stage(cfg, name))
    print(f"[run] eval -> {paths.eval}  [{time.time() - t0:.0f}s]", flush=True)
    out.update(run_eval_stage(cfg))
    out.update(write_run_report(cfg))
    print(f"[run] done in {time.time() - t0:.0f}s", flush=True)
    return out


def write_run_report(cfg: RunConfig) -> dict[str, Path]:
    """`<run_dir>/report.html` at the end of a run. The run's outputs are complete by then, so a failing report
    (a missing plotting library, an odd file) is a printed warning with its reason, never a failed run."""
    try:
        from crv_ray.report import write_report

        path = write_report(cfg.run_dir)
    except Exception as e:  # noqa: BLE001 - any report error must leave the finished run successful
        print(f"[run] warning: no report written: {type(e).__name__}: {e}", flush=True)
        return {}
    print(f"[run] report -> {path}", flush=True)
    return {"report": path}
