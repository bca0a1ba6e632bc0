"""The answer checker on real benchmark data (shared/data/benchmarks, next to the repo); skipped if absent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from crv_ray.answers import check_answer, normalize_gold

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


@pytest.fixture(scope="module", autouse=True)
def _need_benchmarks():
    if not BENCHMARKS.is_dir():
        pytest.skip(f"benchmark data not found at {BENCHMARKS}")


def _rows(name: str, n: int) -> list[dict]:
    with (BENCHMARKS / name).open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_gsm8k_solutions_check_against_their_gold():
    rows = _rows("gsm8k_test.jsonl", 50)
    golds = [normalize_gold(r["answer"], "gsm8k") for r in rows]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", g) for g in golds), golds
    assert golds[0] == "18"  # Janet's ducks
    correct = sum(check_answer(r["answer"], g).correct for r, g in zip(rows, golds))
    # The same solution with its final number changed must fail.
    changed = [re.sub(r"####.*$", f"#### {int(float(g)) + 1}", r["answer"]) for r, g in zip(rows, golds)]
    still_correct = sum(check_answer(c, g).correct for c, g in zip(changed, golds))
    print(f"gsm8k: {correct}/50 solutions correct, {still_correct}/50 changed solutions still correct")
    assert correct >= 48
    assert still_correct == 0


def test_math500_solutions_check_against_their_answer():
    rows = _rows("math500.jsonl", 100)
    results = [check_answer(r["solution"], r["answer"]) for r in rows]
    rate = sum(r.correct for r in results) / len(rows)
    print(f"math500: {rate:.0%} of 100 reference solutions correct")
    assert rate >= 0.90, [(r["answer"], res) for r, res in zip(rows, results) if not res.correct]
    # An integer answer moved by one is wrong.
    ints = [r for r in rows if r["answer"].isdigit()]
    wrong = [check_answer(f"\\boxed{{{int(r['answer']) + 1}}}", r["answer"]).correct for r in ints]
    assert len(ints) > 20 and not any(wrong)
