"""What each refine stage does to one working row: which rows need a call, the messages, and how a reply lands.

Pure functions of (config, row, reply); the Ray glue in `pipeline.py` only maps them over datasets. A stage is
described by a `StageSpec`: `prepare(row) -> messages | None` (None = no call for this row) and
`apply(row, reply, error) -> row`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from crv_ray.answers import check_answer
from crv_ray.config import RunConfig, Sampling
from crv_ray.refine.guards import find_leak, leak_reason
from crv_ray.refine.pairs import select_aligned
from crv_ray.refine.parsing import LABELS, extract_rewrite, parse_label, parse_verdict
from crv_ray.refine.prompts import render_messages
from crv_ray.refine.state import round_col

Messages = list[dict]
# The verifier's reply format (verifier.j2), enforced where the engine supports structured output.
VERDICT_REGEX = r"VERDICT: (PASS|FAIL)\nREASON: [^\n]{1,300}"


@dataclass
class Reply:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    skipped: bool = False  # prepare() returned None: no call was made


@dataclass
class StageSpec:
    name: str
    role: str  # for token accounting: critic | rethinker | verifier | injector | student
    engine: str | None  # engine name; None for CPU-only stages
    sampling: Sampling | None = None
    structured: dict | None = None  # vLLM structured_outputs (choice / regex), where the engine supports it
    prepare: Callable[[dict], Messages | None] | None = None
    apply: Callable[[dict, Reply], dict] | None = None
    fanout: Callable[[dict], list[dict]] | None = None  # one row -> several (student samples)
    apply_on_skip: bool = False  # call apply() also for rows that needed no engine call
    extra: dict = field(default_factory=dict)


def alive(row: dict) -> bool:
    return row.get("error") is None


def _account(row: dict, role: str, reply: Reply) -> None:
    row[f"tok_in_{role}"] = (row.get(f"tok_in_{role}") or 0) + int(reply.prompt_tokens or 0)
    row[f"tok_out_{role}"] = (row.get(f"tok_out_{role}") or 0) + int(reply.completion_tokens or 0)


def _fail(row: dict, stage: str, reason: str) -> dict:
    row["error_stage"] = stage
    row["error"] = reason
    return row


# ------------------------------------------------------------------ original CoT check + context fit (CPU)
def check_cot(cfg: RunConfig | None, cot: str | None, gold: str):
    """check_answer with the run's `answers` settings (extra patterns, timeout)."""
    if cfg is None:
        return check_answer(cot, gold)  # type: ignore[arg-type]
    return check_answer(cot, gold, patterns=cfg.answers.patterns, timeout_s=cfg.answers.timeout_s)  # type: ignore[arg-type]


def check_original(row: dict, cfg: RunConfig | None = None) -> dict:
    """Sets orig_status (correct | wrong | no_answer | error), orig_correct and the policy for no_answer.

    orig_correct is True / False only for a found answer (or a judged one, later); a no_answer original keeps
    None, so it is never taken for wrong (no repair, no negative). input.on_no_answer=drop and a failed check
    (a timeout) end the row here, with the reason.
    """
    if not alive(row) or row.get("orig_status") is not None:
        return row
    res = check_cot(cfg, row["cot"], row["answer"])
    row["orig_status"], row["orig_reason"] = res.status, res.reason
    row["orig_pred"], row["orig_check"] = res.predicted, res.method
    row["orig_correct"] = {"correct": True, "wrong": False}.get(res.status)
    if res.status == "error":
        return _fail(row, "check_original", f"the answer check of the original CoT failed: {res.reason}")
    if res.status == "no_answer" and cfg is not None and cfg.input.on_no_answer == "drop":
        return _fail(row, "no_answer", f"{res.reason} (input.on_no_answer=drop)")
    return row


def original_is_positive(row: dict) -> bool:
    """The original may be a positive (SFT, chosen): correct, judged correct, or kept unverified."""
    return row.get("orig_correct") is True or (row.get("orig_status") == "no_answer" and row.get("orig_correct") is None)


