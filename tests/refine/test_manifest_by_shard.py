"""The manifest is added up from per-shard summaries: same keys and numbers as the old all-rows computation, on
random trace rows (every branch of the counts) and on committed shards with and without a stored summary."""

import json
import random

import pyarrow as pa
import pytest
from manifest_v0 import summarize_trace as summarize_v0

from crv_ray.config import load_config_dict
from crv_ray.refine.manifest import (SUMMARY_VERSION, _TRACE_COLUMNS, finish_summary, merge_summaries,
                                     shard_summary, summarize_trace, write_manifest)
from crv_ray.refine.state import ROLES_FOR_TOKENS
from crv_ray.refine.store import DATASETS, RefineStore


def random_row(rng: random.Random) -> dict:
    status = rng.choice(["ok", "ok", "ok", "error"])
    orig_status = rng.choice([None, "correct", "wrong", "no_answer", "no_answer", "error"])
    row = {
        "status": status,
        "error_stage": None if status == "ok" else rng.choice(["input", "critic", "no_answer", "verify"]),
        "orig_status": orig_status,
        "orig_correct": rng.choice([True, False, None]),
        "orig_judged": rng.choice([True, False, None]),
        "label": rng.choice([None, "easy", "medium", "hard"]),
        "label_source": rng.choice([None, "critic", "fallback"]),
        "critic_attempts": rng.choice([None, 0, 1, 2, 3]),
        # rounds past max_rounds too: the summary must leave them out exactly as the old code did
        "rounds": rng.choice([None, []] + [[{"round": k, "passed": rng.random() < 0.5} for k in range(1, n + 1)]
                                           for n in (1, 2, 3)]),
        "refined_verified": rng.choice([None, True, False]),
        "aligned_source": rng.choice([None, "original", "refined"]),
        "injected_ok": rng.choice([None, True, False]),
        "student_samples": rng.choice([None, [], [
            {"correct": rng.choice([True, False, None]), "pred": rng.choice([None, "5"]),
             "status": rng.choice(["correct", "wrong", "no_answer", "error"])} for _ in range(rng.randint(1, 3))]]),
        "negative_source": rng.choice([None, "wrong_original", "student_sample", "injected"]),
        "pair_gaps": rng.choice([None, [], ["small"], ["medium", "large"], ["small", "medium", "large"]]),
    }
    for role in ROLES_FOR_TOKENS:
        row[f"tok_in_{role}"] = rng.choice([None, rng.randint(0, 500)])
        row[f"tok_out_{role}"] = rng.choice([None, rng.randint(0, 500)])
    assert set(row) == set(_TRACE_COLUMNS)
    return row


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("on_no_answer", ["judge", "drop", "keep_unverified"])
def test_summed_shards_equal_the_all_rows_summary(seed, on_no_answer):
    rng = random.Random(seed)
    shards = [[random_row(rng) for _ in range(rng.randint(0, 40))] for _ in range(rng.randint(1, 7))]
    rows = [r for s in shards for r in s]
    for max_rounds in (1, 2, 3):
        # JSON round trip: what a done marker stores (string keys, no tuples)
        summaries = [json.loads(json.dumps(shard_summary(s))) for s in shards]
        new = finish_summary(merge_summaries(summaries), max_rounds, on_no_answer)
        old = summarize_v0(rows, max_rounds, on_no_answer)
        assert new == old
        assert summarize_trace(rows, max_rounds, on_no_answer) == old


def test_no_verdict_is_named_by_the_policy_when_the_manifest_is_written():
    row = {c: None for c in _TRACE_COLUMNS}
    row.update(status="error", error_stage="no_answer", orig_status="no_answer")
    s = merge_summaries([shard_summary([row, row])])
    assert finish_summary(s, 1, "judge")["stages"]["check_original"]["no_answer_outcomes"] == {"judge_no_verdict": 2}
    assert finish_summary(s, 1, "drop")["stages"]["check_original"]["no_answer_outcomes"] == {"dropped": 2}


def _cfg(tmp_path):
    return load_config_dict({
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"},
                    "student": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}},
        "roles": {"verifier": {"max_rounds": 2}},
    })


def _commit_random_shards(store: RefineStore, rng: random.Random, n_shards: int, with_summary: bool) -> list[dict]:
    """Trace shards of random rows (the other datasets empty), committed like runner.commit does."""
    rows_all, shards = [], []
    for shard in range(n_shards):
        rows = [random_row(rng) for _ in range(rng.randint(1, 30))]
        rows_all += rows
        shards.append({"shard": shard, "rows": len(rows)})
        tables = {name: pa.table({"x": pa.array([], pa.int64())}) for name in DATASETS}
        tables["trace"] = pa.Table.from_pylist(rows)
        tables["errors"] = pa.table({"x": list(range(sum(r["status"] == "error" for r in rows)))})
        info = {name: tables[name].num_rows for name in DATASETS}
        info.update(shard=shard, committed_at=0.0)
        if with_summary:
            info["summary"] = shard_summary(rows)
        store.commit_shard(shard, tables, info)
    store.write_state({"rows_in": len(rows_all), "shards": shards, "ingested": True})
    return rows_all


def test_manifest_from_markers_and_from_old_shards_without_summaries(tmp_path):
    cfg = _cfg(tmp_path)
    store = RefineStore(cfg.run_dir)
    rows = _commit_random_shards(store, random.Random(7), 5, with_summary=True)
    m = write_manifest(cfg, store)
    old = summarize_v0(rows, 2, cfg.input.on_no_answer)
    assert {k: m[k] for k in old} == old
    rec = m["reconciliation"]
    n_err = sum(r["status"] == "error" for r in rows)
    assert rec["trace_rows"] == len(rows) and rec["trace_error"] == n_err and rec["trace_ok"] == len(rows) - n_err
    assert rec["balanced"] and rec["complete"]

    # Markers written before summaries existed: computed from the trace file once, then stored in the marker.
    for s in range(5):
        info = store.done_info(s)
        del info["summary"]
        store.done_marker(s).write_text(json.dumps(info))
    m2 = write_manifest(cfg, store)
    for key in ("created_at", "packages"):
        m.pop(key), m2.pop(key)
    assert m2 == m
    assert all(store.done_info(s)["summary"]["version"] == SUMMARY_VERSION for s in range(5))


def test_write_manifest_reads_markers_not_trace_rows(tmp_path, monkeypatch):
    """With summaries in the markers, no trace file is opened (the driver's memory does not grow with rows)."""
    cfg = _cfg(tmp_path)
    store = RefineStore(cfg.run_dir)
    _commit_random_shards(store, random.Random(3), 3, with_summary=True)
    import crv_ray.refine.manifest as manifest

    def no_reads(*a, **k):
        raise AssertionError("write_manifest read a trace file")

    monkeypatch.setattr(manifest.storage, "read_table", no_reads)
    assert write_manifest(cfg, store)["reconciliation"]["complete"]
