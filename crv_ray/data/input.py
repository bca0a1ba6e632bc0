"""Reading problems: JSONL, JSON arrays, Parquet, `datasets` folders/hub names, or the synthetic generator.

Every input row becomes exactly one record. A row that cannot be used (bad JSON, non-UTF-8 bytes, a missing or
empty field, a duplicate id, an over-long CoT) becomes a record with `error_stage="input"` and a reason that names
the file, line and field, so it reaches trace and errors instead of vanishing. An input that is mostly such rows
stops the run at ingest instead (`check_bad_fraction`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crv_ray.answers import normalize_gold
from crv_ray import storage
from crv_ray.config import ColumnMap, InputConfig

DEFAULT_ID_COLUMN = ColumnMap.model_fields["id"].default


def stable_problem_id(problem: str, answer: str) -> str:
    """Content hash, so the id survives reordering and re-exports of the same data."""
    return "p-" + hashlib.sha1(f"{problem}\x00{answer}".encode()).hexdigest()[:16]


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        if any(path.glob("*.parquet")):
            return "parquet"
        if any(path.glob("*.jsonl")) or any(path.glob("*.json")):
            return "jsonl"
        raise ValueError(f"input.path {path}: folder holds no .parquet/.jsonl files nor a saved `datasets` dataset")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"input.path {path}: cannot tell the format from the suffix {suffix!r}; set input.format")


def _files(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    out: list[Path] = []
    for pat in patterns:
        out.extend(sorted(path.glob(pat)))
    return out


_JSON_PATTERNS = ("*.jsonl", "*.json", "*.ndjson")


def _is_json_array(f: Path) -> bool:
    """A .json file whose first non-blank byte is '[' holds one JSON array of rows, not JSON lines."""
    if f.suffix.lower() != ".json":
        return False
    with f.open("rb") as fh:
        chunk = fh.read(4096).removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        while chunk:
            head = chunk.lstrip()
            if head:
                return head.startswith(b"[")
            chunk = fh.read(4096)
    return False


def _iter_json_array(f: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """Rows of a file holding one JSON array (read whole: such files are not streamable line by line). A file that
    does not parse is an error for the whole input, naming where; an item that is not an object is a bad row."""
    try:
        items = json.loads(f.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"input file {f}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"input file {f} starts a JSON array but does not parse: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from None
    if not isinstance(items, list):  # e.g. '[1] [2]' cannot parse, but stay explicit
        raise ValueError(f"input file {f}: expected a JSON array of objects, got {type(items).__name__}")
    for i, row in enumerate(items, start=1):
        loc = f"{f.name}:row{i}"
        if not isinstance(row, dict):
            yield loc, None, f"item {i} of the JSON array in {f}: expected a JSON object, got {type(row).__name__}"
            continue
        yield loc, row, None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """Yield (location, row or None, error) per non-blank line; bad bytes or JSON are errors, not crashes. A .json
    file holding a JSON array is read as that array's rows."""
    for f in _files(path, _JSON_PATTERNS):
        if _is_json_array(f):
            yield from _iter_json_array(f)
            continue
        with f.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                loc = f"{f.name}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield loc, None, f"line {lineno} of {f}: not valid UTF-8 ({e.reason} at byte {e.start})"
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    yield loc, None, f"line {lineno} of {f}: malformed JSON ({e.msg} at column {e.colno})"
                    continue
                if not isinstance(row, dict):
                    yield loc, None, f"line {lineno} of {f}: expected a JSON object, got {type(row).__name__}"
                    continue
                yield loc, row, None


_PARQUET_PATTERNS = ("*.parquet", "*.pq")


def _iter_parquet(path: Path, columns: list[str], optional: list[str]) -> Iterator[tuple[str, dict | None, str | None]]:

    for f in _files(path, _PARQUET_PATTERNS):
        pf = storage.parquet_file(f)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"input file {f} has no column(s) {missing}; it has {pf.schema_arrow.names} (see input.columns)")
        i = 0
        present = columns + [c for c in optional if c in pf.schema_arrow.names and c not in columns]
        for batch in pf.iter_batches(columns=present, batch_size=1024):
            for row in batch.to_pylist():
                i += 1
                yield f"{f.name}:row{i}", row, None


