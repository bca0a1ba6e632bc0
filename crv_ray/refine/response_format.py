"""The text format of SFT responses and pairs' chosen/rejected (`refine.response_format`), as pure functions.

R1-style teachers write `<think>reasoning</think> answer`. The formats:
- keep:        the text as it is (the teacher's format; a rewrite in think format keeps its reasoning).
- strip_think: the think blocks dropped, the text after `</think>` kept; where that is empty (a truncated or
               answer-less trace), the reasoning without its tags, never an empty response.
- wrap_think:  `<think>\\nreasoning\\n</think>\\n\\nanswer`; a text without think tags is split into its reasoning
               and its last paragraph (or last line), the final-answer part.
Every text that reaches sft/pairs (original, rewrite, negatives) goes through the same function.
"""

from __future__ import annotations

import re

RESPONSE_FORMATS = ("keep", "strip_think", "wrap_think")

_TAG_RE = re.compile(r"<(/?)think>", re.IGNORECASE)
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")


def split_think(text: str | None) -> tuple[str | None, str]:
    """(reasoning, answer): the text inside think tags and the text outside them, each stripped.

    reasoning is None when the text has no think tag at all. Handled: several blocks (joined by a blank line),
    a first `</think>` without an opening tag (the chat template opened it: what precedes is reasoning) and an
    unclosed `<think>` (a truncated trace: the rest is reasoning).
    """
    if not text:
        return None, ""
    tags = list(_TAG_RE.finditer(text))
    if not tags:
        return None, text.strip()
    thought: list[str] = []
    said: list[str] = []
    inside = bool(tags[0].group(1))  # the text before a leading stray </think> was thinking
    pos = 0
    for tag in tags:
        (thought if inside else said).append(text[pos:tag.start()])
        inside = not tag.group(1)
        pos = tag.end()
    (thought if inside else said).append(text[pos:])

    def join(parts: list[str]) -> str:
        return "\n\n".join(p.strip() for p in parts if p.strip())

    return join(thought), join(said)


def split_final(text: str) -> tuple[str, str]:
    """(reasoning, final part) of a text without think tags: its last paragraph, else its last line, is the final
    part; a one-line text is all final part."""
    text = text.strip()
    paragraphs = _PARAGRAPH_RE.split(text)
    if len(paragraphs) > 1:
        return "\n\n".join(paragraphs[:-1]).strip(), paragraphs[-1].strip()
    lines = text.splitlines()
    if len(lines) > 1:
        return "\n".join(lines[:-1]).strip(), lines[-1].strip()
    return "", text


def wrap(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}".rstrip()


def format_response(text: str | None, mode: str) -> str | None:
    """`text` in the response format `mode` (one of RESPONSE_FORMATS); None stays None."""
    if mode not in RESPONSE_FORMATS:
        raise ValueError(f"unknown response format {mode!r}; expected one of {RESPONSE_FORMATS}")
    if text is None or mode == "keep":
        return text
    reasoning, answer = split_think(text)
    if mode == "strip_think":
        if reasoning is None:
            return text
        return answer or reasoning
    if reasoning is None:
        return wrap(*split_final(text))
    if not answer:  # only thinking (e.g. truncated): its last paragraph is the closest thing to an answer
        return wrap(*split_final(reasoning)) if reasoning else text
    return wrap(reasoning, answer)
