"""Turning a problem's finished working rows into its trace, sft, pairs and errors rows (pure), and their schemas.

Output schemas (Arrow/Parquet), one file per shard under refine/<name>/:
- trace:  one row per input row, every stage's output, keyed by problem_id (see TRACE_SCHEMA).
- sft:    problem_id, prompt, response (the aligned CoT), aligned_source (refined|original), label.
- pairs:  pair_id, problem_id, prompt, chosen, rejected, gap (small|medium|large), rejected_source. No beta: it is
          resolved from the gap at train time (train.cogpo.gap_betas).
- errors: problem_id, source (file:line), stage, reason, problem, answer_raw, cot.
Responses, chosen and rejected are in `refine.response_format` (keep | strip_think | wrap_think; response_format.py).
"""

from __future__ import annotations

import functools
import json

import pyarrow as pa

from crv_ray.config import RunConfig
from crv_ray.refine.pairs import build_pairs, choose_negative, select_aligned
from crv_ray.refine.response_format import format_response
from crv_ray.refine.roles import original_is_positive
from crv_ray.refine.state import ROLES_FOR_TOKENS, ROUND_FIELDS, round_col

ROUND_STRUCT = pa.struct([pa.field("round", pa.int64())] + [pa.field(k, t) for k, t in ROUND_FIELDS.items()])
SAMPLE_STRUCT = pa.struct([("index", pa.int64()), ("text", pa.string()), ("pred", pa.string()), ("correct", pa.bool_()),
                           ("status", pa.string())])

