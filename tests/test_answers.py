"""Final-answer extraction and checking (crv_ray/answers.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from crv_ray.answers import (
    AnswerCheck,
    answers_equal,
    check_answer,
    extract_boxed,
    extract_final_answer,
    normalize_gold,
)


# ---------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"first \boxed{1}, then \boxed{2}", "2"),  # the last box wins
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and \fbox{2}", "2"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
        (r"\boxed{\boxed{3}}", "3"),
        (r"\boxed {3}", "3"),
        (r"$\boxed 5$.", "5"),
        (r"\boxed{5} but then \boxed{", None),  # a truncated last box is no answer
        (r"\boxed{}", None),
        (r"\boxedx{3}", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She pays 2 * 9 = 18.\n#### 18", "18"),
        ("#### 1,000", "1,000"),
        (r"Steps... \boxed{5}. Final answer: 6", "5"),  # a box beats a phrase
        ("So the final answer is 42.", "42"),
        ("The final answer is $\\frac{1}{2}$. Done.", "$\\frac{1}{2}$"),
        ("The answer is 3.5. Then we stop.", "3.5"),
        ("Answer: 7\nAnswer: 8", "8"),  # the last occurrence
        ("**Final Answer:** 12", "12"),
        ("To answer this we add.", None),  # "answer" without "is"/":" is not an answer
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_normalize_gold():
    gsm = "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 1,234,567"
    assert normalize_gold(gsm, "gsm8k") == "1234567"
    assert normalize_gold(gsm) == "1234567"  # auto sees the #### line
    assert normalize_gold(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert normalize_gold(r"\boxed{3}", "boxed") == "3"
    assert normalize_gold("  \\frac{14}{3} ", "plain") == "\\frac{14}{3}"
    assert normalize_gold(" 42 ", "boxed") == "42"  # boxed without a box: the text
    with pytest.raises(ValueError, match="empty"):
        normalize_gold("   ")
    with pytest.raises(ValueError, match="####"):
        normalize_gold("no marker", "gsm8k")
    with pytest.raises(ValueError, match="format"):
        normalize_gold("1", "latex")


# ------------------------------------------------------------------------------------------------ checking
@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}"),
        (r"\boxed{18.00}", "18"),
        ("The final answer is $18$.", "18"),
        (r"The answer is \$18.", "18"),
        ("#### 1,000", "1000"),
        (r"\boxed{1000}", "1,000"),
        (r"\boxed{18 dollars}", "18"),
        (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{[-2, 7)}", "[-2,7)"),
        (r"\boxed{(-\infty, 3]}", r"(-\infty,3]"),
        (r"\boxed{3, 5}", "5, 3"),
        (r"\boxed{x^2+1}", "1+x^2"),
        (r"\boxed{90^\circ}", "90"),
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),
        (r"\boxed{Evelyn}", r"\text{Evelyn}"),
        (r"\boxed{2^{2010}}", "2^{2010}"),
        ("So it is \\boxed{42}.\n", "#### 42"),  # a raw GSM8K gold is normalised too
    ],
)
def test_equivalent_answers_are_correct(response, gold):
    res = check_answer(response, gold)
    assert res.correct and res.status == "correct", res
    assert res.method.split(":")[1] in ("math_verify", "string", "numeric")


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{17}", "18"),
        (r"\boxed{4.67}", r"\frac{14}{3}"),
        (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{[-2, 7]}", "[-2,7)"),
        (r"\boxed{Eve}", r"\text{Evelyn}"),
        ("#### 1,001", "1000"),
    ],
)
def test_wrong_answers_are_not_correct(response, gold):
    res = check_answer(response, gold)
    assert res == AnswerCheck(status="wrong", predicted=res.predicted, method=res.method)
    assert res.predicted is not None and not res.correct


def test_no_answer():
    res = check_answer("I am not sure.", "18")
    assert (res.status, res.predicted, res.method) == ("no_answer", None, "no_answer") and not res.correct
    assert "no final answer found" in res.reason
    assert check_answer("", "18").status == "no_answer"


def test_odd_input_never_raises():
    assert check_answer(None, "18").status == "no_answer"  # type: ignore[arg-type]
    bad_gold = check_answer(r"\boxed{18}", "")  # an empty gold matches nothing: the check failed, not the CoT
    assert bad_gold.status == "error" and "bad gold answer" in bad_gold.reason
    assert check_answer(r"\boxed{\frac{1}{}}", "1").correct is False
    assert check_answer("\\boxed{" + "(" * 300 + "}", "1").correct is False


def test_answers_equal():
    assert answers_equal("0.5", r"\frac12")
    assert answers_equal(r"\frac12", "0.5")
    assert answers_equal("1,000", "1000")
    assert not answers_equal("3", "4")
    assert not answers_equal("", "")
    assert not answers_equal("1" * 499, "7")  # a huge number is no float overflow to inf == inf


def test_check_answer_off_the_main_thread():
    # math-verify's signal timeouts raise outside the main thread; Ray actors run calls on such threads.
    cases = [(r"\boxed{\frac{1}{2}}", "0.5", True), (r"\boxed{(3, \pi)}", r"(3, \pi)", True), (r"\boxed{7}", "8", False)]

    def run(case):
        assert threading.current_thread() is not threading.main_thread()
        return check_answer(case[0], case[1]).correct

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(run, cases)) == [c[2] for c in cases]


@pytest.mark.parametrize(
    "answer",
    [
        "9^{9^{9^{9^{9}}}}",  # sympy evaluates the tower for ever
        "9^9^9^9",
        "(9999^{9999})^{9999}",
        r"\sum_{k=1}^{9999} k^{9999}",
        "100000!",
        "2^{1000000}",
        "1" * 2000,
    ],
)
def test_pathological_answers_return_fast(answer):
    out: list = []

    def run():
        start = time.perf_counter()
        out.append((check_answer(f"\\boxed{{{answer}}}", "3"), time.perf_counter() - start))

    # A daemon thread: a hang fails this test instead of blocking the run (or the interpreter's exit).
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert out, "check_answer hung"
    res, seconds = out[0]
    assert res.correct is False
    assert seconds < 1.0


def test_huge_response_is_linear():
    start = time.perf_counter()
    assert check_answer("\\boxed{1} " * 20000, "1").correct
    assert check_answer("\\boxed{" * 20000, "1").status == "no_answer"
    assert time.perf_counter() - start < 1.0