def _iter_hf(path: str, split: str, columns: list[str], optional: list[str]) -> Iterator[tuple[str, dict | None, str | None]]:
    import datasets

    p = storage.as_path(path)
    if p.exists():
        ds = datasets.load_from_disk(str(storage.local_copy(p)))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"input.split {split!r} not in {path} (splits: {list(ds)})")
            ds = ds[split]
    else:  # a hub name: needs network access at run time
        ds = datasets.load_dataset(path, split=split)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {path} has no column(s) {missing}; it has {ds.column_names} (see input.columns)")
    present = columns + [c for c in optional if c in ds.column_names and c not in columns]
    for i, row in enumerate(ds.select_columns(present)):
        yield f"{Path(path).name}:row{i + 1}", row, None


def _raw_rows(cfg: InputConfig) -> Iterator[tuple[str, dict | None, str | None]]:
    if cfg.source == "synthetic":
        from crv_ray.data.synthetic import iter_problems

        s = cfg.synthetic
        for i, row in enumerate(iter_problems(s.n, seed=s.seed, verbosity=s.verbosity, wrong_fraction=s.wrong_fraction)):
            yield f"synthetic:{i + 1}", row, None
        return
    cols = cfg.columns
    wanted = list(dict.fromkeys([cols.problem, cols.answer, cols.cot]))
    # The default id column ("id") is read where it exists; a column named in the config must exist.
    optional: list[str] = []
    if cols.id == DEFAULT_ID_COLUMN:
        optional.append(cols.id)
    elif cols.id:
        wanted.append(cols.id)
    path = storage.as_path(cfg.path)  # type: ignore[arg-type]
    if cfg.source == "hf":
        yield from _iter_hf(cfg.path, cfg.split, wanted, optional)  # type: ignore[arg-type]
        return
    if not path.exists():
        raise ValueError(f"input.path {path} does not exist")
    fmt = _detect_format(path, cfg.format)
    if fmt == "jsonl":
        yield from _iter_jsonl(path)
    elif fmt == "parquet":
        yield from _iter_parquet(path, wanted, optional)
    else:
        yield from _iter_hf(str(path), cfg.split, wanted, optional)


def input_files(cfg: InputConfig) -> list[Path] | None:
    """The local files a `file` or saved-`datasets` input is read from (what its fingerprint covers); None for
    synthetic problems and hub names, which have no local files."""
    if cfg.source == "synthetic" or cfg.path is None:
        return None
    path = storage.as_path(cfg.path)
    if not path.exists():
        if cfg.source == "hf":
            return None  # a hub name
        raise ValueError(f"input.path {path} does not exist")
    fmt = "hf" if cfg.source == "hf" else _detect_format(path, cfg.format)
    if fmt == "hf":
        return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _files(path, _JSON_PATTERNS if fmt == "jsonl" else _PARQUET_PATTERNS)


# Below this many rows a mostly-bad input is quarantined row by row: the share says little about a handful.
MIN_ROWS_FOR_BAD_FRACTION = 20


class InputError(ValueError):
    """The input as a whole is unusable (most rows bad): stop before any model work."""


def check_bad_fraction(n_rows: int, n_bad: int, first_reasons: list[str], cfg: InputConfig) -> None:
    """Raise InputError when more than input.max_bad_fraction of an input of at least MIN_ROWS_FOR_BAD_FRACTION rows
    is unusable: a wrong column map or format, not a few bad rows, and quarantining them all would only hide it."""
    if n_rows < MIN_ROWS_FOR_BAD_FRACTION or n_bad <= cfg.max_bad_fraction * n_rows:
        return
    where = f"{cfg.source}: {cfg.path}" if cfg.path else cfg.source
    shown = "\n".join(f"  - {r}" for r in first_reasons)
    raise InputError(
        f"{n_bad} of {n_rows} input rows ({n_bad / n_rows:.0%}) are unusable ({where}), more than "
        f"input.max_bad_fraction={cfg.max_bad_fraction:g}; nothing was refined. First reasons:\n{shown}\n"
        f"Check input.columns (problem={cfg.columns.problem!r}, answer={cfg.columns.answer!r}, cot={cfg.columns.cot!r}, "
        f"id={cfg.columns.id!r}), input.format and input.answer_format; to quarantine the bad rows and go on, raise "
        "input.max_bad_fraction (1.0 never stops)."
    )


