"""Read a run directory into plain dicts for the report (pure: files in, data out; no plotting, no HTML).

Every section is either its data or `{"missing": "<why>"}`, so a report of a half-finished run still renders and
says what is absent instead of failing. A file that exists but cannot be read gives a reason naming the file.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean

import pyarrow as pa
import pyarrow.compute as pc
from crv_ray import storage

from crv_ray.refine.pairs import GAPS
from crv_ray.refine.store import RefineStore
from crv_ray.run_paths import EVAL_SUMMARY, RunPaths, stage_metrics
from crv_ray.train.api import read_metrics

# Display order of the eval arms and critic labels; names not listed follow in the order they appear.
MODEL_ORDER = ("base", "sft", "dpo", "cogpo")
LABEL_ORDER = ("easy", "medium", "hard", "error")
# Trace columns the CoT-length section needs (a subset of crv_ray.refine.assemble.TRACE_SCHEMA).
_LENGTH_COLUMNS = ["status", "label", "cot", "refined_cot", "refined_verified", "aligned_cot", "aligned_source"]


def ordered(names, order) -> list:
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def _rel(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def read_json(path: Path, run_dir: Path) -> tuple[dict | None, str | None]:
    """(data, None), or (None, reason) when the file is absent or unreadable."""
    if not path.is_file():
        return None, f"no {_rel(path, run_dir)}"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{_rel(path, run_dir)} is not valid JSON: {e}"
    if not isinstance(data, dict):
        return None, f"{_rel(path, run_dir)} is not a JSON object"
    return data, None


def read_metrics_file(stage_dir: Path, run_dir: Path) -> tuple[list[dict] | None, str | None]:
    """A training stage's metrics.jsonl entries by step, read by the training code's own reader."""
    path = stage_metrics(stage_dir)
    if not path.is_file():
        return None, f"no {_rel(path, run_dir)}"
    try:
        metrics = read_metrics(stage_dir)
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{_rel(path, run_dir)} is not JSON lines with a step each: {e!r}"
    if not metrics:
        return None, f"{_rel(path, run_dir)} is empty"
    return metrics, None


# --------------------------------------------------------------------------------------------- sections


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are left out (the rounds have their own section)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def header_section(manifest: dict | None) -> dict:
    if manifest is None:
        return {}
    return {"config_hash": manifest.get("config_hash"), "refine_created_at": manifest.get("created_at"),
            "packages": manifest.get("packages") or {}, "reconciliation": manifest.get("reconciliation") or {},
            "shards": manifest.get("shards") or {}, "stage_counts": flatten(manifest.get("stages") or {})}


def refine_sections(manifest: dict | None, why: str | None) -> dict[str, dict]:
    """critic labels, verifier rounds, negatives, pairs: the manifest's summaries of the trace."""
    if manifest is None:
        return {k: {"missing": why} for k in ("labels", "rounds", "negatives", "pairs")}
    stages = manifest.get("stages") or {}

    def counts(key: str, empty: str, order=()) -> dict:
        if key not in manifest:
            return {"missing": f"refine/manifest.json has no {key!r}"}
        c = manifest[key] or {}
        if not c:
            return {"missing": empty}
        return {"counts": {k: c[k] for k in ordered(c, order)}, "total": sum(c.values())}

    labels = counts("critic_labels", "no row got a critic label", LABEL_ORDER)
    if "counts" in labels:
        labels["fallback"] = (stages.get("critic") or {}).get("fallback_labels")
        ok_rows = (stages.get("check_original") or {}).get("rows")
        labels["unlabelled"] = ok_rows - labels["total"] if ok_rows is not None else None
    rounds_data = stages.get("rethink_verify")
    if rounds_data is None:
        rounds = {"missing": "refine/manifest.json has no stages.rethink_verify"}
    elif not any(r.get("rethought") for r in rounds_data):
        rounds = {"missing": "no CoT was rethought (every row was labelled medium with a correct original)"}
    else:
        rounds = {"rounds": rounds_data}
    return {"labels": labels, "rounds": rounds,
            "negatives": counts("negatives", "no row got a negative CoT"),
            "pairs": counts("pairs_by_gap", "refine built no preference pairs", GAPS)}


