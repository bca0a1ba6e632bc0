"""Final answers: extraction from a CoT, comparison with the gold answer, and the check's four outcomes.

`check_answer(response, gold)` returns an `AnswerCheck` whose `status` is
  correct   - the final answer equals the gold answer;
  wrong     - a final answer was found and it differs;
  no_answer - no final answer could be read (a truncated reply, a reasoning trace cut inside `<think>`, a last
              line whose values disagree); never to be treated as wrong;
  error     - the check itself failed (a bad gold answer, a comparison that ran past `timeout_s`).

Extraction, in this order (the first that yields an answer wins):
 1. The answer region: the text after the last `</think>` (R1/QwQ traces, also Bespoke-Stratos'
    `<|end_of_thought|>`: the answer after the thinking wins over anything inside it); a trace with an unclosed
    `<think>`, or nothing after `</think>`, is thinking only and only a `\\boxed{}` in it counts. Inside the
    region, the content of the last `<answer>...</answer>` tag (a short tag is the answer itself).
 2. `patterns`: user regexes (one capture group each), in order, last match.
 3. Explicit markers: the last `\\boxed{}`/`\\fbox{}`/`\\framebox{}`; a GSM8K `#### X` line; the last
    "The (final) answer is X" / "Answer: X" (Minerva's "Final Answer: The final answer is $x$. I hope it is
    correct." included), when X reads as a value rather than a sentence.
 4. The last non-empty line, which states the answer in most unformatted CoTs ("...so she makes $18 every day.").
    It is read two ways: math-verify's own extraction (LaTeX and expressions, last match first) and the value
    right after the line's last "=" (GSM8K style "... = 15 liters of water out of the 24 liters"). Either
    reading equal to the gold answer makes the CoT correct; it is wrong only when the line is unambiguous (both
    readings agree, or it holds a single value). Otherwise, and when the line holds no value or ends mid-sentence,
    the result is no_answer. math-verify's extraction is not run on the whole CoT: its last match there is often
    an intermediate number, and this module would then call a correct CoT wrong.
Multiple-choice letters (`(C)`, `\\textbf{(C) }7`) are compared as letters when the gold answer is a letter, and
by their value otherwise. `$`, `\\$`, `%`, thousands separators, `\\text{}`, trailing units and `^\\circ` are removed
before comparing.

Comparison: normalised strings, then exact decimals, then math-verify (sympy). sympy can run for ever on some
inputs, and math-verify's own timeouts use `signal.alarm`, which does not work in the Ray worker threads this runs
in. So: a cheap guard (`_safe_for_sympy`) keeps power towers, huge exponents and long inputs from sympy at all, and
every math-verify call runs in one long-lived child process per process (`_SympyWorker`) that is killed and
restarted when a call passes the check's deadline; the check then returns "error" with the reason. Plain numbers
and string-equal answers never reach the child.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

STATUSES = ("correct", "wrong", "no_answer", "error")
DEFAULT_TIMEOUT_S = 5.0

# Longer extracted answers skip math-verify: real final answers are short, and sympy time grows with length.
MAX_VERIFY_CHARS = 500
# Bound on the product of the integers in all exponents of one answer (see _safe_for_sympy).
MAX_EXPONENT_PRODUCT = 10**6
# The last line is cut to this many characters before math-verify's extraction reads it.
MAX_LINE_CHARS = 1000

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
_GOLD_FORMATS = ("auto", "gsm8k", "plain", "boxed")

# "#### 42" on its own line (GSM8K).
_GSM8K_RE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
# "The final answer is X", "The correct answer is X", "Answer: X", "**Final Answer:** X"; X runs to the line end.
_PHRASE_RE = re.compile(
    r"(?:final\s+answer|\banswer|correct\s+(?:option|choice))\s*(?:\*\*)?\s*(?:is\b\s*:?|:)\s*(?:\*\*)?[ \t]*([^\n]*)",
    re.IGNORECASE,
)
# Words that start a sentence rather than a value: "the answer is that ...", "Answer: we add ...".
_PHRASE_STOPWORDS = frozenset(
    "that to not because in we when if given as this it below above follows following of for the there "
    "obtained found simply clearly let".split()
)
# R1/QwQ tags, and Bespoke-Stratos' thought markers.
_THINK_OPEN_RE = re.compile(r"<think>|<\|begin_of_thought\|>", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(r"</think>|<\|end_of_thought\|>", re.IGNORECASE)
_SOLUTION_TAG_RE = re.compile(r"<\|(?:begin|end)_of_solution\|>", re.IGNORECASE)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_CALC_RE = re.compile(r"<<[^<>\n]{0,200}>>")  # GSM8K calculator annotations: 9*2=<<9*2=18>>18
# A "$" that is currency, not LaTeX: followed by a number that no closing "$" ends ("$18 every day", not "$18$").
_CURRENCY_RE = re.compile(r"(?<!\\)\$(?=\d)(?![\d.,]*\$)")
_EQ_VALUE_RE = re.compile(r"=\s*(?:\\?\$\s*)?(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))(?:\s*(?:\\?%))?(?![\d.]*\s*[-+*/×x^]\s*\d)")
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
_LATEX_ENV_RE = re.compile(r"\$\$.*?\$\$|(?<!\\)\$[^$\n]+?(?<!\\)\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)
_CHOICE_IN_LINE_RE = re.compile(r"\(([A-E])\)")
# A line that stops mid-sentence: an operator, an opening bracket or a connective last.
_TRUNCATED_RE = re.compile(
    r"(?:[=+\-*/×÷^(\[{,:;\\]|\b(?:and|or|the|a|an|to|of|is|are|was|we|so|then|that|which|with|by|for|from|"
    r"plus|minus|let|get|gives|equals|be)\b)\s*$",
    re.IGNORECASE,
)
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)$")
_NUMBER_WITH_UNIT_RE = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*[a-zA-Z][a-zA-Z .]*$")
_CHOICE_RE = re.compile(r"^\(?([A-E])\)(?:[\s~]*|\\[ ,;:!]|\\quad)*(.*)$|^([A-E])$", re.DOTALL)
_ASSIGNMENT_RE = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*([^=]+)$")


@dataclass(frozen=True)
class AnswerCheck:
    """The outcome of one check. `status` is one of STATUSES; only "wrong" means a real wrong answer."""

    status: str  # "correct" | "wrong" | "no_answer" | "error"
    predicted: str | None  # the extracted final answer, None if the response has none
    method: str  # "<extraction>:<comparison>", e.g. "boxed:math_verify", "last_line:numeric"; or "no_answer"/"error"
    reason: str | None = None  # why no_answer / error ("no final answer found", "timeout after 5s")

    @property
    def correct(self) -> bool:
        return self.status == "correct"


@dataclass(frozen=True)
class Extraction:
    """The final answer a response states, and how it was found."""

    answer: str | None
    method: str  # pattern | answer_tag | boxed | gsm8k | phrase | last_line | none
    reason: str | None = None  # why there is none
    candidates: tuple[str, ...] = ()  # last_line: each reading of the line (value after "=", math-verify's)
    decisive: bool = True  # last_line: False when the readings disagree (a mismatch is then no_answer)


# ---------------------------------------------------------------------------------------------- extraction
def _match_braces(text: str, start: int) -> int | None:
    """Index just past the `}` closing the `{` at `start`; None if unbalanced. `\\{` and `\\}` do not count."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level `\\boxed{...}` (or `\\fbox{...}`, `\\framebox{...}`), nested braces kept.

    Also reads the brace-less form `\\boxed 5`. A last box left unclosed (a truncated response) gives None,
    not an earlier box: the earlier one may be an intermediate result.
    """
    if not isinstance(text, str):
        return None
    last: str | None = None
    pos = 0
    for m in _BOX_RE.finditer(text):
        if m.start() < pos:  # inside the box just read, e.g. \boxed{\boxed{3}}
            continue
        j = m.end()
        while j < len(text) and text[j] == " " and j - m.end() < 8:  # "\\boxed {3}"
            j += 1
        if text.startswith("{", j):
            end = _match_braces(text, j)
            if end is None:
                return None
            last, pos = text[j + 1 : end - 1].strip(), end
        else:
            bare = re.match(r"([^\s${}]+)", text[j : j + 200]) if j > m.end() else None
            if bare:
                last, pos = bare.group(1).rstrip(".,"), j + bare.end()
    if last and _BOX_RE.match(last) and last.endswith("}"):  # \boxed{\boxed{3}} -> 3
        return extract_boxed(last) or last
    return last or None


def _last_box_unclosed(text: str) -> bool:
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return False
    rest = text[last.end() :].lstrip(" ")
    return rest.startswith("{") and _match_braces(rest, 0) is None


def _trim_phrase_answer(ans: str) -> str:
    ans = ans.strip().strip("*").strip()
    # "Final Answer: The final answer is $x$. I hope it is correct." (Minerva): the inner phrase holds the answer.
    ans = re.sub(r"^(?:the\s+)?(?:final\s+|correct\s+)?answer\s+is\s*:?\s*", "", ans, flags=re.IGNORECASE)
    ans = re.sub(r"\s*I hope it is correct\.?\s*$", "", ans, flags=re.IGNORECASE)
    # Stop at the end of the sentence ("18. Then we ..."), but keep decimals ("3.5").
    ans = re.split(r"\.\s", ans, maxsplit=1)[0]
    return ans.rstrip(".").strip().strip("*").strip()


def _reads_as_value(ans: str) -> bool:
    """Whether a phrase's X is a value ("18 dollars", "$\\frac{1}{2}$", "(C) 7", "Evelyn"), not a sentence."""
    s = _strip_wrappers(_clean(ans))
    if not s or len(s) > 120:
        return False
    words = re.findall(r"(?<![\\A-Za-z])[A-Za-z]{2,}", _LATEX_ENV_RE.sub(" ", s))
    first = re.match(r"[A-Za-z]+", s)
    return len(words) <= 4 and not (first and first.group(0).lower() in _PHRASE_STOPWORDS)