def _field(row: dict, name: str, loc: str) -> tuple[str | None, str | None]:
    if name not in row:
        return None, f"{loc}: missing field {name!r}"
    v = row[name]
    if v is None:
        return None, f"{loc}: field {name!r} is null"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        return None, f"{loc}: field {name!r} must be text, got {type(v).__name__}"
    if not v.strip():
        return None, f"{loc}: field {name!r} is empty"
    return v, None


def _user_id(row: dict, column: str | None, loc: str) -> tuple[str | None, str | None]:
    """(the row's own id, error). The default column "id" may be absent (the id is hashed then); a column named
    in input.columns.id must hold a non-empty string or integer in every row."""
    if not column:
        return None, None
    if column not in row and column == DEFAULT_ID_COLUMN:
        return None, None
    v = row.get(column)
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
        what = "missing" if column not in row else ("null" if v is None else
                                                   "empty" if isinstance(v, str) else f"a {type(v).__name__}")
        return None, (f"{loc}: id field {column!r} is {what}; an id must be a non-empty string or integer "
                      "(input.columns.id; null hashes ids from problem and answer)")
    return str(v).strip(), None


def read_problems(cfg: InputConfig) -> Iterator[dict[str, Any]]:
    """Yield one normalised record per input row: problem_id, source, problem, answer, answer_raw, cot, error."""
    seen: dict[str, str] = {}
    cols = cfg.columns
    if cfg.source == "synthetic":
        cols = type(cols)(problem="problem", answer="answer", cot="cot", id="id")
    n = 0
    for loc, row, err in _raw_rows(cfg):
        if cfg.limit is not None and n >= cfg.limit:
            break
        n += 1
        rec: dict[str, Any] = {"problem_id": None, "source": loc, "problem": None, "answer": None,
                               "answer_raw": None, "cot": None, "error": err}
        if row is not None:
            problem, e1 = _field(row, cols.problem, loc)
            answer_raw, e2 = _field(row, cols.answer, loc)
            cot, e3 = _field(row, cols.cot, loc)
            rec.update(problem=problem, answer_raw=answer_raw, cot=cot)
            rec["error"] = e1 or e2 or e3
            if answer_raw is not None and rec["error"] is None:
                try:
                    rec["answer"] = normalize_gold(answer_raw, cfg.answer_format)
                except ValueError as e:
                    rec["error"] = f"{loc}: field {cols.answer!r}: {e}"
            if rec["error"] is None and cfg.max_cot_chars is not None and len(cot) > cfg.max_cot_chars:  # type: ignore[arg-type]
                rec["error"] = f"{loc}: field {cols.cot!r} has {len(cot)} characters, over input.max_cot_chars={cfg.max_cot_chars}"
            user_id, id_error = _user_id(row, cols.id, loc)
            rec["error"] = rec["error"] or id_error
            if user_id is not None:
                rec["problem_id"] = user_id
            elif problem is not None and answer_raw is not None:
                rec["problem_id"] = stable_problem_id(problem, answer_raw)
        if rec["problem_id"] is None:
            rec["problem_id"] = f"bad-{hashlib.sha1(loc.encode()).hexdigest()[:12]}"
        pid = rec["problem_id"]
        if pid in seen:
            if rec["error"] is None:
                rec["error"] = f"{loc}: duplicate problem_id {pid!r} (first seen at {seen[pid]})"
            rec["problem_id"] = f"{pid}#dup-{hashlib.sha1(loc.encode()).hexdigest()[:8]}"
        else:
            seen[pid] = loc
        yield rec
