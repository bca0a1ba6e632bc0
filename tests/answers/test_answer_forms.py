"""The answer checker on every public final-answer form (tests/answers/answer_forms.jsonl), its configurable
patterns, and its real timeout: a sympy hang becomes an "error" with a reason, and the next check still works."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from crv_ray import answers
from crv_ray.answers import AnswerCheck, check_answer, extract_answer
from crv_ray.config import AnswersConfig

FORMS = Path(__file__).with_name("answer_forms.jsonl")
CASES = [json.loads(line) for line in FORMS.read_text().splitlines() if line.strip()]
# sympy expands both powers when it compares them; this passes the cheap guard and runs for minutes.
HANG = ("(x+1)^{999}", "(x+2)^{999}")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_each_form_agrees_with_its_label(case):
    res = check_answer(case["response"], case["gold"])
    assert res.status == case["expected"], (case.get("note"), res)
    assert res.correct is (case["expected"] == "correct")
    if res.status == "no_answer":
        assert res.reason, res  # a no_answer always says why


def test_the_fixture_covers_every_form_both_ways():
    by_form: dict[str, Counter] = {}
    for c in CASES:
        by_form.setdefault(c["form"], Counter())[c["expected"]] += 1
    both = {"boxed", "fbox", "framebox", "gsm8k", "answer_is", "answer_colon", "minerva", "last_line", "answer_tag",
            "r1", "qwq", "stratos", "choice", "units", "dollar", "percent", "thousands", "text"}
    for form in both:
        assert by_form[form]["correct"] and by_form[form]["wrong"], form
    assert by_form["none"]["no_answer"] >= 4 and by_form["r1"]["no_answer"] >= 2
    assert sum(c["expected"] == "no_answer" for c in CASES) >= 10


def test_extraction_methods_are_reported():
    assert extract_answer("x \\boxed{3}").method == "boxed"
    assert extract_answer("x\n#### 3").method == "gsm8k"
    assert extract_answer("The answer is 3.").method == "phrase"
    assert extract_answer("<answer>3</answer>").method == "answer_tag"
    line = extract_answer("So she makes 9 * 2 = $18 every day.")
    assert (line.method, line.answer, line.decisive) == ("last_line", "18", True)
    assert check_answer("So she makes 9 * 2 = $18 every day.", "18").method == "last_line:string"


def test_user_patterns_come_first():
    cfg = AnswersConfig(patterns=[r"RESULT=\s*(\S+)"])
    text = "RESULT= 7\nThe answer is \\boxed{8}."
    assert check_answer(text, "7", patterns=cfg.patterns) == AnswerCheck("correct", "7", "pattern:string")
    assert check_answer(text, "7").status == "wrong"  # without the pattern the box decides
    with pytest.raises(ValueError, match="exactly one capture group"):
        AnswersConfig(patterns=[r"RESULT=\S+"])
    with pytest.raises(ValueError, match="not a valid regex"):
        AnswersConfig(patterns=[r"RESULT=(\S+"])


def _raw_verify(gold: str, pred: str) -> None:
    answers._mv_verify(gold, pred)


def test_a_real_sympy_hang_becomes_an_error_and_the_next_check_works():
    gold, pred = HANG
    assert answers._safe_for_sympy(gold) and answers._safe_for_sympy(pred)  # the heuristic guard lets it through
    # Without a bound it really hangs: math-verify on it is still running after 3 s.
    proc = multiprocessing.get_context("spawn").Process(target=_raw_verify, args=(gold, pred), daemon=True)
    proc.start()
    proc.join(3)
    hung = proc.is_alive()
    proc.kill()
    proc.join()
    assert hung, "math-verify finished: pick a harder input"

    check_answer("\\boxed{\\frac{1}{2}}", "0.5")  # the child process is up
    kills = answers._SYMPY.kills
    start = time.perf_counter()
    res = check_answer(f"The result is $\\boxed{{{pred}}}$.", gold, timeout_s=1.0)
    took = time.perf_counter() - start
    assert res.status == "error" and res.reason.startswith("timeout after 1s"), res
    assert res.predicted == pred and not res.correct
    assert took < 2.5
    assert answers._SYMPY.kills == kills + 1
    again = check_answer("\\boxed{\\frac{1}{2}}", "0.5")  # a fresh child process answers
    assert again.status == "correct" and again.method == "boxed:math_verify"


def test_timeout_also_off_the_main_thread():
    out: list[AnswerCheck] = []
    worker = threading.Thread(target=lambda: out.append(check_answer(f"\\boxed{{{HANG[1]}}}", HANG[0], timeout_s=0.5)),
                              daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert out and out[0].status == "error" and "timeout" in out[0].reason


def test_plain_numbers_never_reach_the_child_process(monkeypatch):
    def no_child(*args, **kwargs):
        raise AssertionError("the child process was used")

    monkeypatch.setattr(answers._SYMPY, "call", no_child)
    assert check_answer("\\boxed{18}", "18").method == "boxed:string"
    assert check_answer("\\boxed{18.0}", "18").method == "boxed:numeric"
    assert check_answer("#### 1,001", "1000").status == "wrong"
    assert check_answer("The answer is (C).", "C").correct
