"""`crv-ray status`: each stage's state (done / partial / missing) read from the markers a run directory holds.

Only the completion markers count, the same ones the stages themselves trust: a refine shard is done once its commit
marker exists, a training stage once its export marker does, eval once summary.json is written. Nothing here starts
Ray or loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from crv_ray.run_paths import (EVAL_DONE, EVAL_SUMMARY, TRAIN_MARKER, RunPaths, stage_checkpoints,
                               stage_metrics, stage_model)

DONE, PARTIAL, MISSING = "done", "partial", "missing"


def _entry(state: str, detail: str) -> dict:
    return {"state": state, "detail": detail}


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def refine_status(paths: RunPaths) -> dict:
    from crv_ray.refine.store import RefineStore

    store = RefineStore(paths.root)
    if not store.state_path.is_file():
        return _entry(MISSING, "not started")
    done, total = store.committed_shards()
    committed = f"{len(done)} of {total} shards committed"
    if total == 0:
        return _entry(PARTIAL, "started, input not ingested yet")
    if len(done) < total:
        return _entry(PARTIAL, committed)
    if not store.manifest_path.is_file():
        return _entry(PARTIAL, f"{committed}; {paths.refine_manifest.name} not written yet")
    rec = json.loads(store.manifest_path.read_text()).get("reconciliation", {})
    counts = ", ".join(f"{rec[k]} {k.removesuffix('_rows')}" for k in ("sft_rows", "pairs_rows", "errors_rows")
                       if k in rec)
    return _entry(DONE, committed + (f" ({counts})" if counts else ""))


def train_status(stage_dir: Path) -> dict:
    """sft, cogpo or a variant: done once the export marker is written; partial while checkpoints or metrics exist."""
    marker = stage_model(stage_dir) / TRAIN_MARKER
    steps = _count_lines(stage_metrics(stage_dir))
    if marker.is_file():
        return _entry(DONE, f"model exported to {stage_model(stage_dir)} ({steps} logged steps)")
    if not stage_dir.exists():
        return _entry(MISSING, "not started")
    checkpoints = stage_checkpoints(stage_dir)
    what = [f"{steps} logged steps"] + (["checkpoints kept"] if checkpoints.is_dir() and any(checkpoints.iterdir())
                                        else [])
    return _entry(PARTIAL, f"no exported model yet ({', '.join(what)}); rerun to resume")


def eval_status(eval_dir: Path) -> dict:
    summary = eval_dir / EVAL_SUMMARY
    done = sorted(eval_dir.glob(f"*/*/{EVAL_DONE}"))
    if summary.is_file():
        results = json.loads(summary.read_text()).get("results", [])
        return _entry(DONE, f"{len(results)} (model, benchmark) results in {summary.name}")
    if done:
        return _entry(PARTIAL, f"{len(done)} (model, benchmark) pairs done, {summary.name} not written yet")
    return _entry(MISSING, "not started")


def run_status(run_dir: str | Path, variants: list[str] | tuple[str, ...] = ()) -> dict[str, dict]:
    """{stage: {"state": done|partial|missing, "detail": ...}} in run order. `variants` (the config's
    train.cogpo_variants names) are listed even before they start; variant folders on disk are listed too. A run
    directory that does not exist yet has every stage missing."""
    paths = RunPaths(run_dir)
    on_disk = sorted(p.name for p in paths.variants.iterdir() if p.is_dir()) if paths.variants.is_dir() else []
    status = {
        "refine": refine_status(paths),
        "sft": train_status(paths.sft),
        "cogpo": train_status(paths.cogpo),
    }
    for name in dict.fromkeys([*variants, *on_disk]):
        status[f"variant {name}"] = train_status(paths.stage_dir(name))
    status["eval"] = eval_status(paths.eval)
    report = paths.report
    status["report"] = _entry(DONE, str(report)) if report.is_file() else _entry(MISSING, "not written")
    return status


def format_status(run_dir: str | Path, status: dict[str, dict]) -> str:
    width = max(len(k) for k in status)
    lines = [f"run {run_dir}"]
    lines += [f"  {stage:<{width}}  {e['state']:<7}  {e['detail']}" for stage, e in status.items()]
    return "\n".join(lines)