def answer_region(text: str) -> tuple[str, str | None]:
    """(region, thinking_note): where the final answer is looked for; the note is set for thinking-only text."""
    closes = list(_THINK_CLOSE_RE.finditer(text))
    if closes:
        after = _SOLUTION_TAG_RE.sub("", text[closes[-1].end() :])
        if after.strip():
            return after, None
        return text[: closes[-1].start()], "nothing follows </think>"
    if _THINK_OPEN_RE.search(text):
        return text, "the reasoning was cut inside <think> (no </think>)"
    return text, None


def _last_line(region: str) -> str | None:
    """The last line with content; rules, fences and LaTeX display delimiters (`\\]`, `\\end{align*}`) skipped."""
    for line in reversed(region.splitlines()):
        s = re.sub(r"^(?:[-+]\s+|#+\s*|>\s*)", "", line.strip()).strip("*` ")  # bullets, headings, quotes, bold
        s = re.sub(r"\\\\\s*$", "", s).strip()  # a LaTeX line break "\\\\"
        if s and not re.fullmatch(r"[-=_*~`]+|\\\]|\\\[|\$\$|\\(?:begin|end)\{[^{}]*\}", s):
            return s
    return None


def _count_values(line: str) -> int:
    """Values a line states: each LaTeX span counts once, plus the bare numbers outside them."""
    spans = _LATEX_ENV_RE.findall(line)
    return len(spans) + len(_NUMBER_RE.findall(_LATEX_ENV_RE.sub(" ", line)))


