"""Benchmarks: the packaged registry and the loader.

Packaged files live in `benchmarks/` next to this module (origin and licences in its README.md). Every benchmark,
packaged or a user's file, is read through the column mapping of refine input (`ColumnMap`, `answer_format`,
the JSONL/Parquet readers of `crv_ray.data.input`). A row that cannot be used is quarantined with a reason that
names the file and line; it never silently disappears.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crv_ray.answers import normalize_gold
from crv_ray.config import ColumnMap
from crv_ray.data.input import (
    DEFAULT_ID_COLUMN,
    _detect_format,
    _field,
    _iter_jsonl,
    _iter_parquet,
    _user_id,
    stable_problem_id,
)
from crv_ray.eval.config import BenchmarkSpec

PACKAGE_DIR = Path(__file__).resolve().parent / "benchmarks"

BUILTIN_BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec(name="math500", path=str(PACKAGE_DIR / "math500.jsonl"),
                             columns=ColumnMap(problem="problem", answer="answer", id="unique_id"),
                             answer_format="plain", group_by=["subject", "level"]),
    "aime24": BenchmarkSpec(name="aime24", path=str(PACKAGE_DIR / "aime24.jsonl"),
                            columns=ColumnMap(problem="problem", answer="answer", id="id"), answer_format="plain"),
    "amc23": BenchmarkSpec(name="amc23", path=str(PACKAGE_DIR / "amc23.jsonl"),
                           columns=ColumnMap(problem="problem", answer="answer", id="id"), answer_format="plain"),
    # No id column: ids are hashed from problem and answer (stable across reorderings).
    "gsm8k": BenchmarkSpec(name="gsm8k", path=str(PACKAGE_DIR / "gsm8k_test.jsonl"),
                           columns=ColumnMap(problem="question", answer="answer", id=None), answer_format="gsm8k"),
}

_PLAIN_NUMBER = re.compile(r"^([-+]?)(\d+)(?:\.(\d+))?$")


def canonical_number(answer: str) -> str:
    """`27.0` -> `27`, `025` -> `25`, `-3.50` -> `-3.5`; anything that is not a plain decimal number is unchanged.

    Gold answers stored as JSON numbers (AMC) or zero-padded (AIME) then read the way a model writes them.
    """
    m = _PLAIN_NUMBER.match(answer.strip())
    if not m:
        return answer
    sign, whole, frac = m.groups()
    whole = whole.lstrip("0") or "0"
    frac = (frac or "").rstrip("0")
    text = whole + (f".{frac}" if frac else "")
    return ("-" if sign == "-" and text != "0" else "") + text


@dataclass
class Benchmark:
    """The usable problems of one benchmark and the rows that were quarantined (with their reasons)."""

    spec: BenchmarkSpec
    problems: list[dict] = field(default_factory=list)  # problem_id, problem, gold, gold_raw, source, groups
    quarantined: list[dict] = field(default_factory=list)  # source, error
    file_sha1: str = ""

    @property
    def name(self) -> str:
        return self.spec.name


def resolve_spec(entry: str | BenchmarkSpec) -> BenchmarkSpec:
    """A config entry -> its spec: a packaged name, or the user's own entry."""
    if isinstance(entry, BenchmarkSpec):
        return entry
    if entry not in BUILTIN_BENCHMARKS:
        raise ValueError(f"unknown benchmark {entry!r}: packaged ones are {sorted(BUILTIN_BENCHMARKS)}")
    return BUILTIN_BENCHMARKS[entry]


def select_benchmarks(configured: list[str | BenchmarkSpec], names: list[str] | None) -> list[BenchmarkSpec]:
    """The benchmarks to run: `names` (from the command line) looked up among the configured entries first, then
    the packaged ones; None: every configured entry."""
    specs = [resolve_spec(e) for e in configured]
    if not names:
        return specs
    by_name = {s.name: s for s in specs}
    out = []
    for n in dict.fromkeys(names):
        if n in by_name:
            out.append(by_name[n])
        elif n in BUILTIN_BENCHMARKS:
            out.append(BUILTIN_BENCHMARKS[n])
        else:
            raise ValueError(f"unknown benchmark {n!r}: packaged ones are {sorted(BUILTIN_BENCHMARKS)}, configured "
                             f"ones {sorted(by_name)} (add an entry to eval.benchmarks for a file of your own)")
    return out


