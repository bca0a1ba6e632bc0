import pytest

from crv_ray.refine.parsing import LABELS, Verdict, extract_rewrite, parse_label, parse_verdict, strip_think

LABEL_CASES = [
    ("medium", "medium"),
    ("Medium.", "medium"),
    ("**hard**", "hard"),
    ("`easy`", "easy"),
    ("'hard'", "hard"),
    ("EASY!", "easy"),
    ("Label: easy", "easy"),
    ("Label = HARD", "hard"),
    ("The label should be hard.", "hard"),
    ("Classification - Medium", "medium"),
    ("Final answer: **hard**", "hard"),
    ("\\boxed{medium}", "medium"),
    ("## Label\n\nmedium", "medium"),
    ("I think this is EASY for the student", "easy"),
    ("The answer is: medium", "medium"),
    ("Answer: easy. Although some may think it's hard.", "easy"),
    ("label: easy\n...\nlabel: hard", "hard"),  # the model restated itself: last labelled wins
    ("Rating: medium (the steps are easy to follow)", "medium"),
    ("The difficulty is hard to judge; label: medium", "medium"),
    ("It's hard to say, but I'd go with easy.", "easy"),
    ("Not easy, but not hard either: medium.", "medium"),
    ("The CoT skips steps, which makes it easy to miss things.\n\nhard", "hard"),
    ("easy\n\nExplanation: the hard parts are skipped.", "easy"),
    ("<think>Is it easy? maybe hard</think>\nmedium", "medium"),
    ("thinking... hard?</think>\n\nEasy", "easy"),
    ("<think>long thought with easy", None),
    ("easy or hard?", None),
    ("Between easy and medium.", None),
    ("easy\nmedium\nhard", None),
    ("I considered easy, but given the redundant steps, it is hard.", None),
    ("uneasy", None),
    ("hardware", None),
    ("mediums", None),
    ("hard-working student", None),
    ("none of these", None),
    ("", None),
    ("   \n", None),
    (None, None),
]


@pytest.mark.parametrize(("reply", "expected"), LABEL_CASES)
def test_parse_label(reply, expected):
    assert parse_label(reply) == expected


VERDICT_CASES = [
    ("VERDICT: PASS\nREASON: All steps are correct.", True, "All steps are correct."),
    ("VERDICT: FAIL\nREASON: Step 3 adds 2+2=5.", False, "Step 3 adds 2+2=5."),
    ("**Verdict:** Fail\n**Reason:** wrong sign", False, "wrong sign"),
    ("verdict: pass", True, ""),
    ("Verdict - PASSED", True, ""),
    ("Verdict: PASS\nReasoning - fine", True, "fine"),
    ("REASON: fine\nVERDICT: PASS", True, "fine"),
    ("VERDICT: FAIL\nStep 3 multiplies wrong.", False, "Step 3 multiplies wrong."),
    ("VERDICT: PASS\nwait, step 2 is wrong\nVERDICT: FAIL\nREASON: step 2", False, "step 2"),
    ("<think>let me check... VERDICT: FAIL</think>\nVERDICT: PASS\nREASON: ok", True, "ok"),
    ("VERDICT: PASS/FAIL", None, "VERDICT: PASS/FAIL"),  # an echo of the format is no verdict
    ("PASS", True, "PASS"),
    ("pass", True, "pass"),
    ("FAIL: the final answer is 3, not 4.", False, "FAIL: the final answer is 3, not 4."),
    ("The result: PASS", True, "The result: PASS"),
    ("Correct.", True, "Correct."),
    ("Incorrect: step 2 is wrong.", False, "Incorrect: step 2 is wrong."),
    ("The reasoning is not correct.", False, "The reasoning is not correct."),
    ("Yes, every step is valid.", True, "Yes, every step is valid."),
    ("No. The answer is 5.", False, "No. The answer is 5."),
    ("No errors found; the reasoning is correct.", True, "No errors found; the reasoning is correct."),
    ("Let me check each step.\nStep 1 ok.\nThe reasoning is correct.", True,
     "Let me check each step. Step 1 ok. The reasoning is correct."),
    ('{"verdict": "pass", "reason": "fine"}', True, "fine"),
    ('```json\n{"verdict": "FAIL", "reason": "bad step"}\n```', False, "bad step"),
    ('{"passed": false, "explanation": "x"}', False, "x"),
    ("Step 2 has \\frac{1}{2} error {x}", None, "Step 2 has \\frac{1}{2} error {x}"),
    ("Yes and no.", None, "Yes and no."),
    ("I am not sure.", None, "I am not sure."),
    ("", None, ""),
    (None, None, ""),
]


@pytest.mark.parametrize(("reply", "passed", "reason"), VERDICT_CASES)
def test_parse_verdict(reply, passed, reason):
    assert parse_verdict(reply) == Verdict(passed, reason)


def test_verdict_reason_is_truncated_to_500_chars():
    verdict = parse_verdict("VERDICT: FAIL\nREASON: " + "x" * 700)
    assert verdict == Verdict(False, "x" * 500)


