"""The checker on every reference solution of the real benchmarks, against math-verify's own verdict.

For each row, `check_answer(solution, gold)` must agree with `math_verify.verify(parse("\\boxed{gold}"),
parse(solution))` (the gold is boxed so that math-verify reads a bare LaTeX gold at all), except for the rows
listed below with their reasons. Reads ../shared/data/benchmarks beside the clone, else the copies packaged in
crv_ray/eval/benchmarks. About 1,850 rows; a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from math_verify import parse, verify

import crv_ray
from crv_ray.answers import check_answer, normalize_gold

_CANDIDATES = [Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "benchmarks",
               Path(crv_ray.__file__).resolve().parent / "eval" / "benchmarks"]
BENCH = next((p for p in _CANDIDATES if (p / "math500.jsonl").exists()), None)
pytestmark = pytest.mark.skipif(BENCH is None, reason=f"no benchmark files in {[str(p) for p in _CANDIDATES]}")

# math-verify reads the whole CoT and anchors on the word "answer" anywhere in it; GSM8K's `####` line means
# nothing to it. In these reference solutions the word appears in an earlier step, so it takes that step's number.
_ANCHOR = "math-verify takes the number after an earlier 'answer' ({}) and ignores the '#### {}' line"
DISAGREEMENTS = {
    ("gsm8k", 226): _ANCHOR.format("'express the answer as a percentage: ... = 33.333'", 33),
    ("gsm8k", 258): _ANCHOR.format("'add the fee to the answer from the previous step: $4.00'", 6),
    ("gsm8k", 876): _ANCHOR.format("'5-point questions Amy answered correctly: 5 questions * 60%'", 41),
    ("gsm8k", 1303): _ANCHOR.format("'convert the answer to weeks: 28 days'", 4),
    ("aime24", 75): "the solution boxes \\textbf{(073)}; math-verify does not read 73 out of it, the checker unwraps a "
                    "bracketed number",
}

# The same GSM8K human solutions with their '####' line removed: the answer is then only stated on the last
# line, as in model-written CoTs. Rows whose last line does not end on the answer:
LAST_LINE_WRONG = {
    226: "ends '= 33.333...%, which rounds down to 33%': the line's result is 33.333",
    493: "gold in cents (25); the line ends '= $0.25'",
    593: "the last sentence states 'three days' in words after '= 32 feet'",
    607: "gold in cents (10); the line ends '= $0.10'",
    635: "'He can skip 4 class because 10 - 4 = 6': the result of the line is not the answer",
    1038: "'it will take 300,000/50,000 = 6 years': the reference solution itself ends on 6, its gold is 4",
    1243: "gold in cents (50); the line ends '= $0.50'",
}
LAST_LINE_NO_ANSWER = {  # the last line holds several values, none after '=': ambiguous, so not wrong either
    505: "'He can make 1600 sticks ... because 1600 > 1200'",
    669: "'Svetlana needed 132 tablespoons ... to make 16 muffins.'",
    853: "'It would take 15 hours to clean 45 rooms ...'",
}


def _rows() -> list[tuple[str, object, str, str]]:
    def load(name: str) -> list[dict]:
        return [json.loads(line) for line in (BENCH / name).read_text().splitlines() if line.strip()]

    out = [("math500", r["unique_id"], r["solution"], str(r["answer"])) for r in load("math500.jsonl")]
    out += [("aime24", r["id"], r["solution"], str(r["answer"])) for r in load("aime24.jsonl")]
    out += [("gsm8k", i, r["answer"], normalize_gold(r["answer"], "gsm8k")) for i, r in enumerate(load("gsm8k_test.jsonl"))]
    return out


def _math_verify(gold: str, solution: str) -> bool:
    # Timeouts off: math-verify's use signal.alarm, which would cancel pytest-timeout's own alarm.
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)  # type: ignore[arg-type]
    return bool(verify(gold_parsed, parse(solution, parsing_timeout=None), timeout_seconds=None))  # type: ignore[arg-type]


def test_checker_agrees_with_math_verify_on_every_reference_solution():
    rows = _rows()
    assert len(rows) == 500 + 30 + 1319
    found = {}
    for bench, rid, solution, gold in rows:
        ours = check_answer(solution, gold)
        assert ours.status in ("correct", "wrong"), (bench, rid, ours)  # every reference states its answer
        if ours.correct != _math_verify(gold, solution):
            found[(bench, rid)] = ours
    assert set(found) == set(DISAGREEMENTS), {k: v for k, v in found.items() if k not in DISAGREEMENTS}
    assert all(res.correct for res in found.values())  # each listed row: the checker is right, math-verify not


def test_gsm8k_solutions_without_the_hash_line_are_read_from_their_last_line():
    rows = [r for r in _rows() if r[0] == "gsm8k"]
    statuses = {}
    for _, rid, solution, gold in rows:
        res = check_answer(solution.rsplit("####", 1)[0].rstrip(), gold)
        statuses.setdefault(res.status, set()).add(rid)
    assert statuses.get("wrong", set()) == set(LAST_LINE_WRONG)
    assert statuses.get("no_answer", set()) == set(LAST_LINE_NO_ANSWER)
    assert len(statuses["correct"]) == 1319 - len(LAST_LINE_WRONG) - len(LAST_LINE_NO_ANSWER)