def _files_sha1(path: Path) -> str:
    h = hashlib.sha1()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _raw_rows(spec: BenchmarkSpec, path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    try:
        fmt = _detect_format(path, spec.format)
    except ValueError as e:
        raise ValueError(f"benchmark {spec.name}: {e}") from None
    if fmt == "jsonl":
        return _iter_jsonl(path)
    if fmt == "parquet":
        cols = spec.columns
        wanted = list(dict.fromkeys([cols.problem, cols.answer, *spec.group_by]))
        # As for refine input: the default id column is read where it exists, a named one must exist.
        optional = [cols.id] if cols.id == DEFAULT_ID_COLUMN else []
        if cols.id and not optional:
            wanted.append(cols.id)
        return _iter_parquet(path, wanted, optional)
    raise ValueError(f"benchmark {spec.name}: {path} is a saved `datasets` folder; export it to JSONL or Parquet")


def _synthetic_rows(spec: BenchmarkSpec) -> Iterator[tuple[str, dict | None, str | None]]:
    from crv_ray.data.synthetic import generate_problems

    s = spec.synthetic
    assert s is not None  # set by BenchmarkSpec's validator
    for i, row in enumerate(generate_problems(s.n, seed=s.seed, verbosity=s.verbosity, wrong_fraction=0.0)):
        yield f"synthetic:{i + 1}", row, None


def load_benchmark(spec: BenchmarkSpec, limit: int | None = None) -> Benchmark:
    """Read the first `limit` usable problems (all if None); quarantine unusable rows with file:line and reason."""
    if spec.source == "synthetic":
        # The generator's settings stand in for a file hash: the same settings give the same problems.
        fingerprint = hashlib.sha1(spec.synthetic.model_dump_json().encode()).hexdigest()[:16]  # type: ignore[union-attr]
        bench = Benchmark(spec=spec, file_sha1=fingerprint)
        spec = spec.model_copy(update={"columns": ColumnMap(problem="problem", answer="answer", cot="cot", id="id")})
        rows = _synthetic_rows(spec)
    else:
        path = Path(spec.path)  # type: ignore[arg-type]
        if not path.exists():
            raise ValueError(f"benchmark {spec.name}: path {path} does not exist")
        bench = Benchmark(spec=spec, file_sha1=_files_sha1(path))
        rows = _raw_rows(spec, path)
    cols = spec.columns
    seen: dict[str, str] = {}
    for loc, row, err in rows:
        if limit is not None and len(bench.problems) >= limit:
            break
        if row is None:
            bench.quarantined.append({"source": loc, "error": err})
            continue
        problem, e1 = _field(row, cols.problem, loc)
        gold_raw, e2 = _field(row, cols.answer, loc)
        groups: dict[str, str] = {}
        e3 = None
        for g in spec.group_by:
            groups[g], e = _field(row, g, loc)
            e3 = e3 or e
        user_id, e4 = _user_id(row, cols.id, loc)
        error = e1 or e2 or e3 or e4
        gold = None
        if error is None:
            try:
                gold = canonical_number(normalize_gold(gold_raw, spec.answer_format))  # type: ignore[arg-type]
            except ValueError as e:
                error = f"{loc}: field {cols.answer!r}: {e}"
        pid = None
        if error is None:
            pid = user_id if user_id is not None else stable_problem_id(problem, gold_raw)  # type: ignore[arg-type]
            if pid in seen:
                error = f"{loc}: duplicate problem id {pid!r} (first seen at {seen[pid]})"
        if error is not None:
            bench.quarantined.append({"source": loc, "error": error})
            continue
        seen[pid] = loc  # type: ignore[index]
        bench.problems.append({"problem_id": pid, "problem": problem, "gold": gold, "gold_raw": gold_raw,
                               "source": loc, "groups": groups})
    return bench