class OriginalCheck:
    """Answer-checks the original CoT and quarantines rows whose prompts cannot fit an engine's context.

    A callable class so each Ray worker loads the engines' tokenizers once. Engines without a known context
    length or tokenizer (scripted, openai without max_model_len) are not checked here; their errors land per row.
    """

    def __init__(self, cfg: RunConfig):
        from crv_ray.engines import prompt_token_counter

        self.cfg = cfg
        self.checks = []
        for role, rc, template in (("critic", cfg.roles.critic, "critic"), ("rethinker", cfg.roles.rethinker, None)):
            counter = prompt_token_counter(cfg, rc.engine)
            if counter is not None:
                self.checks.append((role, rc, template, *counter))

    def _messages(self, role: str, template: str | None, row: dict) -> Messages:
        cfg = self.cfg
        fields = dict(problem=row["problem"], answer=row["answer"], cot=row["cot"], student_name=cfg.student.name,
                      student_size=cfg.student.size)
        if role == "critic":
            return render_messages("critic", cfg.roles.critic.prompt, **fields)
        rc = cfg.roles.rethinker
        return render_messages("rethink_easy", rc.prompt_easy or rc.prompt, feedback=None, previous=None, **fields)

    def __call__(self, row: dict) -> dict:
        row = check_original(dict(row), self.cfg)  # usually done at ingest already (see pipeline.ingest)
        if not alive(row):
            return row
        for role, rc, template, count, max_len in self.checks:
            n = count(self._messages(role, template, row))
            if n + rc.sampling.max_tokens > max_len:
                return _fail(row, "context", f"the {role} prompt has {n} tokens; with max_tokens "
                             f"{rc.sampling.max_tokens} it exceeds engine {rc.engine!r} max_model_len {max_len} "
                             "(CoT too long for the engine's context)")
        return row


# ------------------------------------------------------------------ critic
def critic_stage(cfg: RunConfig, attempt: int) -> StageSpec:
    c = cfg.roles.critic
    last = attempt == c.max_parse_retries
    sampling = c.sampling
    if attempt > 0:
        # A greedy retry would repeat the same reply: retries sample, with a fresh seed.
        sampling = sampling.model_copy(update={"temperature": max(sampling.temperature, 0.7),
                                               "seed": (sampling.seed or 0) + attempt})

    def prepare(row: dict) -> Messages | None:
        # A wrong original is repaired whatever its label, and never aligned: its label would go unused.
        if not alive(row) or row.get("label") is not None or row.get("orig_correct") is False:
            return None
        return render_messages("critic", c.prompt, problem=row["problem"], answer=row["answer"], cot=row["cot"],
                               student_name=cfg.student.name, student_size=cfg.student.size)

    def apply(row: dict, reply: Reply) -> dict:
        _account(row, "critic", reply)
        raws = json.loads(row["critic_raw"]) if row.get("critic_raw") else []
        raws.append(reply.text if reply.error is None else f"<error: {reply.error}>")
        row["critic_raw"] = json.dumps(raws)
        row["critic_attempts"] = len(raws)
        label = parse_label(reply.text) if reply.error is None else None
        if label is not None:
            row["label"], row["label_source"] = label, "critic"
        elif last and reply.error is not None:
            return _fail(row, "critic", f"engine error after {len(raws)} attempt(s): {reply.error[:500]}")
        elif last:
            # label_source "fallback" marks the row for the run's fallback-rate check, error row or not.
            row["label_source"] = "fallback"
            if c.fallback_label == "error":
                shown = (reply.text or reply.error or "")[:200]
                return _fail(row, "critic", f"no parseable label after {len(raws)} attempt(s); last reply: {shown!r}")
            row["label"] = c.fallback_label
        return row

    return StageSpec(name=f"critic_a{attempt}", role="critic", engine=c.engine, sampling=sampling,
                     structured={"choice": list(LABELS)}, prepare=prepare, apply=apply)


