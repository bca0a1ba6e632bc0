"""The fused row steps between engine calls (`dataflow.run_row_steps`), as a pure function on Arrow blocks."""

from __future__ import annotations

import json

import pyarrow as pa

from crv_ray.config import load_config_dict
from crv_ray.engines.columns import (MESSAGES, OUT_ERROR, OUT_PROMPT_TOKENS, OUT_REPLY, OUT_TOKENS, SEED, SKIP,
                                     request_schema)
from crv_ray.refine.dataflow import _apply_step, _prepare_step, run_row_steps
from crv_ray.refine.roles import student_stage
from crv_ray.refine.state import empty_state, state_schema, to_table

SCHEMA = state_schema(1)
CALL_SCHEMA = request_schema(SCHEMA)


def _cfg(tmp_path):
    engine = {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}
    return load_config_dict({
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "synthetic"},
        "engines": {"agent": engine, "student": engine},
        "roles": {"verifier": {"max_rounds": 1}},
        "negatives": {"student": {"k": 3, "sampling": {"seed": 100}}},
    })


def _rows() -> list[dict]:
    alive = {**empty_state(1), "problem_id": "p1", "shard": 0, "problem": "1+1?", "answer": "2",
             "student_prompt": "Solve: 1+1?", "orig_status": "correct", "orig_correct": True}
    dead = {**empty_state(1), "problem_id": "p2", "shard": 0, "error_stage": "input", "error": "no answer field"}
    return [alive, dead]


def test_fanout_and_prepare_in_one_pass_keep_types(tmp_path):
    spec = student_stage(_cfg(tmp_path))
    out = run_row_steps(to_table(_rows(), SCHEMA), [spec.fanout, _prepare_step(spec)], CALL_SCHEMA)
    assert out.schema == CALL_SCHEMA
    rows = out.to_pylist()
    # p1 becomes k=3 samples with their own seeds; the failed p2 stays one row that calls nothing.
    assert [(r["problem_id"], r["sample_index"], r["sample_copies"]) for r in rows] == [
        ("p1", 0, 3), ("p1", 1, 3), ("p1", 2, 3), ("p2", None, 1)]
    assert [r[SKIP] for r in rows] == [False, False, False, True]
    # Seeds keep the schema's int64 (a row-wise map inferred each block's types; vLLM rejects float seeds).
    assert out.schema.field(SEED).type == pa.int64()
    assert [r[SEED] for r in rows] == [100, 101, 102, 100]
    assert json.loads(rows[0][MESSAGES]) == [{"role": "user", "content": "Solve: 1+1?"}]
    assert rows[3][MESSAGES] is None


def test_apply_reads_the_reply_columns_and_drops_them(tmp_path):
    spec = student_stage(_cfg(tmp_path))
    calls = run_row_steps(to_table(_rows()[:1], SCHEMA), [spec.fanout, _prepare_step(spec)], CALL_SCHEMA)
    # What the pool's caller returns: the state columns and SKIP, plus the reply columns.
    replies = calls.select(SCHEMA.names + [SKIP])
    for name, values, typ in ((OUT_REPLY, ["so 2.\n\\boxed{2}", "\\boxed{3}", None], pa.string()),
                              (OUT_TOKENS, [7, 4, 0], pa.int64()), (OUT_PROMPT_TOKENS, [5, 5, 0], pa.int64()),
                              (OUT_ERROR, [None, None, "engine died"], pa.string())):
        replies = replies.append_column(name, pa.array(values, typ))
    out = run_row_steps(replies, [_apply_step(spec)], SCHEMA)
    assert out.schema == SCHEMA
    rows = out.to_pylist()
    assert [r["student_correct"] for r in rows] == [True, False, None]
    assert [r["student_raw"] for r in rows] == ["so 2.\n\\boxed{2}", "\\boxed{3}", None]
    assert [r["tok_out_student"] for r in rows] == [7, 4, 0]
    assert [r["tok_in_student"] for r in rows] == [5, 5, 0]