REWRITE_CASES = [
    (None, None),
    ("", None),
    ("  \n ", None),
    ("<think>only thinking</think>", None),
    ("Step 1: x=2.\n\nStep 2: so \\boxed{2}", "Step 1: x=2.\n\nStep 2: so \\boxed{2}"),
    ("Here is the rewritten reasoning:\n\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),
    ("Sure! Here is the simplified reasoning:\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),
    ("Sure!\n\nHere's the expanded version:\n\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),
    ("**Rewritten reasoning:**\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),
    ("## Revised Solution\n\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),
    ("```\nStep 1.\n\n\\boxed{2}\n```", "Step 1.\n\n\\boxed{2}"),
    ("Here is the new reasoning:\n```markdown\nStep 1.\n\n\\boxed{2}\n```\nLet me know if you need more.",
     "Step 1.\n\n\\boxed{2}"),
    ("<think>hmm</think>\n<new_reasoning>\nStep 1.\n\n\\boxed{2}\n</new_reasoning>", "Step 1.\n\n\\boxed{2}"),
    # A CoT's own first line, or its own code blocks, are kept.
    ("Okay, so we need to find x.\n\nx = 2, so \\boxed{2}", "Okay, so we need to find x.\n\nx = 2, so \\boxed{2}"),
    ("Here is the key observation: x is even.\n\n\\boxed{2}", "Here is the key observation: x is even.\n\n\\boxed{2}"),
    ("```python\nprint(1)\n```\nThen\n```python\nprint(2)\n```", "```python\nprint(1)\n```\nThen\n```python\nprint(2)\n```"),
    ("Note {{ x }} and $\\frac{1}{2}$.\n\n\\boxed{\\frac12}\n\nI hope this helps!",
     "Note {{ x }} and $\\frac{1}{2}$.\n\n\\boxed{\\frac12}"),
    # A reasoning agent: its own leading thinking is dropped, whatever follows is the rewrite.
    ("<think>The student needs more steps.</think>\n\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),
    ("The student needs more steps.\n</think>\n\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),
    ("<think>The student needs more steps, so I", None),  # cut off inside its own thinking
    # ... and a rewrite in think format after it keeps its think block.
    ("<think>plan</think>\n<think>\nStep 1.\n</think>\n\n\\boxed{2}", "<think>\nStep 1.\n</think>\n\n\\boxed{2}"),
    # Markers: their content, verbatim, think tags included.
    ("<think>plan</think>\n<rewrite>\n<think>\nStep 1.\n</think>\n\n\\boxed{2}\n</rewrite>",
     "<think>\nStep 1.\n</think>\n\n\\boxed{2}"),
    ("<rewrite>\n<think>\nStep 1.\n</think>\n\n\\boxed{2}\n</rewrite>", "<think>\nStep 1.\n</think>\n\n\\boxed{2}"),
    ("Sure!\n<rewrite>Step 1.\n\n\\boxed{2}</rewrite>\nLet me know.", "Step 1.\n\n\\boxed{2}"),
    ("<rewrite>\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),  # never closed: to the end
    ("Step 1.\n\n\\boxed{2}\n</rewrite>", "Step 1.\n\n\\boxed{2}"),  # only the closing marker
    # A draft between markers inside the agent's thinking is not the rewrite; the final one is.
    ("<think>Draft: <rewrite>Step 0.</rewrite> no, better:</think>\n<rewrite>Step 1.\n\n\\boxed{2}</rewrite>",
     "Step 1.\n\n\\boxed{2}"),
    ("<think>Draft: <rewrite>Step 0.</rewrite> hmm</think>\n\nStep 1.\n\n\\boxed{2}", "Step 1.\n\n\\boxed{2}"),
    # An R1-style rewrite that is only a think block (no answer part) keeps its tags.
    ("<rewrite><think>Step 1. \\boxed{2}</think></rewrite>", "<think>Step 1. \\boxed{2}</think>"),
]


@pytest.mark.parametrize(("reply", "expected"), REWRITE_CASES)
def test_extract_rewrite(reply, expected):
    assert extract_rewrite(reply) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think>b<THINK>c</THINK>d", "bd"),
        ("reasoning</think>\nanswer", "answer"),
        ("<think>truncated", ""),
        ("plain", "plain"),
        (None, ""),
    ],
)
def test_strip_think(text, expected):
    assert strip_think(text) == expected


# Every role's reply is read after its <think>: a reasoning model's deliberation, closed or cut off, never decides.
THINKING = "<think>\nHmm, is it easy or hard? The verdict could be PASS or FAIL. VERDICT: PASS\n</think>\n\n"
CUT_OFF = "<think>\nOkay, let me see. Label: easy? VERDICT: PASS? The student"


def test_every_parser_reads_after_the_thinking():
    assert parse_label(THINKING + "hard") == "hard"
    assert parse_label(CUT_OFF) is None
    assert parse_verdict(THINKING + "VERDICT: FAIL\nREASON: step 2 is wrong.") == Verdict(False, "step 2 is wrong.")
    assert parse_verdict(CUT_OFF).passed is None
    assert extract_rewrite(THINKING + "Step 1.\n\n\\boxed{2}") == "Step 1.\n\n\\boxed{2}"
    assert extract_rewrite(CUT_OFF) is None


@pytest.mark.parametrize("junk", ["{", "}{", "\x00", "<think>", "</think>", "```", "VERDICT:", "{\"verdict\": 1}", "\\"])
def test_parsers_never_raise(junk):
    assert parse_label(junk) in (*LABELS, None)
    assert isinstance(parse_verdict(junk), Verdict)
    extract_rewrite(junk)
