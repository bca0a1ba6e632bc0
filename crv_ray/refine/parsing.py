"""Parse the LLM roles' replies: critic label, verifier verdict, rethinker rewrite.

Pure functions that never raise on any string (or None): a reply that cannot be read gives None, which the
caller records as a parse failure (retry, then a configured fallback).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

LABELS = ("easy", "medium", "hard")
REASON_MAX_CHARS = 500

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_UP_TO_LAST_CLOSE = re.compile(r".*</think>", re.IGNORECASE | re.DOTALL)


def strip_think(text: str | None) -> str:
    """Remove `<think>...</think>` blocks, an unclosed `<think>` section (truncated thinking) and the
    thinking before a stray `</think>` (chat templates that put the opening tag in the prompt)."""
    if not text:
        return ""
    text = _THINK_BLOCK.sub("", text)
    stray = _UP_TO_LAST_CLOSE.match(text)
    if stray is not None:
        text = text[stray.end():]
    if _THINK_OPEN.match(text.lstrip()):
        return ""
    return text.strip()


# ---- critic label ----

_LABEL = r"(?<![\w-])(easy|medium|hard)(?![\w-])"
_LABEL_RE = re.compile(_LABEL)
# "label: x", "the answer is: x", "classification - x", "final answer: x", "\boxed{x}".
_LABELLED_RE = re.compile(
    r"(?:label|answer|classification|category|rating|verdict|difficulty|judge?ment|assessment|final|boxed)"
    r"[\s:=\-{(]*(?:(?:is|should be|would be|=)[\s:=\-]*)?" + _LABEL + r"(?!\s+to\s)"
)
# Mentions that are not a label: "not easy", "not too hard", "easy to follow", "hard to say".
_NOT_A_LABEL_RE = re.compile(r"\bnot\s+(?:too\s+|very\s+|so\s+)?" + _LABEL + r"|" + _LABEL + r"\s+to\s+\w+")
_MARKUP_RE = re.compile(r"[*_`#>~\"|\[\]]")


def _clean(text: str) -> str:
    return _MARKUP_RE.sub(" ", text).lower()


def _distinct(labels: list[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def parse_label(reply: str | None) -> str | None:
    """The critic's label (easy/medium/hard) read from a noisy reply, or None if absent or ambiguous."""
    text = _clean(strip_think(reply))
    if not text.strip():
        return None
    # 1. An explicitly labelled answer wins; the last one if the model restates itself.
    labelled = _LABELLED_RE.findall(text)
    if labelled:
        return labelled[-1]
    lines = [line.strip(" \t.,;:!?()'-") for line in text.splitlines()]
    lines = [line for line in lines if line]
    # 2. Lines that hold only a label ("medium." after an explanation, or before one).
    bare = _distinct([line for line in lines if line in LABELS])
    if len(bare) == 1:
        return bare[0]
    if len(bare) > 1:
        return None
    # 3. Free text: one distinct label, ignoring negated and adjectival mentions.
    free = _NOT_A_LABEL_RE.sub(" ", text)
    mentioned = _distinct(_LABEL_RE.findall(free))
    if len(mentioned) == 1:
        return mentioned[0]
    if not mentioned:
        return None
    # 4. Several labels: trust the last line if it names exactly one ("easy or hard?" stays ambiguous).
    last_line = _NOT_A_LABEL_RE.sub(" ", lines[-1])
    in_last = _distinct(_LABEL_RE.findall(last_line))
    return in_last[0] if len(in_last) == 1 else None


# ---- verifier verdict ----


@dataclass(frozen=True)
class Verdict:
    """passed is None when the reply could not be read."""

    passed: bool | None
    reason: str


