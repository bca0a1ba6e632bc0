"""Synthetic problems (crv_ray/data/synthetic.py): deterministic, verbosity-ordered, wrong CoTs really wrong."""

from __future__ import annotations

import json
import statistics

import pytest

from crv_ray.answers import check_answer, extract_final_answer
from crv_ray.data.synthetic import generate_problems, write_jsonl

FIELDS = {"id", "problem", "answer", "cot", "verbosity", "cot_is_correct"}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate_problems(300, seed=7)


def test_fields_and_ids(rows):
    assert all(set(r) == FIELDS for r in rows)
    assert rows[0]["id"] == "syn-7-000000" and rows[299]["id"] == "syn-7-000299"
    assert len({r["id"] for r in rows}) == 300


def test_deterministic_by_seed(rows):
    assert generate_problems(300, seed=7) == rows
    other = generate_problems(300, seed=8)
    assert sum(a["problem"] == b["problem"] for a, b in zip(rows, other)) < 10
    # A row's problem depends on (seed, index) only.
    assert [r["problem"] for r in generate_problems(20, seed=7)] == [r["problem"] for r in rows[:20]]


def test_answers_are_positive_integers(rows):
    assert all(r["answer"].isdigit() and int(r["answer"]) > 0 for r in rows)


def test_cot_format(rows):
    for r in rows:
        blocks = r["cot"].split("\n\n")
        assert blocks[-1] == f"The final answer is \\boxed{{{extract_final_answer(r['cot'])}}}."
        assert len(blocks) == 2 if r["verbosity"] == "terse" else len(blocks) >= 3


def test_verbosity_cycles_and_orders_length(rows):
    assert [r["verbosity"] for r in rows[:6]] == ["terse", "normal", "padded"] * 2
    mean_len = {v: statistics.mean(len(r["cot"]) for r in rows if r["verbosity"] == v) for v in ("terse", "normal", "padded")}
    assert mean_len["padded"] > 3 * mean_len["normal"] > 3 * 1.5 * mean_len["terse"], mean_len
    assert {r["verbosity"] for r in generate_problems(5, verbosity="padded")} == {"padded"}


def test_check_answer_agrees_with_cot_is_correct(rows):
    for r in rows:
        assert check_answer(r["cot"], r["answer"]).correct is r["cot_is_correct"], r


def test_wrong_fraction(rows):
    assert sum(not r["cot_is_correct"] for r in rows) == 30  # round(300 * 0.1), exact
    assert all(r["cot_is_correct"] for r in generate_problems(50, wrong_fraction=0.0))
    wrong = [r for r in generate_problems(60, seed=3, wrong_fraction=0.5) if not r["cot_is_correct"]]
    assert len(wrong) == 30
    assert {r["verbosity"] for r in wrong} == {"terse", "normal", "padded"}


def test_invalid_arguments():
    with pytest.raises(ValueError, match="verbosity"):
        generate_problems(3, verbosity=["chatty"])
    with pytest.raises(ValueError, match="verbosity"):
        generate_problems(3, verbosity=[])
    with pytest.raises(ValueError, match="wrong_fraction"):
        generate_problems(3, wrong_fraction=1.5)
    with pytest.raises(ValueError, match="n must"):
        generate_problems(-1)
    assert generate_problems(0) == []


def test_write_jsonl(tmp_path, rows):
    path = write_jsonl(rows[:5], tmp_path / "sub" / "syn.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows[:5]