def _read_last_line(region: str, deadline: float | None) -> Extraction:
    line = _last_line(region)
    if line is None:
        return Extraction(None, "none", "no final answer found (the response is empty)")
    line = _CURRENCY_RE.sub("", _CALC_RE.sub("", line.replace("**", "").replace("__", "")))[-MAX_LINE_CHARS:]
    shown = line if len(line) <= 80 else "..." + line[-77:]
    if line.rstrip().endswith("?"):
        return Extraction(None, "none", f"no final answer found: the last line is a question ({shown!r})")
    if _TRUNCATED_RE.search(line):
        return Extraction(None, "none", f"no final answer found: the text ends mid-sentence ({shown!r})")
    choices = _CHOICE_IN_LINE_RE.findall(line)
    choice = f"({choices[-1]})" if choices else None
    eq_matches = list(_EQ_VALUE_RE.finditer(line))
    last_eq = line.rfind("=")
    eq = eq_matches[-1].group(1) if eq_matches and eq_matches[-1].start() == last_eq else None
    outcome, mv = _SYMPY.call("extract", [line], deadline)
    if outcome == "timeout":
        return Extraction(None, "error", f"timeout: math-verify's extraction of the last line ran past the deadline ({shown!r})")
    if outcome != "ok":
        mv = None
    candidates = tuple(dict.fromkeys(c for c in (eq, mv, choice) if c))
    if not candidates:
        return Extraction(None, "none", "no final answer found: no \\boxed{}, '####', 'The answer is' or 'Answer:', "
                          f"and the last line states no value ({shown!r})")
    if choice:  # "the correct option is (B)": decisive only when the line holds no other value
        decisive = len(candidates) == 1
    elif eq and mv:
        decisive = _compare_values(eq, mv, deadline)[0] is True
    else:
        decisive = _count_values(line) == 1
    return Extraction(candidates[0], "last_line", candidates=candidates, decisive=decisive)


