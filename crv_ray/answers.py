"""Final-answer extraction and checking: `\\boxed{}`, GSM8K `####`, "final answer is" phrases, math-verify.

Pure functions; they run inside Ray Data workers, often outside the main thread. math-verify's own timeouts use
`signal.alarm`, which fails outside the main thread (and cannot interrupt a long C-level big-integer operation
anyway), so it is always called with its timeouts off. Instead, inputs that could make sympy run for ever
(power towers, huge exponents, big factorials) or that are long are not given to math-verify; they fall back
to the normalised string compare, which is linear in the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from math_verify import parse, verify

# Longer extracted answers skip math-verify: real final answers are short, and sympy time grows with length.
MAX_VERIFY_CHARS = 500
# Bound on the product of the integers in all exponents of one answer (see _safe_for_sympy).
MAX_EXPONENT_PRODUCT = 10**6

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_GOLD_FORMATS = ("auto", "gsm8k", "plain", "boxed")

# "#### 42" on its own line (GSM8K).
_GSM8K_RE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
# "The final answer is X", "Answer: X", "**Final Answer:** X"; X runs to the end of the line.
_PHRASE_RE = re.compile(
    r"(?:final\s+answer|\banswer)\s*(?:\*\*)?\s*(?:is\b\s*:?|:)\s*(?:\*\*)?[ \t]*([^\n]*)",
    re.IGNORECASE,
)
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)$")
_NUMBER_WITH_UNIT_RE = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*[a-zA-Z][a-zA-Z ]*$")


@dataclass(frozen=True)
class AnswerCheck:
    predicted: str | None  # the extracted final answer, None if the response has none
    correct: bool
    method: str  # "math_verify", "string", "no_answer" (or "error": an unexpected failure, counted wrong)


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
    """Content of the last top-level `\\boxed{...}` (or `\\fbox{...}`), nested braces kept.

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


def _trim_phrase_answer(ans: str) -> str:
    ans = ans.strip().strip("*").strip()
    # Stop at the end of the sentence ("18. Then we ..."), but keep decimals ("3.5").
    ans = re.split(r"\.\s", ans, maxsplit=1)[0]
    return ans.rstrip(".").strip()


def extract_final_answer(text: str) -> str | None:
    """The last boxed answer; else the last GSM8K `#### X`; else the last "final answer is X" / "Answer: X"."""
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    gsm = [m.group(1) for m in _GSM8K_RE.finditer(text) if m.group(1).strip()]
    if gsm:
        return gsm[-1].strip()
    for m in reversed(list(_PHRASE_RE.finditer(text))):
        ans = _trim_phrase_answer(m.group(1))
        if ans:
            return ans
    return None


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


# ------------------------------------------------------------------------------------------------ checking
def _clean(ans: str) -> str:
    """Surface clean-up before any comparison: `$`s, currency, a trailing period, thousands separators, units."""
    s = ans.strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        while len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = s.rstrip(".").strip()
    s = re.sub(r"^(?:\\\$|\$)\s*(?=[-+]?\d)", "", s)  # "$18", "\$18"
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    m = _NUMBER_WITH_UNIT_RE.match(s)  # "18 dollars", "5 cm"
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
    """Heuristic: no input that makes sympy evaluate a gigantic number (it then runs for minutes or for ever).

    Rejects long inputs, power towers (`9^{9^{9}}`, `9^9^9`), an exponent with more than 4 digits
    (`2^{100000}`, also `\\prod_{k=1}^{100000}`), exponents compounding through brackets (`(9999^{9999})^{9999}`),
    nested or large sums/products/binomials, `\\uparrow`, and factorials of anything but a small integer.
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


def _math_verify_equal(gold: str, pred: str) -> bool | None:
    """math-verify's verdict, or None if it could not parse one side (then the string compare decides)."""
    if not (_safe_for_sympy(gold) and _safe_for_sympy(pred)):
        return None
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)  # type: ignore[arg-type]
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)  # type: ignore[arg-type]
        if not gold_parsed or not pred_parsed:
            return None
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - any math-verify/sympy failure means "no verdict", never a crash
        return None


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
    return s


def _string_equal(a: str, b: str) -> bool:
    na, nb = _normalize_str(a), _normalize_str(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    if _DECIMAL_RE.match(na) and _DECIMAL_RE.match(nb):  # "18" vs "18.00"; Decimal: exact, no overflow to inf
        return Decimal(na) == Decimal(nb)
    return False


def _equivalent(gold: str, pred: str) -> tuple[bool, str]:
    g, p = _clean(gold), _clean(pred)
    verdict = _math_verify_equal(g, p)
    if verdict:
        return True, "math_verify"
    # A False verdict from math-verify can still be a textual answer it mis-parsed ("Evelyn", "(C)").
    if _string_equal(g, p):
        return True, "string"
    return False, "math_verify" if verdict is False else "string"


def check_answer(response: str, gold: str) -> AnswerCheck:
    """Extract the final answer of `response` and compare it with `gold`. Never raises."""
    try:
        predicted = extract_final_answer(response) if isinstance(response, str) else None
        if predicted is None:
            return AnswerCheck(predicted=None, correct=False, method="no_answer")
        try:
            gold_norm = normalize_gold(gold, "auto")
        except ValueError:
            return AnswerCheck(predicted=predicted, correct=False, method="string")
        correct, method = _equivalent(gold_norm, predicted)
        return AnswerCheck(predicted=predicted, correct=correct, method=method)
    except Exception:  # noqa: BLE001 - a checker inside a data pipeline must not kill the batch
        return AnswerCheck(predicted=None, correct=False, method="error")


def answers_equal(a: str, b: str) -> bool:
    """Whether two extracted final answers are the same value (symmetric). Never raises."""
    try:
        if not isinstance(a, str) or not isinstance(b, str) or not a.strip() or not b.strip():
            return False
        return _equivalent(a, b)[0] or _equivalent(b, a)[0]
    except Exception:  # noqa: BLE001
        return False