TRACE_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()), ("shard", pa.int64()), ("source", pa.string()),
        ("status", pa.string()), ("error_stage", pa.string()), ("error", pa.string()),
        ("problem", pa.string()), ("answer", pa.string()), ("answer_raw", pa.string()), ("cot", pa.string()),
        ("prompt", pa.string()),
        ("orig_status", pa.string()), ("orig_reason", pa.string()), ("orig_pred", pa.string()),
        ("orig_correct", pa.bool_()), ("orig_check", pa.string()), ("orig_judged", pa.bool_()),
        ("orig_judge_raw", pa.string()),
        ("label", pa.string()), ("label_source", pa.string()), ("critic_attempts", pa.int64()),
        ("critic_raw", pa.list_(pa.string())),
        ("rounds", pa.list_(ROUND_STRUCT)),
        ("refined_cot", pa.string()), ("refined_verified", pa.bool_()), ("rounds_used", pa.int64()),
        ("aligned_cot", pa.string()), ("aligned_source", pa.string()),
        ("injected_raw", pa.string()), ("injected_cot", pa.string()), ("injected_pred", pa.string()),
        ("injected_ok", pa.bool_()),
        ("student_samples", pa.list_(SAMPLE_STRUCT)),
        ("negative_cot", pa.string()), ("negative_source", pa.string()),
        ("pair_gaps", pa.list_(pa.string())),
        ("critic_model", pa.string()), ("rethinker_model", pa.string()), ("verifier_model", pa.string()),
        ("injector_model", pa.string()), ("student_model", pa.string()),
    ]
    + [(f"tok_{d}_{r}", pa.int64()) for r in ROLES_FOR_TOKENS for d in ("in", "out")]
    + [("config_hash", pa.string())]
)
SFT_SCHEMA = pa.schema([("problem_id", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
                        ("aligned_source", pa.string()), ("label", pa.string())])
PAIRS_SCHEMA = pa.schema([("pair_id", pa.string()), ("problem_id", pa.string()), ("prompt", pa.string()),
                          ("chosen", pa.string()), ("rejected", pa.string()), ("gap", pa.string()),
                          ("rejected_source", pa.string())])
ERRORS_SCHEMA = pa.schema([("problem_id", pa.string()), ("source", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string()), ("problem", pa.string()), ("answer_raw", pa.string()),
                           ("cot", pa.string())])
SCHEMAS = {"trace": TRACE_SCHEMA, "sft": SFT_SCHEMA, "pairs": PAIRS_SCHEMA, "errors": ERRORS_SCHEMA}

# Config names negative sources by what is enabled; pair building names each candidate.
_SOURCE_NAMES = {"wrong_original": "wrong_original", "student_samples": "student_sample", "injected": "injected"}


def engine_model(cfg: RunConfig, engine: str | None) -> str | None:
    if engine is None or engine not in cfg.engines:
        return None
    return cfg.engines[engine].model


def assemble_problem(cfg: RunConfig, rows: list[dict], config_hash: str) -> dict:
    """rows: the working rows of one problem (one, or one per student sample). Returns the output rows."""
    base = dict(rows[0])
    samples = sorted((r for r in rows if r.get("sample_index") is not None), key=lambda r: r["sample_index"])
    for r in rows:  # token counts of student samples live on each sample's row
        if r is not rows[0]:
            base["tok_in_student"] = (base.get("tok_in_student") or 0) + (r.get("tok_in_student") or 0)
            base["tok_out_student"] = (base.get("tok_out_student") or 0) + (r.get("tok_out_student") or 0)
    failed = base.get("error") is not None

    rounds = []
    for rnd in range(1, cfg.roles.verifier.max_rounds + 1):
        if base.get(round_col(rnd, "mode")) is None and base.get(round_col(rnd, "cot")) is None:
            continue
        rounds.append({"round": rnd, **{k: base.get(round_col(rnd, k)) for k in ROUND_FIELDS}})

    aligned, aligned_source = (None, None)
    negative, negative_source, pairs = None, None, []
    if not failed:
        # Every text that can become a response, chosen or rejected gets the same format, before pairs are deduped.
        fmt = functools.partial(format_response, mode=cfg.refine.response_format)
        original = fmt(base.get("cot"))
        # A no_answer original is never a negative; it is a positive only when judged correct or kept unverified.
        positive = original_is_positive(base)
        aligned, aligned_source = select_aligned(base.get("label"), positive,
                                                 fmt(base.get("refined_cot")), bool(base.get("refined_verified")),
                                                 original_cot=original)
        candidates: list[tuple[str, str]] = []
        if base.get("orig_correct") is False:
            candidates.append(("wrong_original", original))
        for s in samples:
            if s.get("student_raw") and s.get("student_pred") is not None and s.get("student_correct") is False:
                candidates.append(("student_sample", fmt(s["student_raw"])))
        if base.get("injected_ok"):
            candidates.append(("injected", fmt(base["injected_cot"])))
        order = [_SOURCE_NAMES[s] for s in cfg.negatives.sources]
        negative, negative_source = choose_negative(candidates, order)
        pairs = build_pairs(base["problem_id"], base["student_prompt"], original, positive,
                            base.get("label"), aligned, aligned_source, negative,
                            gaps=cfg.pairs.gaps, original_verified=base.get("orig_correct") is True)
        for p in pairs:
            p["rejected_source"] = "original" if p["gap"] == "small" else negative_source

    trace = {k: base.get(k) for k in TRACE_SCHEMA.names if k in base}
    trace.update(
        prompt=base.get("student_prompt"),
        status="error" if failed else "ok",
        critic_raw=json.loads(base["critic_raw"]) if base.get("critic_raw") else [],
        rounds=rounds,
        aligned_cot=aligned, aligned_source=aligned_source,
        student_samples=[{"index": s["sample_index"], "text": s.get("student_raw"), "pred": s.get("student_pred"),
                          "correct": s.get("student_correct"), "status": s.get("student_status")} for s in samples],
        negative_cot=negative, negative_source=negative_source,
        pair_gaps=[p["gap"] for p in pairs],
        critic_model=engine_model(cfg, cfg.roles.critic.engine),
        rethinker_model=engine_model(cfg, cfg.roles.rethinker.engine),
        verifier_model=engine_model(cfg, cfg.roles.verifier.engine) if cfg.roles.verifier.llm_judge else None,
        injector_model=engine_model(cfg, cfg.negatives.injector.engine) if "injected" in cfg.negatives.sources else None,
        student_model=cfg.student.model,
        config_hash=config_hash,
    )
    out = {"trace": trace, "sft": None, "pairs": pairs, "errors": None}
    if failed:
        out["errors"] = {"problem_id": base["problem_id"], "source": base.get("source"),
                         "stage": base.get("error_stage"), "reason": base.get("error"),
                         "problem": base.get("problem"), "answer_raw": base.get("answer_raw"), "cot": base.get("cot")}
    elif aligned is not None:
        out["sft"] = {"problem_id": base["problem_id"], "prompt": base["student_prompt"], "response": aligned,
                      "aligned_source": aligned_source, "label": base.get("label")}
    return out


def assemble_shard(cfg: RunConfig, rows_by_problem: dict[str, list[dict]], config_hash: str) -> dict[str, pa.Table]:
    trace, sft, pairs, errors = [], [], [], []
    for pid in sorted(rows_by_problem):
        out = assemble_problem(cfg, rows_by_problem[pid], config_hash)
        trace.append(out["trace"])
        pairs.extend(out["pairs"])
        if out["sft"] is not None:
            sft.append(out["sft"])
        if out["errors"] is not None:
            errors.append(out["errors"])
    data = {"trace": trace, "sft": sft, "pairs": pairs, "errors": errors}
    return {name: pa.Table.from_pylist([{k: r.get(k) for k in SCHEMAS[name].names} for r in rows], schema=SCHEMAS[name])
            for name, rows in data.items()}
