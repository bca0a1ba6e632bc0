"""Guards that keep what only the agents saw, and unreadable critic replies, out of the training data (pure).

- `find_leak(rewrite, problem)`: the verifier's rule check fails a rewrite that leans on the agent's prompt - the gold
  answer given as a given, "the original reasoning", our templates' headings and tags copied back. The student sees
  only the problem, so such a sentence teaches it to cite a source it will never have.
- `critic_fallback_stats(rows)`: how many of the rows the critic was asked about never got a parseable label; the
  runner stops the run when that share is above `roles.critic.max_fallback_rate` on the first shard.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# Each pattern names one way a rewrite can lean on the prompt. Matched case-insensitively; a phrase that also
# occurs in the problem text is the problem's own wording and is not flagged.
_LEAK_PATTERNS = [
    # the gold answer as a given
    r"\bgold(?:en)?[ _-]answer\b",
    r"\bexpected\s+(?:final\s+)?answer\b",
    r"\breference\s+(?:answer|solution)\b",
    r"\banswer\s+key\b",
    r"\b(?:provided|given|known|stated|target)\s+(?:final\s+)?answer\b",
    r"\b(?:we\s+are|we're|i\s+am|i'm|we\s+were|i\s+was)\s+(?:told|given)\s+(?:that\s+)?the\s+(?:final\s+|correct\s+)?answer\b",
    r"\bthe\s+(?:final\s+|correct\s+)?answer\s+(?:is|was)\s+(?:given|provided|known|stated)\b",
    # the material the agent rewrote
    r"\boriginal\s+(?:reasoning|solution|cot|chain[\s-]+of[\s-]+thought|answer|response|attempt|steps?|version|text|work)\b",
    r"\b(?:previous|earlier|prior)\s+(?:attempt|rewrite|version|solution|reasoning)\b",
    r"\b(?:rewritten|revised|simplified|expanded)\s+(?:version|reasoning|solution|chain[\s-]+of[\s-]+thought|cot)\b",
    r"\bverifier(?:'s)?\b",
    r"\bstudent\s+model\b",
    r"\bteacher\s+model\b",
    # our templates' tags and headings copied back (crv_ray/refine/prompts/*.j2)
    r"</?(?:problem|gold_answer|original_reasoning|chain_of_thought|previous_attempt|verifier_feedback|reasoning|rewrite)>",
    r"^[ \t#*]*(?:problem|gold answer|original reasoning|chain of thought|previous attempt|verifier feedback)[ \t*]*:",
    r"\b(?:solution|reasoning|chain[\s-]+of[\s-]+thought|cot)\s+(?:below|above)\b",
    r"\btoo\s+(?:terse|complex)\s+for\b",
    r"\brewrite\s+the\s+(?:reasoning|solution)\b",
    r"\bsteps?\s+separated\s+by\s+blank\s+lines\b",
    r"\bkeep\s+the\s+step\s+format\b",
    r"\boutput\s+only\s+the\b",
]
_LEAK_RES = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in _LEAK_PATTERNS]


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def find_leak(rewrite: str | None, problem: str | None) -> str | None:
    """The first phrase of `rewrite` that leans on what only the rewriting agent saw, or None.

    A phrase that appears in `problem` itself (e.g. a problem about "the expected answer" of a quiz) is allowed.
    """
    if not rewrite:
        return None
    in_problem = _norm(problem or "")
    hits = []
    for rx in _LEAK_RES:
        for m in rx.finditer(rewrite):
            phrase = " ".join(re.sub(r"[*#]", " ", m.group(0)).split()).replace(" :", ":")
            if phrase and _norm(phrase) not in in_problem:
                hits.append((m.start(), phrase))
                break
    return min(hits)[1] if hits else None


def leak_reason(phrase: str) -> str:
    """The verifier's reason for a leak; also the feedback the next rethink round sees."""
    return (f"leak: the rewrite says {phrase!r}; it must read as a solution of the problem alone, without mentioning "
            "the gold answer, the original reasoning or the prompt")


# ---------------------------------------------------------------- critic fallback
@dataclass(frozen=True)
class FallbackStats:
    asked: int  # rows the critic was asked about
    fallback: int  # of those, rows where no reply held a parseable label
    replies: list[str] = field(default_factory=list)  # the last raw reply of a few fallback rows

    @property
    def rate(self) -> float:
        return self.fallback / self.asked if self.asked else 0.0


def critic_fallback_stats(rows: list[dict], examples: int = 3) -> FallbackStats:
    """Over working rows (one per problem): rows with a critic call, and those whose label is a fallback
    (`label_source == "fallback"`, whether the fallback is a label or an error row)."""
    asked = [r for r in rows if (r.get("critic_attempts") or 0) > 0]
    fallback = [r for r in asked if r.get("label_source") == "fallback"]
    replies = []
    for r in fallback[:examples]:
        raws = json.loads(r["critic_raw"]) if isinstance(r.get("critic_raw"), str) else (r.get("critic_raw") or [])
        replies.append(raws[-1] if raws else "")
    return FallbackStats(asked=len(asked), fallback=len(fallback), replies=replies)


def shorten(text: str | None, limit: int = 240) -> str:
    """A reply for an error message: its start and end when long (a cut-off reply shows where it stopped)."""
    text = text or ""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    return text[:head] + " [...] " + text[-(limit - head):]
