"""Deterministic synthetic math word problems with exact integer answers and step-by-step CoTs.

Offline stand-in for a teacher data set (problem, answer, cot): the CoT's verbosity is chosen on purpose, so a
critic has terse ("easy"), normal ("medium") and padded ("hard") CoTs to label, and a share of the CoTs carry an
arithmetic slip that reaches a wrong boxed answer, so the original-CoT check has negatives to find.

Each problem is a small program of arithmetic steps; the CoT renders those steps, and a slip replaces one step's
result and carries the wrong value through the later steps, as a real slip would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

VERBOSITIES = ("terse", "normal", "padded")
_SYMBOL = {"+": "+", "-": "-", "*": "*", "/": "/"}
_INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}
_NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lena", "Mateo",
          "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tess")


@dataclass(frozen=True)
class _Step:
    name: str  # the value this step computes, referred to by later steps
    left: int | str  # a constant, or the name of an earlier step
    op: str  # "+", "-", "*" or "/" (exact division)
    right: int | str
    says: str  # what the value is, e.g. "the apples cost"


@dataclass(frozen=True)
class _Problem:
    text: str
    steps: tuple[_Step, ...]


# ---------------------------------------------------------------------------------------------- templates
def _shopping(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    item1, item2 = rng.sample(["notebooks", "pens", "apples", "mugs", "candles", "socks", "plates"], 2)
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    bill = (a * p + b * q) // 50 * 50 + 50  # the next multiple of 50 above the total: change is positive
    text = (f"{name} buys {a} {item1} at ${p} each and {b} {item2} at ${q} each. {name} pays with ${bill}. "
            f"How much change, in dollars, does {name} get?")
    return _Problem(text, (
        _Step("cost1", a, "*", p, f"the {item1} cost"),
        _Step("cost2", b, "*", q, f"the {item2} cost"),
        _Step("total", "cost1", "+", "cost2", "the total cost"),
        _Step("change", bill, "-", "total", "the change"),
    ))


def _travel(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    s1, t1, s2, t2 = rng.randint(30, 90), rng.randint(2, 6), rng.randint(20, 80), rng.randint(2, 5)
    text = (f"{name} drives at {s1} km per hour for {t1} hours, then at {s2} km per hour for {t2} hours. "
            f"How many kilometres does {name} drive in total?")
    return _Problem(text, (
        _Step("d1", s1, "*", t1, "the distance of the first part"),
        _Step("d2", s2, "*", t2, "the distance of the second part"),
        _Step("total", "d1", "+", "d2", "the total distance"),
    ))


def _factory(rng: random.Random) -> _Problem:
    rate, hours, bad, days = rng.randint(12, 40), rng.randint(6, 10), rng.randint(3, 20), rng.randint(3, 7)
    good_total = (rate * hours - bad) * days
    box = rng.choice([d for d in range(2, 13) if good_total % d == 0] or [1])
    text = (f"A machine makes {rate} parts per hour and runs {hours} hours a day. Each day {bad} of its parts are "
            f"defective and thrown away. It runs for {days} days.")
    steps = [
        _Step("daily", rate, "*", hours, "the parts made per day"),
        _Step("good", "daily", "-", bad, "the good parts per day"),
        _Step("total", "good", "*", days, "the good parts in all"),
    ]
    if box > 1:
        text += f" The good parts are packed in boxes of {box}. How many boxes are filled?"
        steps.append(_Step("boxes", "total", "/", box, "the number of boxes"))
    else:
        text += " How many good parts does it make?"
    return _Problem(text, tuple(steps))


def _ages(rng: random.Random) -> _Problem:
    a_name, b_name, c_name = rng.sample(_NAMES, 3)
    a, k, years = rng.randint(4, 15), rng.randint(2, 4), rng.randint(2, 10)
    younger = rng.randint(1, a * k - 1)
    text = (f"{a_name} is {a} years old. {b_name} is {k} times as old as {a_name}. {c_name} is {younger} years "
            f"younger than {b_name}. What will the sum of the ages of {b_name} and {c_name} be in {years} years?")
    return _Problem(text, (
        _Step("b", a, "*", k, f"{b_name}'s age"),
        _Step("c", "b", "-", younger, f"{c_name}'s age"),
        _Step("now", "b", "+", "c", "the sum of their ages now"),
        _Step("gain", years, "*", 2, f"the years the two of them gain together in {years} years"),
        _Step("future", "now", "+", "gain", "the sum of their ages then"),
    ))


def _sharing(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    packs, per_pack = rng.randint(3, 12), rng.randint(6, 24)
    total = packs * per_pack
    friends = rng.choice([d for d in range(2, 13) if total % d == 0])  # packs <= 12 has a factor here
    give = rng.randint(1, total // friends - 1)
    text = (f"{name} has {packs} packs of {per_pack} stickers and shares them equally among {friends} friends. "
            f"Each friend then gives {give} stickers to a sibling. How many stickers do the friends have left "
            f"altogether?")
    return _Problem(text, (
        _Step("total", packs, "*", per_pack, "the number of stickers"),
        _Step("each", "total", "/", friends, "the stickers each friend gets"),
        _Step("kept", "each", "-", give, "the stickers each friend keeps"),
        _Step("left", "kept", "*", friends, "the stickers left altogether"),
    ))


def _area(rng: random.Random) -> _Problem:
    length, width, price = rng.randint(8, 30), rng.randint(6, 20), rng.randint(2, 9)
    side = rng.randint(2, min(length, width) - 1)
    text = (f"A rectangular garden is {length} m long and {width} m wide. A square patio with sides of {side} m "
            f"is built in it, and the rest is sown with grass seed that costs ${price} per square metre. "
            f"How many dollars does the seed cost?")
    return _Problem(text, (
        _Step("garden", length, "*", width, "the area of the garden in square metres"),
        _Step("patio", side, "*", side, "the area of the patio in square metres"),
        _Step("grass", "garden", "-", "patio", "the area to sow in square metres"),
        _Step("cost", "grass", "*", price, "the cost of the seed"),
    ))


def _savings(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    weekly, weeks = rng.randint(5, 40), rng.randint(3, 12)
    spent = rng.randint(1, weekly * weeks - 1)
    thing = rng.choice(["bike", "game", "jacket", "book set", "guitar"])
    text = (f"{name} saves ${weekly} each week for {weeks} weeks, then spends ${spent} on a {thing}. "
            f"How many dollars does {name} have left?")
    return _Problem(text, (
        _Step("saved", weekly, "*", weeks, "the money saved"),
        _Step("left", "saved", "-", spent, "the money left"),
    ))


_TEMPLATES: tuple[Callable[[random.Random], _Problem], ...] = (
    _shopping, _travel, _factory, _ages, _sharing, _area, _savings)


# -------------------------------------------------------------------------------------------- arithmetic
def _evaluate(steps: Sequence[_Step], slip: tuple[int, int] | None = None) -> list[int] | None:
    """Each step's value; `slip` = (step index, delta) adds delta to that step's result and carries it on.

    None if a slip makes the numbers invalid (a non-exact division or a value <= 0).
    """
    values: dict[str, int] = {}
    out = []
    for i, step in enumerate(steps):
        left = values[step.left] if isinstance(step.left, str) else step.left
        right = values[step.right] if isinstance(step.right, str) else step.right
        if step.op == "/":
            if left % right:
                return None
            value = left // right
        else:
            value = {"+": left + right, "-": left - right, "*": left * right}[step.op]
        if slip is not None and slip[0] == i:
            value += slip[1]
        if value <= 0:
            return None
        values[step.name] = value
        out.append(value)
    return out


def _operands(steps: Sequence[_Step], values: Sequence[int], i: int) -> tuple[int, int]:
    by_name = {s.name: v for s, v in zip(steps, values)}
    step = steps[i]
    left = by_name[step.left] if isinstance(step.left, str) else step.left
    right = by_name[step.right] if isinstance(step.right, str) else step.right
    return left, right


def _choose_slip(steps: Sequence[_Step], rng: random.Random) -> tuple[int, int]:
    """A slip (step, delta) whose wrong value survives to a different, valid final answer."""
    correct = _evaluate(steps)[-1]  # type: ignore[index]
    candidates = [(i, sign * size) for i in range(len(steps)) for size in (1, 2, 3, 10) for sign in (1, -1)]
    rng.shuffle(candidates)
    for slip in candidates:
        values = _evaluate(steps, slip)
        if values is not None and values[-1] != correct:
            return slip
    return len(steps) - 1, 1  # always valid: the last value goes up by one


# ------------------------------------------------------------------------------------------------ rendering
def _step_line(steps: Sequence[_Step], values: Sequence[int], i: int) -> str:
    left, right = _operands(steps, values, i)
    step = steps[i]
    return f"{step.says[0].upper()}{step.says[1:]}: {left} {_SYMBOL[step.op]} {right} = {values[i]}."


def _expression(steps: Sequence[_Step], i: int) -> str:
    """Step i as one expression of constants, earlier steps inlined (for the terse CoT)."""
    by_name = {s.name: j for j, s in enumerate(steps)}
    step = steps[i]

    def side(x: int | str) -> str:
        if isinstance(x, int):
            return str(x)
        inner = _expression(steps, by_name[x])
        return inner if steps[by_name[x]].op in ("*", "/") and step.op in ("+", "-") else f"({inner})"

    return f"{side(step.left)} {_SYMBOL[step.op]} {side(step.right)}"


def _final_line(answer: int) -> str:
    return f"The final answer is \\boxed{{{answer}}}."


def _render_terse(problem: _Problem, values: Sequence[int]) -> str:
    # Skips every intermediate value: one line with the whole computation.
    return "\n\n".join([f"{_expression(problem.steps, len(problem.steps) - 1)} = {values[-1]}.",
                        _final_line(values[-1])])


def _render_normal(problem: _Problem, values: Sequence[int]) -> str:
    lines = [_step_line(problem.steps, values, i) for i in range(len(problem.steps))]
    return "\n\n".join([*lines, _final_line(values[-1])])


def _render_padded(problem: _Problem, values: Sequence[int], slipped: int | None) -> str:
    steps = problem.steps
    blocks = [
        f"Let me restate the problem carefully before doing anything. {problem.text}",
        "Let me think about what is being asked here, and what information I have, so I do not miss anything. "
        "I will go step by step, write every number down, and check each result before I move on.",
    ]
    for i, step in enumerate(steps):
        left, right = _operands(steps, values, i)
        blocks.append(f"Next I need {step.says}. To get it I combine {left} and {right} with the operation "
                      f"'{_SYMBOL[step.op]}'. Let me write it out: {_step_line(steps, values, i)}")
        if i == slipped:  # no inverse check on the slipped step: it would expose (or contradict) the slip
            blocks.append(f"Hmm, let me double-check that. Yes, {values[i]} looks right to me.")
        else:
            blocks.append(f"Hmm, let me double-check that by going backwards: {values[i]} {_INVERSE[step.op]} "
                          f"{right} = {left}, which matches, so {step.says} is {values[i]}.")
        known = ", ".join(f"{s.says} is {v}" for s, v in zip(steps[: i + 1], values[: i + 1]))
        blocks.append(f"So far I know that {known}.")
    blocks.append(f"Looking back over all {len(steps)} steps, everything fits together, and the question asks for "
                  f"{steps[-1].says}, which is {values[-1]}.")
    return "\n\n".join([*blocks, _final_line(values[-1])])


# ------------------------------------------------------------------------------------------------------ api
def generate_problems(
    n: int,
    seed: int = 0,
    verbosity: str | Sequence[str] = VERBOSITIES,
    wrong_fraction: float = 0.1,
) -> list[dict]:
    """`iter_problems` as a list."""
    return list(iter_problems(n, seed, verbosity, wrong_fraction))


def iter_problems(
    n: int,
    seed: int = 0,
    verbosity: str | Sequence[str] = VERBOSITIES,
    wrong_fraction: float = 0.1,
) -> Iterator[dict]:
    """n problems: id, problem, answer (an integer as a string), cot, verbosity, cot_is_correct.

    Verbosity cycles through `verbosity`. Row i's problem depends only on (seed, i). Exactly
    round(n * wrong_fraction) rows, picked by (seed, n), get a CoT with an arithmetic slip and a wrong boxed
    answer: an exact count, so even a small run has its negatives. A generator, so that ingesting 100k problems
    never holds them all in the driver.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
    levels = [verbosity] if isinstance(verbosity, str) else list(verbosity)
    bad = [v for v in levels if v not in VERBOSITIES]
    if not levels or bad:
        raise ValueError(f"verbosity must be a non-empty list of {VERBOSITIES}, got {verbosity!r}")
    wrong = set(random.Random(f"{seed}:wrong").sample(range(n), round(n * wrong_fraction)))
    return _iter_problems(n, seed, levels, wrong)


def _iter_problems(n: int, seed: int, levels: list[str], wrong: set[int]) -> Iterator[dict]:
    # Separate from iter_problems so that bad arguments raise at the call, not at the first next().
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        problem = rng.choice(_TEMPLATES)(rng)
        correct_values = _evaluate(problem.steps)
        assert correct_values is not None  # templates pick numbers that keep every value positive and exact
        slip = _choose_slip(problem.steps, rng) if i in wrong else None
        values = _evaluate(problem.steps, slip) if slip else correct_values
        level = levels[i % len(levels)]
        if level == "terse":
            cot = _render_terse(problem, values)  # type: ignore[arg-type]
        elif level == "normal":
            cot = _render_normal(problem, values)  # type: ignore[arg-type]
        else:
            cot = _render_padded(problem, values, slip[0] if slip else None)  # type: ignore[arg-type]
        yield {
            "id": f"syn-{seed}-{i:06d}",
            "problem": problem.text,
            "answer": str(correct_values[-1]),
            "cot": cot,
            "verbosity": level,
            "cot_is_correct": slip is None,
        }


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON lines (UTF-8), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