def cot_length_stats(rows: list[dict]) -> list[dict]:
    """Per critic label: mean CoT lengths before and after rethinking, from rows with status, label,
    refined_verified and the lengths cot_len, refined_len, aligned_len (None where that CoT is absent).

    `aligned_*` compares the original with the aligned CoT (the SFT target) on the rows that have one, so a
    medium label (original kept) shows equal bars; `rewrite_*` is over rows with a verified rewrite only.
    """
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["cot_len"] is not None:
            by_label[r["label"] or "(no label)"].append(r)
    out = []
    for label in ordered(by_label, LABEL_ORDER):
        rs = by_label[label]
        aligned = [r for r in rs if r["aligned_len"]]
        rewritten = [r for r in rs if r["refined_verified"] and r["refined_len"]]
        out.append({
            "label": label, "rows": len(rs),
            "original_mean": mean(r["cot_len"] for r in rs),
            "aligned_rows": len(aligned),
            "aligned_original_mean": mean(r["cot_len"] for r in aligned) if aligned else None,
            "aligned_mean": mean(r["aligned_len"] for r in aligned) if aligned else None,
            "rewrite_rows": len(rewritten),
            "rewrite_original_mean": mean(r["cot_len"] for r in rewritten) if rewritten else None,
            "rewrite_mean": mean(r["refined_len"] for r in rewritten) if rewritten else None,
        })
    return out


def read_trace_lengths(trace_dir: Path, run_dir: Path) -> tuple[list[dict] | None, str | None]:
    """Trace rows with CoT lengths in characters instead of the texts (computed in Arrow: traces can be large)."""
    files = sorted(trace_dir.glob("*.parquet")) if trace_dir.is_dir() else []
    if not files:
        return None, f"no trace shards in {_rel(trace_dir, run_dir)}/"
    rows: list[dict] = []
    for f in files:
        try:
            names = set(storage.read_schema(f).names)
            absent = [c for c in _LENGTH_COLUMNS if c not in names]
            if absent:
                return None, f"{_rel(f, run_dir)} has no column(s) {absent}"
            t = storage.read_table(f, columns=_LENGTH_COLUMNS)
        except (OSError, pa.ArrowException) as e:
            return None, f"{_rel(f, run_dir)} is not readable Parquet: {e}"
        small = t.select(["status", "label", "refined_verified"])
        for col, name in (("cot", "cot_len"), ("refined_cot", "refined_len"), ("aligned_cot", "aligned_len")):
            small = small.append_column(name, pc.utf8_length(t[col]))
        rows.extend(small.to_pylist())
    return rows, None


def lengths_section(trace_dir: Path, run_dir: Path) -> dict:
    rows, why = read_trace_lengths(trace_dir, run_dir)
    if rows is None:
        return {"missing": why}
    stats = cot_length_stats(rows)
    if not stats:
        return {"missing": "the trace has no successful row with a CoT"}
    return {"unit": "characters", "by_label": stats}


def sft_section(metrics: list[dict] | None, why: str | None) -> dict:
    if metrics is None:
        return {"missing": why}
    pts = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    if not pts:
        return {"missing": "sft/metrics.jsonl has no loss values"}
    return {"loss": {"SFT loss": pts}}