_VERDICT_WORDS = {
    "pass": True, "passed": True, "correct": True, "yes": True, "true": True, "valid": True,
    "fail": False, "failed": False, "incorrect": False, "no": False, "false": False, "invalid": False,
    "wrong": False,
}
_VERDICT_LINE_RE = re.compile(
    r"verdict\s*[:=\-]*\s*(pass(?:ed)?|fail(?:ed)?|correct|incorrect|yes|no|true|false|valid|invalid|wrong)\b"
    r"(?!\s*(?:/|\bor\b))"  # "VERDICT: PASS/FAIL" echoes the format, it is no verdict
)
_REASON_RE = re.compile(r"^[ \t]*reason(?:ing)?\s*[:=\-]+\s*", re.MULTILINE | re.IGNORECASE)
_JSON_RE = re.compile(r"\{.*\}", re.DOTALL)
# "PASS.", "Fail: ...", "Yes.", "No, step 3 ..." - but not "No errors found" or "Yes and no".
_LEADING_WORD_RE = re.compile(r"^\s*(?:(pass(?:ed)?|fail(?:ed)?)\b|(yes|no)\s*(?:[.,:;!\-]|$))")
_NEGATIVE_RE = re.compile(r"\b(?:incorrect|not\s+correct|wrong|invalid|not\s+valid)\b")
_POSITIVE_RE = re.compile(r"\b(?:correct|valid)\b")
_BARE_RE = re.compile(r"\b(PASS|FAIL)\b")


def _truncate(text: str) -> str:
    return " ".join(text.split())[:REASON_MAX_CHARS]


def _json_verdict(text: str) -> Verdict | None:
    match = _JSON_RE.search(text)
    if match is None:
        return None
    try:
        obj = json.loads(match.group(0))
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    obj = {str(k).lower(): v for k, v in obj.items()}
    for key in ("verdict", "passed", "pass", "result", "correct"):
        value = obj.get(key)
        if isinstance(value, bool):
            passed = value
        elif isinstance(value, str) and value.strip().lower() in _VERDICT_WORDS:
            passed = _VERDICT_WORDS[value.strip().lower()]
        else:
            continue
        reason = next((obj[k] for k in ("reason", "explanation", "feedback") if isinstance(obj.get(k), str)), "")
        return Verdict(passed, _truncate(reason))
    return None


def _without_verdict_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not _VERDICT_LINE_RE.search(_clean(line)))


def _reason(text: str) -> str:
    # Markup becomes spaces of the same length, so the match's offsets hold in the original text.
    match = _REASON_RE.search(_MARKUP_RE.sub(" ", text))
    if match is not None:
        text = text[match.end():]
    return _truncate(_without_verdict_lines(text))


def _line_verdict(line: str) -> bool | None:
    leading = _LEADING_WORD_RE.match(line)
    if leading is not None:
        return _VERDICT_WORDS[leading.group(1) or leading.group(2)]
    if _NEGATIVE_RE.search(line):
        return False  # any error named on the verdict line is a failure
    if _POSITIVE_RE.search(line):
        return True
    return None


def parse_verdict(reply: str | None) -> Verdict:
    """The verifier's verdict: `VERDICT: PASS|FAIL` + `REASON: ...`, JSON, or a leading/closing word."""
    text = strip_think(reply)
    if not text:
        return Verdict(None, "")
    from_json = _json_verdict(text)
    if from_json is not None:
        return from_json
    cleaned = _clean(text)
    # Last VERDICT line wins: a model that corrects itself ends with its final call.
    verdicts = _VERDICT_LINE_RE.findall(cleaned)
    if verdicts:
        return Verdict(_VERDICT_WORDS[verdicts[-1]], _reason(text))
    lines = [line.strip() for line in cleaned.splitlines() if line.strip()]
    passed = _line_verdict(lines[0]) if lines else None
    if passed is None and len(lines) > 1:
        passed = _line_verdict(lines[-1])
    if passed is None:
        bare = set(_BARE_RE.findall(_MARKUP_RE.sub(" ", text)))
        passed = (bare == {"PASS"}) if len(bare) == 1 else None
    return Verdict(passed, _reason(text))


# ---- rethinker rewrite ----

_INTERJECTION = r"(?:sure|certainly|of course|okay|ok|absolutely|alright|great)"
_BARE_INTERJECTION_RE = re.compile(_INTERJECTION + r"[\s!.,]*", re.IGNORECASE)
_INTRO_RE = re.compile(
    r"(?:" + _INTERJECTION + r"[\s!.,]*)?(?:here\s+(?:is|are|'s)|below\s+is|the\s+following\s+is)\b.*",
    re.IGNORECASE,
)
_ABOUT_REWRITE_RE = re.compile(
    r"\b(?:reasoning|solution|version|rewrite|cot|chain of thought|steps?)\b", re.IGNORECASE
)
_REWRITE_ADJ_RE = re.compile(r"\b(?:rewritten|revised|simplified|expanded|corrected|new|updated)\b", re.IGNORECASE)
_OUTRO_RE = re.compile(r"^(?:let me know|i hope|hope this|feel free)\b", re.IGNORECASE)
_FENCE_RE = re.compile(r"\A```[\w+-]*[ \t]*\n(.*?)\n?```\Z", re.DOTALL)
_TAG_RE = re.compile(r"\A<([A-Za-z_][\w-]*)>\s*(.*?)\s*</\1>\Z", re.DOTALL)


