"""A deterministic reply double for the scripted engine (tests and dry runs of the pipeline mechanics).

Behaviour is steered by tags in the problem text, e.g. "[label=easy]", "[critic=garbage]", "[verify=fail1]",
"[student=right]", so one input file can force each branch of the role logic through the real Ray Data stages.
"""

from __future__ import annotations

import re
import time
import zlib

from crv_ray.answers import extract_final_answer


def _tag(row: dict, key: str) -> str | None:
    m = re.search(rf"\[{key}=([a-z0-9_]+)\]", row.get("problem") or "")
    return m.group(1) if m else None


def _with_answer(cot: str, answer: str) -> str:
    body = re.sub(r"\\boxed\{[^{}]*\}", "", cot).rstrip()
    return f"{body}\n\nThe final answer is \\boxed{{{answer}}}."


def _off_by_one(answer: str) -> str:
    try:
        return str(int(float(answer)) + 1)
    except ValueError:
        return answer + "1"


def _default_label(row: dict) -> str:
    # Untagged problems (e.g. synthetic ones) get a label spread by id, so every pair type shows up.
    return ("easy", "medium", "hard")[zlib.crc32(row["problem_id"].encode()) % 3]


def tagged_replies(stage: str, row: dict, messages: list[dict]) -> str:
    gold = row["answer"]
    if _tag(row, "hang") and stage.startswith("critic"):
        time.sleep(int(_tag(row, "hang")))  # a stuck engine, for the watchdog
    if stage.startswith("critic"):
        if _tag(row, "critic") == "garbage":
            return "I am not sure what to say."
        if _tag(row, "critic") == "garbage_once" and stage == "critic_a0":
            return "Hmm."
        return f"Label: {_tag(row, 'label') or _default_label(row)}"
    if stage.startswith("rethink"):
        steps = row["cot"].split("\n\n")
        if (_tag(row, "label") or _default_label(row)) == "easy":
            steps.insert(max(len(steps) - 1, 0), "Let me check this intermediate step carefully.")
        else:
            steps = steps[-2:] if len(steps) > 2 else steps
        return "Here is the rewritten reasoning:\n\n" + _with_answer("\n\n".join(steps), gold)
    if stage.startswith("verify"):
        rnd = int(stage.rsplit("r", 1)[1])
        if _tag(row, "verify") == "fail1" and rnd == 1:
            return "VERDICT: FAIL\nREASON: step 2 skips the subtraction."
        if _tag(row, "verify") == "never":
            return "VERDICT: FAIL\nREASON: the reasoning is not convincing."
        return "VERDICT: PASS\nREASON: every step is correct."
    if stage == "inject":
        cot = messages[-1]["content"]
        pred = extract_final_answer(cot) or gold
        return _with_answer(row["cot"], _off_by_one(pred))
    if stage == "student":
        if _tag(row, "student") == "right":
            return f"Easy. \\boxed{{{gold}}}"
        return f"I think it is \\boxed{{{_off_by_one(gold)}}}"
    raise ValueError(f"no scripted reply for stage {stage}")