def extract_answer(text: str, *, patterns: Sequence[str] | None = None,
                   timeout_s: float | None = DEFAULT_TIMEOUT_S) -> Extraction:
    """The final answer of a response (see the module docstring for the order). Never raises."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        return _extract(text, patterns, deadline)
    except Exception as e:  # noqa: BLE001 - e.g. a user pattern that fails on this text
        return Extraction(None, "error", f"{type(e).__name__}: {e}")


def _extract(text: str, patterns: Sequence[str] | None, deadline: float | None) -> Extraction:
    if not isinstance(text, str) or not text.strip():
        return Extraction(None, "none", "no final answer found (the response is empty)")
    region, thinking_note = answer_region(text)
    tags = _ANSWER_TAG_RE.findall(region)
    if tags and tags[-1].strip():
        content = tags[-1].strip()
        if "\n" not in content and len(content) <= 200 and not _BOX_RE.search(content):
            return Extraction(content, "answer_tag")
        region = content
    for pat in patterns or ():
        hits = [m.group(1).strip() for m in re.finditer(pat, region) if m.group(1) and m.group(1).strip()]
        if hits:
            return Extraction(hits[-1], "pattern")
    boxed = extract_boxed(region)
    if boxed:
        return Extraction(boxed, "boxed")
    if _last_box_unclosed(region):
        return Extraction(None, "none", "no final answer found: the last \\boxed{ is not closed (truncated?)")
    if thinking_note:
        return Extraction(None, "none", f"no final answer found: {thinking_note}")
    gsm = [m.group(1) for m in _GSM8K_RE.finditer(region) if m.group(1).strip()]
    if gsm:
        return Extraction(gsm[-1].strip(), "gsm8k")
    phrases = list(_PHRASE_RE.finditer(region))
    if phrases:
        ans = _trim_phrase_answer(phrases[-1].group(1))
        if ans and _reads_as_value(ans):
            return Extraction(ans, "phrase")
    return _read_last_line(region, deadline)


def extract_final_answer(text: str, patterns: Sequence[str] | None = None) -> str | None:
    """The final answer `check_answer` would compare (for the last-line form, its first reading), or None."""
    return extract_answer(text, patterns=patterns).answer


def normalize_gold(answer: str, fmt: str = "auto") -> str:
    """The gold answer to compare against.

    fmt "gsm8k" (or "auto" on text with a `####` line): what follows the last `####`, thousands separators removed.
    "boxed" (or "auto" with a box): the last box's content. Otherwise, and for "plain": the stripped text.
    """
    if fmt not in _GOLD_FORMATS:
        raise ValueError(f"answer format {fmt!r} is not one of {_GOLD_FORMATS}")
    if not isinstance(answer, str):
        raise ValueError(f"answer must be a string, got {type(answer).__name__}")
    result: str | None = None
    gsm = _GSM8K_RE.findall(answer)
    if fmt == "gsm8k" or (fmt == "auto" and gsm):
        if not gsm:
            raise ValueError("answer has no '#### <answer>' line (answer format 'gsm8k')")
        result = re.sub(r"(?<=\d),(?=\d{3}\b)", "", gsm[-1].strip())
    elif fmt in ("auto", "boxed"):
        result = extract_boxed(answer)
    if result is None and fmt != "gsm8k":
        result = answer.strip()
    if not result:
        raise ValueError(f"answer is empty after normalisation (answer format {fmt!r}): {answer[:80]!r}")
    return result


# ------------------------------------------------------------------------------ math-verify in a child process
_TIMEOUT, _WORKER_PREFIX = "timeout", "@@crv-answers "


def _mv_verify(gold: str, pred: str) -> bool | None:
    """math-verify's verdict on two extracted answers; None if it cannot parse one side."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)  # type: ignore[arg-type]
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)  # type: ignore[arg-type]
    if not gold_parsed or not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))  # type: ignore[arg-type]


