"""The manifest's trace summary as crv-ray computed it before per-shard summaries (every trace row in one list),
kept verbatim as the reference the shard-by-shard manifest must reproduce."""

from collections import Counter

from crv_ray.refine.state import ROLES_FOR_TOKENS


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