# ------------------------------------------------------------------ rethink / verify rounds
def needs_rethink(cfg: RunConfig, row: dict, r: int) -> bool:
    if not alive(row) or row.get("refined_verified"):
        return False
    if r == 1:
        # False only for an answer found and wrong: a no_answer original (None) is never repaired as wrong.
        if row.get("orig_correct") is False:
            return cfg.roles.rethinker.repair_wrong_original
        return row.get("label") in ("easy", "hard")
    return row.get(round_col(r - 1, "passed")) is False


def rethink_stage(cfg: RunConfig, r: int) -> StageSpec:
    rc = cfg.roles.rethinker
    overrides = {"easy": rc.prompt_easy, "hard": rc.prompt_hard, "repair": rc.prompt_repair}

    def mode(row: dict) -> str:
        if row.get("orig_correct") is False:
            return "repair"
        return "easy" if row.get("label") == "easy" else "hard"

    def prepare(row: dict) -> Messages | None:
        if not needs_rethink(cfg, row, r):
            return None
        m = mode(row)
        fields = dict(problem=row["problem"], answer=row["answer"], cot=row["cot"], student_name=cfg.student.name,
                      student_size=cfg.student.size, feedback=None, previous=None)
        if r > 1:
            fields["feedback"] = row.get(round_col(r - 1, "reason"))
            fields["previous"] = row.get(round_col(r - 1, "cot"))
        return render_messages(f"rethink_{m}", overrides[m] or rc.prompt, **fields)

    def apply(row: dict, reply: Reply) -> dict:
        _account(row, "rethinker", reply)
        row[round_col(r, "mode")] = mode(row)
        row[round_col(r, "rethink_raw")] = reply.text
        cot = extract_rewrite(reply.text) if reply.error is None else None
        row[round_col(r, "cot")] = cot
        if cot is None:
            row[round_col(r, "passed")] = False
            row[round_col(r, "reason")] = f"rethinker error: {reply.error}" if reply.error else "the rewrite was empty"
            _close_round(cfg, row, r)
        return row

    return StageSpec(name=f"rethink_r{r}", role="rethinker", engine=rc.engine, sampling=rc.sampling,
                     prepare=prepare, apply=apply)


def _close_round(cfg: RunConfig, row: dict, r: int) -> None:
    if row.get(round_col(r, "passed")):
        row["refined_cot"] = row[round_col(r, "cot")]
        row["refined_verified"] = True
        row["rounds_used"] = r
    else:
        row["refined_cot"] = row.get(round_col(r, "cot")) or row.get("refined_cot")
        row["refined_verified"] = False
        row["rounds_used"] = r