def _mv_extract(line: str) -> str | None:
    """math-verify's own extraction (LaTeX, then expressions; last match first) of one line, as text."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    found = parse(line, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                  parsing_timeout=None)  # type: ignore[arg-type]
    texts = [f for f in found if isinstance(f, str) and f.strip()]
    if texts:
        return texts[-1].strip()
    return str(found[0]) if found else None


_TASKS = {"verify": _mv_verify, "extract": _mv_extract}


def _worker_main() -> None:
    """The child's loop: one JSON request per stdin line, one prefixed JSON reply per stdout line; ends at EOF."""
    import logging

    logging.disable(logging.WARNING)  # math-verify warns that its own timeout is off: the parent bounds it
    out = sys.stdout
    sys.stdout = sys.stderr  # a library that prints must not corrupt the protocol
    import math_verify  # noqa: F401 - load sympy before saying ready

    out.write(_WORKER_PREFIX + "ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            reply = {"ok": True, "value": _TASKS[req["task"]](*req["args"])}
        except Exception as e:  # noqa: BLE001 - any sympy failure is "no verdict", reported to the parent
            reply = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        out.write(_WORKER_PREFIX + json.dumps(reply) + "\n")
        out.flush()


class _SympyWorker:
    """A long-lived child process that runs math-verify; killed and restarted when a call passes its deadline.

    One per process, started on first use; calls from several threads take turns. A thread cannot be
    interrupted (and a C-level big-integer operation not even by a signal), a process can.
    """

    STARTUP_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid = os.getpid()
        self._buf = b""
        self.starts = 0  # for tests and measurements
        self.kills = 0

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from crv_ray.answers import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        self._buf = b""
        self.starts += 1
        if self._readline(time.monotonic() + self.STARTUP_TIMEOUT_S) != "ready":
            self._kill()
            raise RuntimeError(f"the math-verify child process did not start within {self.STARTUP_TIMEOUT_S:g} s")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._buf = b""

    def _readline(self, deadline: float | None) -> str | None:
        """The next protocol line, or None at the deadline; raises if the child died."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buf:
                    raw, self._buf = self._buf.split(b"\n", 1)
                    text = raw.decode("utf-8", "replace")
                    if text.startswith(_WORKER_PREFIX):
                        return text[len(_WORKER_PREFIX) :]
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                if not sel.select(wait):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"the math-verify child process exited (code {self._proc.wait()}); "
                                       "`python -c 'from crv_ray.answers import _worker_main; _worker_main()'` shows why")
                self._buf += chunk

    def call(self, task: str, args: list, deadline: float | None) -> tuple[str, object]:
        """("ok", value) | ("timeout", None) | ("error", message)."""
        with self._lock:
            if self._owner_pid != os.getpid():  # a forked copy: the child belongs to the parent process
                self._proc, self._owner_pid, self._buf = None, os.getpid(), b""
            if deadline is not None and deadline <= time.monotonic():
                return _TIMEOUT, None
            try:
                if self._proc is None or self._proc.poll() is not None:
                    started = time.monotonic()
                    self._start()
                    if deadline is not None:  # starting (importing sympy) is not the check's time
                        deadline += time.monotonic() - started
                assert self._proc is not None and self._proc.stdin is not None
                self._proc.stdin.write((json.dumps({"task": task, "args": args}) + "\n").encode())
                self._proc.stdin.flush()
                line = self._readline(deadline)
            except (OSError, RuntimeError, ValueError) as e:
                self._kill()
                return "error", str(e)
            if line is None:
                self._kill()
                self.kills += 1
                return _TIMEOUT, None
            reply = json.loads(line)
            return ("ok", reply["value"]) if reply["ok"] else ("error", reply["error"])

    def close(self) -> None:
        with self._lock:
            self._kill()


_SYMPY = _SympyWorker()
atexit.register(_SYMPY.close)


# ------------------------------------------------------------------------------------------------ checking
def _clean(ans: str) -> str:
    """Surface clean-up before any comparison: `$`s, currency, a trailing period, thousands separators, units, %."""
    s = ans.strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        while len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = s.rstrip(".").strip()
    s = re.sub(r"^(?:\\\$|\$)\s*(?=[-+]?\.?\d)", "", s)  # "$18", "\$18"
    s = re.sub(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\s(?:percent|per cent))$", "", s)  # "25\%", "25 percent"
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    m = _NUMBER_WITH_UNIT_RE.match(_strip_wrappers(s))  # "18 dollars", "5\text{ cm}"
    if m:
        s = m.group(1)
    return s


def _exponent_bodies(s: str) -> list[str]:
    """The text of every exponent (`^{...}` or the token after `^`); also the upper bounds of sums/products."""
    bodies = []
    for m in re.finditer(r"\^\s*", s):
        j = m.end()
        if s.startswith("{", j):
            end = _match_braces(s, j)
            bodies.append(s[j + 1 : end - 1] if end else s[j:])
        elif s.startswith("(", j):  # 9^(9^9): the whole parenthesised group (unbalanced: the rest)
            depth, end = 0, len(s)
            for k in range(j, len(s)):
                depth += {"(": 1, ")": -1}.get(s[k], 0)
                if depth == 0:
                    end = k + 1
                    break
            bodies.append(s[j:end])
        else:
            tok = re.match(r"\\?[A-Za-z]+|\d+", s[j:])
            bodies.append(tok.group(0) if tok else s[j : j + 1])
    return bodies


def _safe_for_sympy(s: str) -> bool:
    """Heuristic first guard: no input that makes sympy evaluate a gigantic number (minutes, or for ever).

    Rejects long inputs, power towers (`9^{9^{9}}`, `9^9^9`), an exponent with more than 4 digits
    (`2^{100000}`, also `\\prod_{k=1}^{100000}`), exponents compounding through brackets (`(9999^{9999})^{9999}`),
    nested or large sums/products/binomials, `\\uparrow`, and factorials of anything but a small integer.
    What passes still runs under the child process's deadline.
    """
    if len(s) > MAX_VERIFY_CHARS or "\\uparrow" in s:
        return False
    s = s.replace("**", "^")
    exponent_digits, exponent_product = 0, 1
    for body in _exponent_bodies(s):
        digits = sum(ch.isdigit() for ch in body)
        if "^" in body or "!" in body or digits > 4:
            return False
        exponent_digits += digits
        for num in re.findall(r"\d+", body):
            exponent_product *= max(int(num), 1)
    if exponent_product > MAX_EXPONENT_PRODUCT:
        return False
    # Sums, products and binomials multiply the cost: \sum_{k=1}^{9999} k^{9999} alone ran for minutes.
    big_operators = len(re.findall(r"\\(?:sum|prod|binom|choose|int|lim)", s))
    if big_operators > 1 or (big_operators and (exponent_digits > 4 or re.search(r"\d{5}", s))):
        return False
    if re.search(r"\^\s*(?:\{[^{}]*\}|\\?\w+)\s*\^", s):  # a^b^c without braces
        return False
    for m in re.finditer(r"!", s):
        num = re.search(r"(\d+)\s*$", s[: m.start()])
        if num is None or int(num.group(1)) > 1000:
            return False
    return True


def _strip_wrappers(s: str) -> str:
    # \text{...} and friends: keep the content. Repeated so that one level of nesting goes too.
    for _ in range(3):
        s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    return s


def _normalize_str(ans: str) -> str:
    s = _strip_wrappers(_clean(ans))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)  # degrees
    s = re.sub(r"\\left|\\right|\\[,;:! ]|\\\$|\$|\\%|%", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    m = re.fullmatch(r"\(([-+]?\d+(?:\.\d+)?)\)", s)  # AIME's \textbf{(073)}: a number in brackets
    return m.group(1) if m else s


def _decimal(s: str) -> Decimal | None:
    n = _normalize_str(s)
    if not _DECIMAL_RE.match(n):
        return None
    try:
        return Decimal(n)  # exact, and no overflow to inf
    except InvalidOperation:
        return None


def _split_choice(ans: str) -> tuple[str | None, str]:
    """("C", "7") for "(C) 7" / "\\textbf{(C) }7"; (None, ans) when the answer is no choice letter."""
    s = _strip_wrappers(ans.strip()).strip().strip("$").strip()
    m = _CHOICE_RE.match(s)
    if not m:
        return None, ans
    return (m.group(1) or m.group(3)), (m.group(2) or "").strip()


def _compare_values(gold: str, pred: str, deadline: float | None) -> tuple[bool | None, str, str | None]:
    """(verdict, comparison, reason): verdict None means no verdict (reason says why)."""
    g, p = _clean(gold), _clean(pred)
    if "=" not in g:
        m = _ASSIGNMENT_RE.match(p)  # "x = 5" against "5"
        if m:
            p = m.group(1).strip()
    ng, np_ = _normalize_str(g), _normalize_str(p)
    if not ng or not np_:
        return False, "string", None
    if ng == np_:
        return True, "string", None
    dg, dp = _decimal(g), _decimal(p)
    if dg is not None and dp is not None:
        return dg == dp, "numeric", None
    if not (_safe_for_sympy(g) and _safe_for_sympy(p)):
        return False, "string", None
    outcome, verdict = _SYMPY.call("verify", [g, p], deadline)
    if outcome == _TIMEOUT:
        return None, "math_verify", "timeout: math-verify ran past the check's deadline"
    if outcome == "ok" and verdict is not None:
        return bool(verdict), "math_verify", None
    return False, "string", None  # math-verify could not parse one side: the string compare decided


def _compare(gold: str, pred: str, deadline: float | None) -> tuple[str, str, str | None]:
    """(status, comparison, reason) for one extracted answer against the normalised gold answer."""
    gl, _ = _split_choice(gold)
    if gl is not None and _split_choice(gold)[1] == "":  # the gold answer is a bare choice letter
        pl, _ = _split_choice(pred)
        if pl is not None:
            return ("correct" if pl == gl else "wrong"), "choice", None
        if re.fullmatch(r"[A-E]", _clean(pred)):
            return ("correct" if _clean(pred) == gl else "wrong"), "choice", None
        return "no_answer", "choice", f"the answer {pred[:80]!r} is no choice letter; the gold answer is ({gl})"
    pl, rest = _split_choice(pred)
    if pl is not None:
        if not rest:
            return "no_answer", "choice", f"the answer is only the choice letter ({pl}); the gold answer {gold[:80]!r} is a value"
        pred = rest
    verdict, how, reason = _compare_values(gold, pred, deadline)
    if verdict is None:
        return "error", how, reason
    return ("correct" if verdict else "wrong"), how, None


def check_answer(
    response: str,
    gold: str,
    *,
    patterns: Sequence[str] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> AnswerCheck:
    """Extract the final answer of `response` and compare it with `gold`. Never raises, never hangs.

    `patterns`: extra answer regexes (one group), tried first. `timeout_s`: bound on the whole check's math-verify
    work (None: unbounded); past it the status is "error".
    """
    start = time.monotonic()
    deadline = start + timeout_s if timeout_s else None
    try:
        ext = _extract(response, patterns, deadline)
        if ext.answer is None:
            if ext.method == "error":
                return AnswerCheck("error", None, "error", _with_time(ext.reason, timeout_s))
            return AnswerCheck("no_answer", None, "no_answer", ext.reason or "no final answer found")
        try:
            gold_norm = normalize_gold(gold, "auto")
        except ValueError as e:
            return AnswerCheck("error", ext.answer, f"{ext.method}:none", f"bad gold answer: {e}")
        results = []
        for cand in ext.candidates or (ext.answer,):
            status, how, reason = _compare(gold_norm, cand, deadline)
            if status == "correct":
                return AnswerCheck("correct", cand, f"{ext.method}:{how}")
            results.append((cand, status, how, reason))
        cand, status, how, reason = next((r for r in results if r[1] == "error"), results[0])
        if status == "error":
            return AnswerCheck("error", cand, f"{ext.method}:{how}", _with_time(reason, timeout_s))
        if status == "wrong" and not ext.decisive:
            shown = ", ".join(repr(c[:40]) for c in ext.candidates)
            return AnswerCheck("no_answer", cand, f"{ext.method}:{how}",
                               f"no explicit final answer, and the last line is ambiguous (it reads as {shown}; "
                               "none equals the gold answer)")
        return AnswerCheck(status, cand, f"{ext.method}:{how}", reason)
    except Exception as e:  # noqa: BLE001 - a checker inside a data pipeline must not kill the batch
        return AnswerCheck("error", None, "error", f"{type(e).__name__}: {e}")


def _with_time(reason: str | None, timeout_s: float | None) -> str:
    if reason and reason.startswith("timeout") and timeout_s:
        return f"timeout after {timeout_s:g}s: " + reason.split(": ", 1)[-1]
    return reason or "the check failed"


def answers_equal(a: str, b: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two extracted final answers are the same value (symmetric). Never raises."""
    try:
        if not isinstance(a, str) or not isinstance(b, str) or not a.strip() or not b.strip():
            return False
        deadline = time.monotonic() + timeout_s if timeout_s else None
        return _compare(a, b, deadline)[0] == "correct" or _compare(b, a, deadline)[0] == "correct"
    except Exception:  # noqa: BLE001
        return False