def _is_chatter(line: str) -> bool:
    """An intro line such as "Sure! Here is the rewritten reasoning:" - never a CoT's "Okay, so we need..."."""
    raw = line.strip()
    plain = raw.strip("*#_ ").strip()
    if not plain or len(plain) > 200:
        return False
    if _BARE_INTERJECTION_RE.fullmatch(plain):
        return True
    about = _ABOUT_REWRITE_RE.search(plain) is not None
    if _INTRO_RE.fullmatch(plain) and (plain.endswith(":") or about):
        return True
    heading = raw.startswith("#") or (raw.startswith("**") and raw.endswith("**"))
    return about and _REWRITE_ADJ_RE.search(plain) is not None and (plain.endswith(":") or heading)


_REWRITE_OPEN_RE = re.compile(r"<rewrite>", re.IGNORECASE)
_REWRITE_CLOSE_RE = re.compile(r"</rewrite>", re.IGNORECASE)
_THINK_TAG_RE = re.compile(r"<(/?)think>", re.IGNORECASE)


def drop_agent_thinking(reply: str | None) -> str:
    """An agent's reply without the agent's own deliberation; a rewrite's own `<think>` format is kept.

    The rule (the rethink and inject prompts ask for `<rewrite>...</rewrite>`):
    1. Marked: the content of the last `<rewrite>` block (unclosed: to the end of the reply), verbatim, think tags
       included - unless a `</think>` follows it, which makes it a draft inside the agent's deliberation.
    2. Unmarked: a leading `<think>...</think>` block, or everything before a first `</think>` that has no opening
       tag (chat templates that open the tag in the prompt), is the agent's deliberation and is dropped; the rest is
       the rewrite, its own think blocks kept. A reply that never closes its leading `<think>` was cut off: "".
    So an unmarked rewrite in think format written by an agent that does not think loses its leading think block;
    the markers are what make a think-format rewrite unambiguous.
    """
    if not reply:
        return ""
    opens = list(_REWRITE_OPEN_RE.finditer(reply))
    if opens:
        start = opens[-1].end()
        close = _REWRITE_CLOSE_RE.search(reply, start)
        after = reply[close.end():] if close else ""
        if not re.search(r"</think>", after, re.IGNORECASE):
            return reply[start:close.start() if close else len(reply)].strip()
    text = reply
    first = _THINK_TAG_RE.search(text)
    if first is not None and first.group(1):  # a first </think> with no opening tag
        text = text[first.end():]
    elif first is not None and not text[:first.start()].strip():
        close = re.search(r"</think>", text[first.end():], re.IGNORECASE)
        if close is None:
            return ""
        text = text[first.end() + close.end():]
    # A lone closing marker ("...</rewrite>" with no opening one) ends the rewrite.
    close = _REWRITE_CLOSE_RE.search(text)
    if close is not None:
        text = text[:close.start()]
    return text.strip()


def extract_rewrite(reply: str | None) -> str | None:
    """The rethinker's (or injector's) new reasoning: the agent's own thinking dropped (`drop_agent_thinking`), a
    chatty intro/outro, code fences and a wrapping tag removed; a rewrite in `<think>` format keeps its tags."""
    lines = drop_agent_thinking(reply).splitlines()
    for _ in range(3):
        while lines and not lines[0].strip():
            lines.pop(0)
        if lines and _is_chatter(lines[0]):
            lines.pop(0)
    while lines and (not lines[-1].strip() or _OUTRO_RE.match(lines[-1].strip())):
        lines.pop()
    text = "\n".join(lines).strip()
    fence = _FENCE_RE.match(text)
    # Unwrap only one fence around everything, not a reply that opens and closes with two code blocks.
    if fence is not None and not re.search(r"^```", fence.group(1), re.MULTILINE):
        text = fence.group(1).strip()
    tag = _TAG_RE.match(text)
    if tag is not None and tag.group(1).lower() != "think":  # a rewrite that is all thinking keeps its format
        text = tag.group(2).strip()
    return text or None