def verify_stage(cfg: RunConfig, r: int) -> StageSpec:
    vc = cfg.roles.verifier

    def pending(row: dict) -> bool:
        return alive(row) and row.get(round_col(r, "cot")) is not None and row.get(round_col(r, "passed")) is None

    def rule(row: dict) -> None:
        if vc.rule_check and row.get(round_col(r, "rule_ok")) is None:
            res = check_cot(cfg, row[round_col(r, "cot")], row["answer"])
            row[round_col(r, "rule_pred")] = res.predicted
            row[round_col(r, "rule_ok")] = res.correct
            row[round_col(r, "rule_status")] = res.status
            row[round_col(r, "rule_reason")] = res.reason

    def leak(row: dict) -> str | None:
        # Part of the rule check; a leak fails the round whatever `require` says (it must never reach the data).
        return find_leak(row[round_col(r, "cot")], row["problem"]) if vc.rule_check else None

    def prepare(row: dict) -> Messages | None:
        if not pending(row):
            return None
        rule(row)
        if not vc.llm_judge or ("rule" in vc.require and row.get(round_col(r, "rule_ok")) is False):
            return None  # the judge cannot rescue a wrong final answer: save the call
        if leak(row) is not None:
            return None  # nor a leak
        return render_messages("verifier", vc.prompt, problem=row["problem"], answer=row["answer"],
                               cot=row[round_col(r, "cot")])

    def apply(row: dict, reply: Reply) -> dict:
        if not pending(row):
            return row
        rule(row)
        reasons = []
        ok = True
        if vc.rule_check:
            rule_ok = bool(row.get(round_col(r, "rule_ok")))
            if not rule_ok:
                pred, status = row.get(round_col(r, "rule_pred")), row.get(round_col(r, "rule_status"))
                if status == "wrong":
                    reasons.append(f"the final answer {pred!r} does not match the expected answer {row['answer']!r}")
                elif status == "no_answer":
                    reasons.append(f"no final answer: {row.get(round_col(r, 'rule_reason'))}; state it as \\boxed{{}}")
                else:
                    reasons.append(f"the answer check failed: {row.get(round_col(r, 'rule_reason'))}")
            if "rule" in vc.require:
                ok &= rule_ok
        phrase = leak(row)
        if phrase is not None:
            reasons.insert(0, leak_reason(phrase))
            ok = False
        # A skipped judge call means the judge is off or a required rule check already failed.
        if not reply.skipped:
            _account(row, "verifier", reply)
            row[round_col(r, "judge_raw")] = reply.text
            v = parse_verdict(reply.text) if reply.error is None else None
            judge_pass = v.passed if v is not None else None
            row[round_col(r, "judge_pass")] = judge_pass
            if judge_pass is not True:
                reasons.append(v.reason if v is not None and v.reason else
                               f"the judge's reply could not be read ({reply.error or 'no verdict'})")
            if "llm" in vc.require:
                ok &= judge_pass is True
        row[round_col(r, "passed")] = ok
        row[round_col(r, "reason")] = "; ".join(reasons) if reasons else "passed"
        _close_round(cfg, row, r)
        return row

    return StageSpec(name=f"verify_r{r}", role="verifier", engine=vc.engine if vc.llm_judge else None,
                     sampling=vc.sampling, structured={"regex": VERDICT_REGEX}, prepare=prepare, apply=apply,
                     apply_on_skip=True)


# ------------------------------------------------------------------ negatives
def aligned_text(row: dict) -> str | None:
    cot, _ = select_aligned(row.get("label"), original_is_positive(row), row.get("refined_cot"),
                            bool(row.get("refined_verified")), original_cot=row.get("cot"))
    return cot


def _covered_before(cfg: RunConfig, row: dict, source: str) -> bool:
    """True when a source earlier in `negatives.sources` already gave this row a negative."""
    for s in cfg.negatives.sources:
        if s == source:
            return False
        if s == "wrong_original" and row.get("orig_correct") is False:
            return True
        if s == "injected" and row.get("injected_ok"):
            return True
    return False


def inject_stage(cfg: RunConfig) -> StageSpec:
    ic = cfg.negatives.injector

    def prepare(row: dict) -> Messages | None:
        if not alive(row) or _covered_before(cfg, row, "injected"):
            return None
        base = aligned_text(row) or (row["cot"] if original_is_positive(row) else None)
        if base is None:
            return None
        return render_messages("inject_error", ic.prompt, problem=row["problem"], answer=row["answer"], cot=base)

    def apply(row: dict, reply: Reply) -> dict:
        _account(row, "injector", reply)
        row["injected_raw"] = reply.text
        cot = extract_rewrite(reply.text) if reply.error is None else None
        row["injected_cot"] = cot
        if cot is not None:
            res = check_cot(cfg, cot, row["answer"])
            row["injected_pred"] = res.predicted
            # Only a rewrite whose answer was found and really changed is a negative (no_answer is not).
            row["injected_ok"] = res.status == "wrong"
        else:
            row["injected_ok"] = False
        return row

    return StageSpec(name="inject", role="injector", engine=ic.engine, sampling=ic.sampling,
                     prepare=prepare, apply=apply)


