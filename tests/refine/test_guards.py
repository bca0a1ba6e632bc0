"""The leak guard of rewrites and the critic fallback statistics (pure functions)."""

import json

import pytest

from crv_ray.refine.guards import critic_fallback_stats, find_leak, leak_reason, shorten
from crv_ray.refine.prompts import render_messages

PROBLEM = "Tom has 3 apples and buys 5 more. How many apples does he have?"


@pytest.mark.parametrize(
    ("rewrite", "phrase"),
    [
        ("The original reasoning is: 3 + 5 = 8.\n\nThe gold answer is: 8.\n\n\\boxed{8}", "original reasoning"),
        ("3 + 5 = 8, and the gold answer is 8, so \\boxed{8}", "gold answer"),
        ("We are told the answer is 8. Indeed 3 + 5 = 8. \\boxed{8}", "We are told the answer"),
        ("3 + 5 = 8, which matches the expected answer. \\boxed{8}", "expected answer"),
        ("Following the original solution, 3 + 5 = 8. \\boxed{8}", "original solution"),
        ("As in the original CoT, 3 + 5 = 8. \\boxed{8}", "original CoT"),
        ("Unlike the previous attempt, we add: 3 + 5 = 8. \\boxed{8}", "previous attempt"),
        ("The student model should see that 3 + 5 = 8. \\boxed{8}", "student model"),
        ("Problem: Tom has 3 apples.\n\n3 + 5 = 8. \\boxed{8}", "Problem:"),
        ("**Gold answer:** 8\n\n3 + 5 = 8. \\boxed{8}", "Gold answer:"),
        ("<problem>Tom has 3 apples</problem>\n3 + 5 = 8. \\boxed{8}", "<problem>"),
        ("3 + 5 = 8.\n</original_reasoning>\n\\boxed{8}", "</original_reasoning>"),
        ("3 + 5 = 8, the reference answer. \\boxed{8}", "reference answer"),
        ("The verifier said step 2 was wrong; 3 + 5 = 8. \\boxed{8}", "verifier"),
        # the prompt's own sentences echoed (SmolLM2-135M does this)
        ("The solution below is correct but too terse for this student:\n\n3 + 5 = 8. \\boxed{8}", "solution below"),
        ("It is too complex for a 135M student. 3 + 5 = 8. \\boxed{8}", "too complex for"),
        # inside a think-format rewrite too: the thinking reaches the SFT data in `keep` mode
        ("<think>\nThe given answer is 8, let me get there.\n</think>\n\n\\boxed{8}", "given answer"),
    ],
)
def test_leaks_are_found_and_named(rewrite, phrase):
    assert find_leak(rewrite, PROBLEM) == phrase
    assert leak_reason(phrase).startswith(f"leak: the rewrite says {phrase!r}")


@pytest.mark.parametrize(
    "rewrite",
    [
        "Tom starts with 3 apples.\n\nHe buys 5 more: 3 + 5 = 8.\n\nThe final answer is \\boxed{8}.",
        "<think>\nOkay, so Tom has 3 apples. Wait, let me check the answer again: 3 + 5 = 8.\n</think>\n\n\\boxed{8}",
        "The original price was 10 dollars, so the answer is 8. \\boxed{8}",  # "original" is not a leak by itself
        "Answer: 8",  # a final-answer line is no heading of ours
        "The answer is 8 because 3 + 5 = 8.",
        "We check the problem statement again: he buys 5 more. \\boxed{8}",
        "",
        None,
    ],
)
def test_ordinary_reasoning_is_no_leak(rewrite):
    assert find_leak(rewrite, PROBLEM) is None


def test_a_phrase_of_the_problem_itself_is_allowed():
    problem = "A quiz has an expected answer of 4 and a student model of scores... Problem: find the reference answer."
    rewrite = "The expected answer is 4 by the problem. The student model scores... Problem: we need the reference answer."
    assert find_leak(rewrite, problem) is None
    assert find_leak(rewrite + " The gold answer is 4.", problem) == "gold answer"


@pytest.mark.parametrize("role", ["rethink_easy", "rethink_hard", "rethink_repair", "inject_error"])
def test_copying_our_own_prompt_back_is_a_leak(role):
    """Whatever a small model copies from the rewriting prompt (its tags, headings, instructions) is caught."""
    fields = dict(problem=PROBLEM, answer="8", cot="3 + 5 = 8.\n\n\\boxed{8}", student_name="S", student_size="1B",
                  feedback="step 2 is wrong", previous="3 + 5 = 9")
    user = render_messages(role, **fields)[-1]["content"]
    before_cot, after_cot = user.split(fields["cot"], 1)
    assert find_leak(before_cot, PROBLEM) is not None
    assert find_leak(after_cot, PROBLEM) is not None


def test_the_rewriting_prompts_ask_for_markers_and_no_scaffolding():
    fields = dict(problem=PROBLEM, answer="8", cot="3 + 5 = 8.", student_name="S", student_size="1B")
    for role in ("rethink_easy", "rethink_hard", "rethink_repair", "inject_error"):
        user = render_messages(role, **fields)[-1]["content"]
        assert "between <rewrite> and </rewrite>" in user
        assert "never mention the gold answer" in user.lower()
        assert "same form" not in user  # the think-format line only for think-format CoTs
        r1 = render_messages(role, **dict(fields, cot="<think>\n3 + 5 = 8.\n</think>\n\n\\boxed{8}"))[-1]["content"]
        assert "<think>thinking</think> followed by the final answer: write yours in the same form" in r1


def _row(attempts, source, raws=None):
    return {"critic_attempts": attempts, "label_source": source,
            "critic_raw": json.dumps(raws) if raws is not None else None}


def test_critic_fallback_stats():
    rows = [_row(2, "fallback", ["<think>a", "<think>b"]), _row(1, "critic", ["easy"]),
            _row(2, "fallback", ["hmm", "no idea"]), _row(None, None), _row(0, None),
            _row(1, "fallback", ["x"]), _row(1, "fallback", ["y"])]
    stats = critic_fallback_stats(rows)
    assert (stats.asked, stats.fallback) == (5, 4) and stats.rate == pytest.approx(0.8)
    assert stats.replies == ["<think>b", "no idea", "x"]  # the last reply of up to 3 rows
    assert critic_fallback_stats([_row(None, None)]).rate == 0.0


def test_shorten_keeps_the_start_and_the_end():
    assert shorten("short") == "short"
    long = "<think>" + "a" * 500 + " cut here"
    out = shorten(long, 60)
    assert out.startswith("<think>") and out.endswith("cut here") and "[...]" in out and len(out) < 80
