"""The per-problem working row that flows through the refine stages, with a fixed Arrow schema.

Every row carries every column from the start (None until a stage fills it), so blocks from different stages,
shards and reruns always share one schema. Columns for rethink-verify rounds are unrolled: r1_*, r2_*, ...
"""

from __future__ import annotations

import pyarrow as pa

ROLES_FOR_TOKENS = ("critic", "rethinker", "verifier", "injector", "student")

BASE_COLUMNS: dict[str, pa.DataType] = {
    "problem_id": pa.string(),
    "shard": pa.int64(),
    "source": pa.string(),  # file:line or file:rowN of the input row
    "problem": pa.string(),
    "answer": pa.string(),  # normalised gold answer
    "answer_raw": pa.string(),
    "cot": pa.string(),  # original teacher CoT
    # The student's prompt (the `prompt` column of sft and pairs). Not named "prompt": ray.data.llm writes its
    # own templated "prompt" into every row that passes an engine stage.
    "student_prompt": pa.string(),
    "error_stage": pa.string(),
    "error": pa.string(),
    # original CoT check (crv_ray.answers.check_answer); see roles.check_original
    "orig_status": pa.string(),  # correct | wrong | no_answer | error
    "orig_reason": pa.string(),  # why no_answer / error
    "orig_pred": pa.string(),
    "orig_correct": pa.bool_(),  # True: correct or judged correct; False: wrong; None: no_answer (never wrong)
    "orig_check": pa.string(),  # how the answer was extracted and compared
    "orig_judged": pa.bool_(),  # input.on_no_answer=judge: the judge's verdict on a no_answer original
    "orig_judge_raw": pa.string(),
    # critic
    "critic_raw": pa.string(),  # JSON list of raw replies, one per attempt
    "critic_attempts": pa.int64(),
    "label": pa.string(),
    "label_source": pa.string(),  # critic | fallback
    # outcome of the rounds
    "refined_cot": pa.string(),
    "refined_verified": pa.bool_(),
    "rounds_used": pa.int64(),
    # error injection (negative source 3)
    "injected_raw": pa.string(),
    "injected_cot": pa.string(),
    "injected_pred": pa.string(),
    "injected_ok": pa.bool_(),
    # student sampling (negative source 2); one working row per sample, merged per problem on commit
    "sample_index": pa.int64(),
    "sample_copies": pa.int64(),
    "student_raw": pa.string(),
    "student_pred": pa.string(),
    "student_status": pa.string(),  # correct | wrong | no_answer | error
    "student_correct": pa.bool_(),  # None unless the answer was found (only a wrong one is a negative)
}
for _role in ROLES_FOR_TOKENS:
    BASE_COLUMNS[f"tok_in_{_role}"] = pa.int64()
    BASE_COLUMNS[f"tok_out_{_role}"] = pa.int64()

ROUND_FIELDS: dict[str, pa.DataType] = {
    "mode": pa.string(),  # easy (extend) | hard (simplify) | repair
    "rethink_raw": pa.string(),
    "cot": pa.string(),
    "rule_pred": pa.string(),
    "rule_ok": pa.bool_(),
    "rule_status": pa.string(),  # correct | wrong | no_answer | error
    "rule_reason": pa.string(),
    "judge_raw": pa.string(),
    "judge_pass": pa.bool_(),
    "reason": pa.string(),
    "passed": pa.bool_(),
}


def round_col(r: int, field: str) -> str:
    return f"r{r}_{field}"


def state_schema(max_rounds: int) -> pa.Schema:
    fields = [pa.field(k, t) for k, t in BASE_COLUMNS.items()]
    for r in range(1, max_rounds + 1):
        fields += [pa.field(round_col(r, k), t) for k, t in ROUND_FIELDS.items()]
    return pa.schema(fields)


def empty_state(max_rounds: int) -> dict:
    row = {name: None for name in state_schema(max_rounds).names}
    for role in ROLES_FOR_TOKENS:
        row[f"tok_in_{role}"] = 0
        row[f"tok_out_{role}"] = 0
    return row


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows -> table with exactly `schema` (missing keys are null, extra keys dropped)."""
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