def student_stage(cfg: RunConfig) -> StageSpec:
    sc = cfg.negatives.student

    def fanout(row: dict) -> list[dict]:
        if not alive(row) or _covered_before(cfg, row, "student_samples"):
            return [{**row, "sample_index": None, "sample_copies": 1}]
        return [{**row, "sample_index": i, "sample_copies": sc.k} for i in range(sc.k)]

    def prepare(row: dict) -> Messages | None:
        if row.get("sample_index") is None:
            return None
        return [{"role": "user", "content": row["student_prompt"]}]

    def apply(row: dict, reply: Reply) -> dict:
        _account(row, "student", reply)
        row["student_raw"] = reply.text if reply.error is None else None
        if reply.text is not None and reply.error is None:
            res = check_cot(cfg, reply.text, row["answer"])
            # student_correct stays None for no_answer / error: such a sample is never a negative.
            row["student_pred"], row["student_status"] = res.predicted, res.status
            row["student_correct"] = {"correct": True, "wrong": False}.get(res.status)
        return row

    return StageSpec(name="student", role="student", engine=sc.engine, sampling=sc.sampling,
                     prepare=prepare, apply=apply, fanout=fanout, extra={"per_sample_seed": True})


def judge_original_stage(cfg: RunConfig) -> StageSpec:
    """input.on_no_answer=judge: the verifier's engine decides whether an original with no readable final answer
    reaches the gold answer. PASS: the original counts as correct (orig_judged=True); FAIL or no verdict: the row
    goes to errors (stage no_answer), never to the negatives."""
    vc = cfg.roles.verifier

    def prepare(row: dict) -> Messages | None:
        if not alive(row) or row.get("orig_status") != "no_answer" or row.get("orig_judged") is not None:
            return None
        return render_messages("judge_original", vc.prompt_no_answer, problem=row["problem"], answer=row["answer"],
                               cot=row["cot"], checker_reason=row.get("orig_reason") or "")

    def apply(row: dict, reply: Reply) -> dict:
        _account(row, "verifier", reply)
        row["orig_judge_raw"] = reply.text if reply.error is None else f"<error: {reply.error}>"
        v = parse_verdict(reply.text) if reply.error is None else None
        if v is not None and v.passed is True:
            row["orig_judged"], row["orig_correct"] = True, True
            return row
        if v is not None and v.passed is False:
            row["orig_judged"] = False
            return _fail(row, "no_answer", f"{row.get('orig_reason')}; the judge says the CoT does not reach the "
                         f"gold answer: {v.reason or 'no reason given'}")
        detail = reply.error[:300] if reply.error else f"no verdict in {(reply.text or '')[:200]!r}"
        return _fail(row, "no_answer", f"{row.get('orig_reason')}; the judge gave no verdict ({detail})")

    return StageSpec(name="judge_original", role="verifier", engine=vc.engine, sampling=vc.sampling,
                     structured={"regex": VERDICT_REGEX}, prepare=prepare, apply=apply)


def build_stages(cfg: RunConfig, judge_original: bool = True) -> list[StageSpec]:
    """The refine pipeline, unrolled: check, judge, critic attempts, rethink/verify rounds, negatives.

    judge_original=False leaves the judge stage out (no pending row has a no_answer original), so its engine
    pool is not started for nothing.
    """
    stages = [StageSpec(name="check_original", role="none", engine=None, extra={"callable_class": OriginalCheck})]
    if judge_original and cfg.input.on_no_answer == "judge":
        stages.append(judge_original_stage(cfg))
    stages += [critic_stage(cfg, a) for a in range(cfg.roles.critic.max_parse_retries + 1)]
    for r in range(1, cfg.roles.verifier.max_rounds + 1):
        stages += [rethink_stage(cfg, r), verify_stage(cfg, r)]
    if "injected" in cfg.negatives.sources:
        stages.append(inject_stage(cfg))
    if "student_samples" in cfg.negatives.sources:
        stages.append(student_stage(cfg))
    return stages