def cogpo_section(metrics: list[dict] | None, why: str | None, manifest: dict | None) -> dict:
    if metrics is None:
        pairs = ((manifest or {}).get("reconciliation") or {}).get("pairs_rows")
        if pairs == 0:
            return {"missing": "CogPO was skipped: refine produced no preference pairs"}
        return {"missing": why}
    keys = {k for m in metrics for k in m}
    gaps = ordered([k.split("/", 2)[2] for k in sorted(keys) if k.startswith("rewards/margins/")], GAPS)

    def series(key: str) -> list[tuple[int, float]]:
        # Per-gap values are absent on steps whose batch had no pair of that gap (not zero).
        return [(m["step"], m[key]) for m in metrics if m.get(key) is not None]

    out = {"loss": {"CogPO loss": series("loss")},
           "margins": {g: series(f"rewards/margins/{g}") for g in gaps},
           "accuracies": {g: series(f"rewards/accuracies/{g}") for g in gaps}}
    for name, key in (("margins", "rewards/margins"), ("accuracies", "rewards/accuracies")):
        if key in keys:
            out[name]["all pairs"] = series(key)
    return out


def eval_section(summary: dict | None, why: str | None) -> dict:
    if summary is None:
        return {"missing": why}
    results = summary.get("results")
    if not isinstance(results, list) or not results:
        return {"missing": "eval/summary.json has no results"}
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not r.get("model") or not r.get("benchmark"):
            return {"missing": f"eval/summary.json results[{i}] has no model or benchmark"}
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in results))
    models = ordered((r["model"] for r in results), MODEL_ORDER)
    rank = {m: i for i, m in enumerate(models)}
    rows = sorted(results, key=lambda r: (benchmarks.index(r["benchmark"]), rank[r["model"]]))
    # pass@1 per (benchmark, model) for the chart; None where a model was not evaluated on a benchmark.
    pass1 = {m: [next((r.get("pass@1") for r in rows if r["model"] == m and r["benchmark"] == b), None)
                 for b in benchmarks] for m in models}
    groups = []
    for b in benchmarks:
        dims: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
        for r in rows:
            if r["benchmark"] != b:
                continue
            for dim, by_key in (r.get("groups") or {}).items():
                for key, g in (by_key or {}).items():
                    dims[dim][str(key)][r["model"]] = g
        for dim, by_key in dims.items():
            keys = sorted(by_key, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
            groups.append({"benchmark": b, "dimension": dim, "group_keys": keys, "cells": by_key})
    return {"created_at": summary.get("created_at"), "benchmarks": benchmarks, "models": models, "rows": rows,
            "pass1": pass1, "groups": groups}


def collect(run_dir: str | Path) -> dict:
    """Everything the report shows, as plain data."""
    run_dir = storage.as_path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    paths = RunPaths(run_dir)
    store = RefineStore(run_dir)

    def absent_means(why: str | None, path: Path, meaning: str) -> str | None:
        # An absent file means the stage has not run; a present but unreadable one is its own reason.
        return f"{why} ({meaning})" if why and not path.exists() else why

    manifest, manifest_why = read_json(store.manifest_path, run_dir)
    manifest_why = absent_means(manifest_why, store.manifest_path, "refine has not finished")
    sft_metrics, sft_why = read_metrics_file(paths.sft, run_dir)
    sft_why = absent_means(sft_why, stage_metrics(paths.sft), "SFT has not run")
    cogpo_metrics, cogpo_why = read_metrics_file(paths.cogpo, run_dir)
    cogpo_why = absent_means(cogpo_why, stage_metrics(paths.cogpo), "CogPO has not run")
    summary, eval_why = read_json(paths.eval / EVAL_SUMMARY, run_dir)
    eval_why = absent_means(eval_why, paths.eval / EVAL_SUMMARY, "the eval stage has not run")
    return {
        "run_dir": str(run_dir.resolve()),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "header": header_section(manifest),
        "header_missing": manifest_why,
        **refine_sections(manifest, manifest_why),
        "lengths": lengths_section(store.dataset_dir("trace"), run_dir),
        "sft": sft_section(sft_metrics, sft_why),
        "cogpo": cogpo_section(cogpo_metrics, cogpo_why, manifest),
        "eval": eval_section(summary, eval_why),
    }
