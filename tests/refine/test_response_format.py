"""refine.response_format on R1-style texts: keep, strip_think, wrap_think (pure functions)."""

import pytest

from crv_ray.refine.response_format import format_response, split_final, split_think

R1 = "<think>\nFirst, 2 + 3 = 5.\n\nCheck: 5 - 3 = 2. Good.\n</think>\n\nThe sum is 5, so the answer is $\\boxed{5}$."
PLAIN = "We add 2 and 3.\n\nThat gives 2 + 3 = 5.\n\nThe final answer is \\boxed{5}."


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        (R1, "First, 2 + 3 = 5.\n\nCheck: 5 - 3 = 2. Good.", "The sum is 5, so the answer is $\\boxed{5}$."),
        (PLAIN, None, PLAIN),
        # the chat template opened the tag in the prompt: the text starts inside the thinking
        ("2 + 3 = 5.\n</think>\n\n\\boxed{5}", "2 + 3 = 5.", "\\boxed{5}"),
        # truncated inside the thinking
        ("<think>\n2 + 3 = 5, and then", "2 + 3 = 5, and then", ""),
        ("<THINK>a</THINK>b<think>c</think>d", "a\n\nc", "b\n\nd"),
        ("", None, ""),
        (None, None, ""),
    ],
)
def test_split_think(text, reasoning, answer):
    assert split_think(text) == (reasoning, answer)


def test_split_final():
    assert split_final(PLAIN) == ("We add 2 and 3.\n\nThat gives 2 + 3 = 5.", "The final answer is \\boxed{5}.")
    assert split_final("2 + 3 = 5\nso \\boxed{5}") == ("2 + 3 = 5", "so \\boxed{5}")
    assert split_final("2 + 3 = 5, \\boxed{5}") == ("", "2 + 3 = 5, \\boxed{5}")


def test_keep_is_the_identity():
    for text in (R1, PLAIN, "<think>cut", None):
        assert format_response(text, "keep") is text


def test_strip_think():
    assert format_response(R1, "strip_think") == "The sum is 5, so the answer is $\\boxed{5}$."
    assert format_response(PLAIN, "strip_think") == PLAIN
    # nothing after the thinking: the reasoning without tags, never an empty response
    assert format_response("<think>\n2 + 3 = 5, so \\boxed{5}\n</think>", "strip_think") == "2 + 3 = 5, so \\boxed{5}"
    assert format_response("<think>\n2 + 3 = 5, and", "strip_think") == "2 + 3 = 5, and"


def test_wrap_think():
    assert format_response(PLAIN, "wrap_think") == (
        "<think>\nWe add 2 and 3.\n\nThat gives 2 + 3 = 5.\n</think>\n\nThe final answer is \\boxed{5}."
    )
    assert format_response(R1, "wrap_think") == (
        "<think>\nFirst, 2 + 3 = 5.\n\nCheck: 5 - 3 = 2. Good.\n</think>\n\nThe sum is 5, so the answer is $\\boxed{5}$."
    )
    assert format_response("2 + 3 = 5.\n</think>\n\n\\boxed{5}", "wrap_think") == (
        "<think>\n2 + 3 = 5.\n</think>\n\n\\boxed{5}"
    )
    # all thinking, nothing after: its last paragraph becomes the final part
    assert format_response("<think>\nStep 1.\n\n\\boxed{5}\n</think>", "wrap_think") == (
        "<think>\nStep 1.\n</think>\n\n\\boxed{5}"
    )
    assert format_response("\\boxed{5}", "wrap_think") == "<think>\n\n</think>\n\n\\boxed{5}"


@pytest.mark.parametrize("mode", ["keep", "strip_think", "wrap_think"])
@pytest.mark.parametrize("text", [R1, PLAIN, "2 + 3 = 5.\n</think>\n\n\\boxed{5}", "<think>\nStep 1.\n\nStep 2."])
def test_formats_are_idempotent(mode, text):
    once = format_response(text, mode)
    assert once and format_response(once, mode) == once


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown response format 'raw'"):
        format_response(PLAIN, "raw")
