"""Metrics over scored generations. Pure functions: rows in, numbers out.

A scored row: problem_id, mode ("greedy" | "sampled"), sample_index, status ("correct" | "wrong" | "no_answer" |
"error"), predicted (the extracted final answer or None), tokens, groups ({field: value}).

- greedy pass@1: share of problems whose greedy reply is correct.
- pass@1: per problem, the share of its n samples that are correct, averaged over problems (with n=1 and greedy
  on, no samples are drawn and pass@1 is the greedy pass@1).
- maj@k (k = n > 1): per problem, the answer most samples agree on (answers grouped by equivalence, not by
  string), correct or not; samples without a final answer (status no_answer or error) do not vote. Ties go to
  the answer seen first (lowest sample index), so the result is deterministic.
- mean response tokens and the share with no final answer are over the rows pass@1 is computed from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from crv_ray.answers import answers_equal

GREEDY, SAMPLED = "greedy", "sampled"


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def pass_at_1(per_problem: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the share of correct samples; a problem with no samples counts 0."""
    return mean([mean([1.0 if c else 0.0 for c in samples]) for samples in per_problem])


def answer_clusters(answers: Sequence[str | None],
                    equal: Callable[[str, str], bool] = answers_equal) -> list[list[int]]:
    """Indices of `answers` grouped by equivalence, in order of first appearance; None answers are left out.

    Each answer joins the first cluster whose first member it equals; identical strings skip the comparison.
    """
    clusters: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for c in clusters:
            rep = answers[c[0]]
            if a == rep or equal(rep, a):  # type: ignore[arg-type]
                c.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def majority_index(answers: Sequence[str | None], equal: Callable[[str, str], bool] = answers_equal) -> int | None:
    """Index of the sample whose answer wins the vote (the first member of the largest cluster; ties: the cluster
    that appeared first). None when no sample has an answer."""
    best: list[int] | None = None
    for c in answer_clusters(answers, equal):
        if best is None or len(c) > len(best):
            best = c
    return best[0] if best else None


def maj_at_k(per_problem: Sequence[tuple[Sequence[str | None], Sequence[bool]]],
             equal: Callable[[str, str], bool] = answers_equal) -> float:
    """Mean over problems of whether the majority answer is correct; (answers, correct) per problem."""
    hits = []
    for answers, correct in per_problem:
        i = majority_index(answers, equal)
        hits.append(1.0 if i is not None and correct[i] else 0.0)
    return mean(hits)


def _by_problem(rows: Sequence[dict], mode: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["mode"] == mode:
            out[r["problem_id"]].append(r)
    for samples in out.values():
        samples.sort(key=lambda r: r["sample_index"])
    return out


def _correct(rows: Sequence[dict]) -> list[bool]:
    return [r["status"] == "correct" for r in rows]


def _votes(rows: Sequence[dict]) -> list[str | None]:
    # A "no_answer" row may carry the checker's guess at an ambiguous last line: a guess does not vote.
    return [r["predicted"] if r["status"] in ("correct", "wrong") else None for r in rows]


def summarize(rows: Sequence[dict], group_by: Sequence[str] = (),
              equal: Callable[[str, str], bool] = answers_equal) -> dict:
    """The metrics of one (model, benchmark): the result entry of summary.json without model and benchmark names."""
    greedy = _by_problem(rows, GREEDY)
    sampled = _by_problem(rows, SAMPLED)
    primary = sampled or greedy
    problems = list(dict.fromkeys(r["problem_id"] for r in rows))
    n_samples = max((len(v) for v in primary.values()), default=0)
    # A problem whose rows are missing from the primary set still counts, as a miss: nothing is dropped silently.
    per_problem = [_correct(primary.get(p, [])) for p in problems]
    primary_rows = [r for p in problems for r in primary.get(p, [])]
    k = n_samples if sampled and n_samples > 1 else None
    groups: dict[str, dict[str, dict]] = {}
    group_of = {r["problem_id"]: r.get("groups") or {} for r in rows}
    for g in group_by:
        members: dict[str, list[str]] = defaultdict(list)
        for p in problems:
            members[str(group_of[p].get(g))].append(p)
        groups[g] = {value: {"n": len(ps), "pass@1": pass_at_1([_correct(primary.get(p, [])) for p in ps])}
                     for value, ps in sorted(members.items(), key=lambda kv: _natural_key(kv[0]))}
    return {
        "n_problems": len(problems),
        "n_samples": n_samples,
        "greedy_pass@1": pass_at_1([_correct(greedy.get(p, [])) for p in problems]) if greedy else None,
        "pass@1": pass_at_1(per_problem),
        "maj@k": maj_at_k([(_votes(sampled.get(p, [])), _correct(sampled.get(p, []))) for p in problems], equal)
        if k else None,
        "k": k,
        "mean_response_tokens": mean([float(r["tokens"] or 0) for r in primary_rows]),
        "no_answer_rate": mean([1.0 if r["status"] == "no_answer" else 0.0 for r in primary_rows]),
        "groups": groups,
    }


def status_counts(rows: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    return dict(sorted(counts.items()))


def _natural_key(s: str) -> tuple:
    """Level "2" before "10"; names alphabetically."""
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)
