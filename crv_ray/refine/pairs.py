"""CogPO preference pairs: pick the aligned CoT and a negative, then build the small/medium/large gap pairs.

| gap    | chosen       | rejected     | exists when                                           |
|--------|--------------|--------------|-------------------------------------------------------|
| small  | aligned CoT  | original CoT | label easy/hard, rewrite verified, original correct   |
| medium | original CoT | negative CoT | original correct and a negative exists                |
| large  | aligned CoT  | negative CoT | aligned CoT and a negative exist                      |

See docs/method.md. A pair carries its gap, not a beta: beta is resolved at train time from
`train.cogpo.gap_betas` (crv_ray/train/config.py), so a beta sweep needs no new refine run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

GAPS = ("small", "medium", "large")
NEGATIVE_SOURCES = ("wrong_original", "student_sample", "injected")
REWRITE_LABELS = ("easy", "hard")


def pair_id(problem_id: str, gap: str) -> str:
    """Stable 16-hex-digit id of one (problem, gap) pair."""
    return hashlib.sha1(f"{problem_id}\x1f{gap}".encode("utf-8")).hexdigest()[:16]


def _text(cot: str | None) -> str:
    return cot.strip() if cot else ""


def select_aligned(
    label: str | None,
    original_correct: bool,
    refined_cot: str | None,
    refined_verified: bool,
    original_cot: str | None = None,
) -> tuple[str | None, str | None]:
    """The aligned CoT for SFT and its source ("refined" or "original"), or (None, None).

    A medium label keeps a correct original (so `original_cot` is required then). A verified rewrite is used
    for an easy/hard label, or whenever the original is wrong (a repair). A wrong original is never aligned.
    """
    if label == "medium" and original_correct:
        if original_cot is None:
            raise ValueError("original_cot is required when label is 'medium' and the original is correct")
        return (original_cot, "original") if _text(original_cot) else (None, None)
    rewrite_wanted = label in REWRITE_LABELS or not original_correct
    if rewrite_wanted and refined_verified and _text(refined_cot):
        return refined_cot, "refined"
    return None, None


def build_pairs(
    problem_id: str,
    prompt: str,
    original_cot: str,
    original_correct: bool,
    label: str | None,
    aligned_cot: str | None,
    aligned_source: str | None,
    negative_cot: str | None,
    gaps: Sequence[str] = GAPS,
    original_verified: bool = True,
) -> list[dict]:
    """The CogPO pairs of one problem, in GAPS order, restricted to `gaps`.

    `original_verified=False` (an original with no readable final answer kept by input.on_no_answer=
    keep_unverified, passed with original_correct=True): it may be chosen, never rejected (no small pair).

    A pair whose chosen equals its rejected (after strip) is never emitted, nor a second pair with the same
    (chosen, rejected): with a medium label the aligned CoT is the original, so the large pair would repeat
    the medium pair with another beta; the earlier gap in GAPS order is kept.
    """
    for gap in gaps:
        if gap not in GAPS:
            raise ValueError(f"unknown gap {gap!r}; expected one of {GAPS}")
    candidates = {
        "small": (
            aligned_cot
            if label in REWRITE_LABELS and aligned_source == "refined" and original_correct and original_verified
            else None,
            original_cot,
        ),
        "medium": (original_cot if original_correct else None, negative_cot),
        "large": (aligned_cot, negative_cot),
    }
    if not original_correct and _text(aligned_cot) == _text(original_cot):
        candidates["large"] = (None, negative_cot)  # a wrong original is never chosen
    pairs: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for gap in GAPS:
        if gap not in gaps:
            continue
        chosen, rejected = candidates[gap]
        key = (_text(chosen), _text(rejected))
        if not key[0] or not key[1] or key[0] == key[1] or key in seen:
            continue
        seen.add(key)
        pairs.append({
            "pair_id": pair_id(problem_id, gap),
            "problem_id": problem_id,
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "gap": gap,
        })
    return pairs


def choose_negative(
    candidates: Sequence[tuple[str, str | None]], order: Sequence[str] = NEGATIVE_SOURCES
) -> tuple[str | None, str | None]:
    """(cot, source) of the first non-empty candidate by the configured source order, or (None, None).

    Within one source the candidates' own order decides; sources missing from `order` are not used.
    """
    for source in list(order) + [source for source, _ in candidates]:
        if source not in NEGATIVE_SOURCES:
            raise ValueError(f"unknown negative source {source!r}; expected one of {NEGATIVE_SOURCES}")
    for source in order:
        for candidate_source, cot in candidates:
            if candidate_source == source and _text(cot):
                return cot, source
    return None, None
