"""Training data on the driver: read and validate Parquet, tokenize with the student's chat template, apply the
length policy.

Flow: validate files -> tokenize (in this process for small datasets, else Ray Data `read_parquet` ->
`map_batches(tokenize)`) -> stream the kept rows into one Arrow IPC file (`tokenized.arrow`) + a `DataReport`. How
workers batch that file is in `batching.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crv_ray import storage
from crv_ray.run_paths import TOKENIZED
from crv_ray.train.config import CogPOConfig, SFTConfig, _StageConfig

Kind = Literal["sft", "pairs"]

SFT_COLUMNS = ("prompt", "response")
PAIRS_COLUMNS = ("prompt", "chosen", "rejected")
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


# ----------------------------------------------------------------------------------------------------------
# Reading and validation
# ----------------------------------------------------------------------------------------------------------

def list_parquet_files(path: str | Path, what: str = "dataset") -> list[Path]:
    """A Parquet file, or the sorted `*.parquet` files under a directory. A refine dataset folder
    (<run_dir>/refine/sft, .../pairs) gives only its committed shards: a shard's file can exist before its commit
    marker (a run in progress or killed mid-commit)."""
    from crv_ray.refine.store import refine_store_of

    path = storage.as_path(path)
    if path.is_file():
        return [path]
    store = refine_store_of(path) if path.is_dir() else None
    if store is not None:
        files = store.committed_files(path.name)
        if files:
            return files
        raise ValueError(f"{what} directory {str(path)!r} holds no committed refine shard yet (run `crv-ray refine`)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if files:
            return files
        raise ValueError(f"{what} directory {str(path)!r} holds no .parquet files")
    raise ValueError(f"{what} path {str(path)!r} does not exist")


def _check_text_column(table: pa.Table, col: str, file: Path) -> None:
    values = table.column(col)
    if pa.types.is_null(values.type):
        values = values.cast(pa.string())
    bad = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
    idx = np.flatnonzero(np.asarray(bad.to_numpy(zero_copy_only=False), dtype=bool))
    if idx.size:
        raise ValueError(f"{file}: column {col!r} is empty or null in row {int(idx[0])} "
                         f"({idx.size} such rows)")


def validate_files(files: list[Path], kind: Kind, gap_betas: dict[str, float] | None = None,
                   require_ref: bool = False) -> int:
    """Check columns and values of every file; return the total row count. Errors name file, column and row."""
    required = list(SFT_COLUMNS if kind == "sft" else PAIRS_COLUMNS) + (list(REF_COLUMNS) if require_ref else [])
    n_rows = 0
    for file in files:
        schema = storage.read_schema(file)
        names = schema.names
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(f"{file}: missing column(s) {missing} (has {names})")
        for col in required:
            typ = schema.field(col).type
            if col not in REF_COLUMNS and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
                                               or pa.types.is_null(typ)):
                raise ValueError(f"{file}: column {col!r} must be text, is {typ}")
        cols = required + [c for c in ("beta", "gap") if kind == "pairs" and c in names]
        table = storage.read_table(file, columns=cols)
        for col in required:
            if col not in REF_COLUMNS:
                _check_text_column(table, col, file)
        if kind == "pairs":
            if "beta" in names:
                beta = table.column("beta").to_numpy(zero_copy_only=False).astype(float)
                present = ~pc.is_null(table.column("beta")).to_numpy(zero_copy_only=False)
                bad = np.flatnonzero(present & ~(beta > 0))  # catches NaN, 0 and negatives
                if bad.size:
                    raise ValueError(f"{file}: column 'beta' must be > 0 (and not NaN); row {int(bad[0])} has "
                                     f"{beta[bad[0]]}")
            if "gap" in names and gap_betas is not None:
                gaps = table.column("gap").to_pylist()
                beta_col = table.column("beta").to_pylist() if "beta" in names else [None] * len(gaps)
                for i, (gap, b) in enumerate(zip(gaps, beta_col)):
                    if b is None and gap is not None and gap not in gap_betas:
                        raise ValueError(f"{file}: column 'gap' row {i} has unknown gap {gap!r} and no beta; "
                                         f"known gaps: {sorted(gap_betas)}")
        n_rows += table.num_rows
    return n_rows


# ----------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------

def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    model_dir = storage.as_path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"student model path {str(model_dir)!r} is not a model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(str(storage.local_copy(model_dir)))
    if not tok.chat_template:
        raise ValueError(f"tokenizer in {str(model_dir)!r} has no chat_template; training needs one")
    return tok


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_tokenize(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of the chat (user=prompt, assistant=response) and the prompt length.

    The prompt part is the prompt-only chat with the generation prompt; everything after it (the response and
    the template's end-of-turn tokens) is trained on. A template that renders the prompt differently when an
    answer follows would silently train on the wrong tokens, so the prefix is checked.
    """
    prompt_ids = _template_ids(tokenizer, [{"role": "user", "content": prompt}], True)
    ids = _template_ids(tokenizer, [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], False)
    if ids[: len(prompt_ids)] != prompt_ids or len(ids) <= len(prompt_ids):
        raise ValueError("chat template: the prompt-only chat (add_generation_prompt=True) is not a prefix of the "
                         f"full chat; cannot mask the prompt. prompt starts {prompt[:60]!r}")
    return ids, len(prompt_ids)


def apply_length_policy(ids: list[int], prompt_len: int, cfg: _StageConfig) -> tuple[list[int] | None, str]:
    """(ids or None, status) with status in ok | truncated | dropped_prompt | dropped_length."""
    if prompt_len > cfg.max_prompt_length:
        return None, "dropped_prompt"
    if len(ids) <= cfg.max_length:
        return ids, "ok"
    if cfg.truncation == "drop":
        return None, "dropped_length"
    return ids[: cfg.max_length], "truncated"  # max_prompt_length < max_length keeps >= 1 response token


BETA_SOURCES = ("column", "gap_betas", "default_beta", "dpo")


def resolve_beta(beta, gap, cfg: CogPOConfig) -> tuple[float, str]:
    """(beta, where it came from): a `beta` column value wins, then `gap_betas[gap]`, then `default_beta`.
    `loss: dpo` gives every pair `default_beta`."""
    if cfg.loss == "dpo":
        return float(cfg.default_beta), "dpo"
    if beta is not None and not (isinstance(beta, float) and math.isnan(beta)):
        return float(beta), "column"
    if gap is not None and gap in cfg.gap_betas:
        return float(cfg.gap_betas[gap]), "gap_betas"
    return float(cfg.default_beta), "default_beta"


_LIST = pa.list_(pa.int32())


def tokenize_sft_batch(tokenizer, batch: pa.Table, cfg: SFTConfig) -> pa.Table:
    out = {"input_ids": [], "prompt_len": [], "status": []}
    for prompt, response in zip(batch.column("prompt").to_pylist(), batch.column("response").to_pylist()):
        ids, plen = chat_tokenize(tokenizer, prompt, response)
        kept, status = apply_length_policy(ids, plen, cfg)
        out["input_ids"].append(kept or [])
        out["prompt_len"].append(plen)
        out["status"].append(status)
    return pa.table({"input_ids": pa.array(out["input_ids"], _LIST),
                     "prompt_len": pa.array(out["prompt_len"], pa.int32()),
                     "status": pa.array(out["status"], pa.string())})


def tokenize_pairs_batch(tokenizer, batch: pa.Table, cfg: CogPOConfig) -> pa.Table:
    """Chosen and rejected share the prompt; a pair is dropped if either side is (the pair is the unit)."""
    names = batch.column_names
    n = batch.num_rows
    betas = batch.column("beta").to_pylist() if "beta" in names else [None] * n
    gaps = batch.column("gap").to_pylist() if "gap" in names else [None] * n
    cols = {"chosen_ids": [], "rejected_ids": [], "prompt_len": [], "status": [], "beta": [], "gap": [],
            "beta_source": []}
    for i, (prompt, chosen, rejected) in enumerate(zip(batch.column("prompt").to_pylist(),
                                                       batch.column("chosen").to_pylist(),
                                                       batch.column("rejected").to_pylist())):
        c_ids, plen = chat_tokenize(tokenizer, prompt, chosen)
        r_ids, _ = chat_tokenize(tokenizer, prompt, rejected)
        c_kept, c_status = apply_length_policy(c_ids, plen, cfg)
        r_kept, r_status = apply_length_policy(r_ids, plen, cfg)
        statuses = {c_status, r_status}
        status = next((s for s in ("dropped_prompt", "dropped_length", "truncated") if s in statuses), "ok")
        dropped = status.startswith("dropped")
        cols["chosen_ids"].append([] if dropped else c_kept)
        cols["rejected_ids"].append([] if dropped else r_kept)
        cols["prompt_len"].append(plen)
        cols["status"].append(status)
        beta, source = resolve_beta(betas[i], gaps[i], cfg)
        cols["beta"].append(beta)
        cols["beta_source"].append(source)
        cols["gap"].append(gaps[i] if gaps[i] is not None else "none")
    table = pa.table({"chosen_ids": pa.array(cols["chosen_ids"], _LIST),
                      "rejected_ids": pa.array(cols["rejected_ids"], _LIST),
                      "prompt_len": pa.array(cols["prompt_len"], pa.int32()),
                      "status": pa.array(cols["status"], pa.string()),
                      "beta": pa.array(cols["beta"], pa.float32()),
                      "gap": pa.array(cols["gap"], pa.string()),
                      "beta_source": pa.array(cols["beta_source"], pa.string())})
    for col in REF_COLUMNS:
        if col in names:
            table = table.append_column(col, batch.column(col).cast(pa.float64()))
    return table


class _Tokenize:
    """Ray Data callable class: loads the tokenizer once per actor."""

    def __init__(self, model_dir: str, kind: Kind, stage_cfg: dict):
        self.tokenizer = load_tokenizer(model_dir)
        self.kind = kind
        self.cfg = (SFTConfig if kind == "sft" else CogPOConfig).model_validate(stage_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.kind == "sft":
            return tokenize_sft_batch(self.tokenizer, batch, self.cfg)
        return tokenize_pairs_batch(self.tokenizer, batch, self.cfg)


# ----------------------------------------------------------------------------------------------------------
# Materialisation
# ----------------------------------------------------------------------------------------------------------

@dataclass
class DataReport:
    kind: str
    source: str
    rows_in: int = 0
    rows_kept: int = 0
    dropped_prompt_too_long: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    truncation_policy: str = "drop"
    max_length: int = 0
    tokens_kept: int = 0
    padding_fraction: float | None = None  # filled in by the trainer's plan (depends on world size and batch)
    steps_per_epoch: int | None = None
    per_gap_rows: dict[str, int] = field(default_factory=dict)
    beta_sources: dict[str, int] = field(default_factory=dict)  # pairs: kept rows per BETA_SOURCES entry
    gap_betas: dict[str, float] | None = None  # pairs: the table used for rows without a beta column value

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def describe_beta_sources(report: DataReport) -> str:
    """One line saying where the kept pairs' betas came from, e.g. for the training log."""
    parts = []
    for src in BETA_SOURCES:
        n = report.beta_sources.get(src, 0)
        if not n:
            continue
        where = {"column": "the pairs' own beta column",
                 "gap_betas": f"train.cogpo.gap_betas {report.gap_betas}",
                 "default_beta": "train.cogpo.default_beta (no beta, no known gap)",
                 "dpo": "train.cogpo.default_beta (loss: dpo, one beta for all pairs)"}[src]
        parts.append(f"{n} from {where}")
    return "; ".join(parts)


def read_parquet_dataset(files: list[Path], columns: list[str] | None = None):
    """Ray Data dataset over `files`, in file order (order matters for joining outputs back to rows)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    return ray.data.read_parquet(**storage.ray_paths(files), columns=columns)


def carries_reference(files: list[Path], stage_cfg: _StageConfig) -> bool:
    """Pairs that bring their own reference log-probs (both REF_COLUMNS) keep them; without them the training
    workers compute them before the first step. Some files with and some without is an error."""
    if not (isinstance(stage_cfg, CogPOConfig) and stage_cfg.reference == "precomputed" and stage_cfg.uses_reference):
        return False
    has = {f: all(c in storage.read_schema(f).names for c in REF_COLUMNS) for f in files}
    if len(set(has.values())) > 1:
        raise ValueError(f"pairs dataset: {[str(f) for f, h in has.items() if h][:3]} carry reference log-probs "
                         f"{list(REF_COLUMNS)}, {[str(f) for f, h in has.items() if not h][:3]} do not: give them "
                         "to all files or to none (then the training workers compute them)")
    return next(iter(has.values()), False)


def _tokenized_batches(kind: Kind, files: list[Path], columns: list[str], model_dir: str | Path,
                       stage_cfg: _StageConfig, batch_size: int, num_actors: int, rows_in: int,
                       in_process_max_rows: int):
    """Tokenized batches of the files, in file order. A small dataset is tokenized right here: a Ray Data actor
    pool costs ~10 s of start-up, tokenizing a few thousand rows well under that."""
    if rows_in <= in_process_max_rows:
        tokenize = _Tokenize(str(model_dir), kind, stage_cfg.model_dump(mode="json"))
        for f in files:
            for batch in storage.read_table(f, columns=columns).to_batches(max_chunksize=batch_size):
                yield tokenize(pa.Table.from_batches([batch]))
        return
    import ray.data

    ds = read_parquet_dataset(files, columns).map_batches(
        _Tokenize, fn_constructor_kwargs={"model_dir": str(model_dir), "kind": kind,
                                          "stage_cfg": stage_cfg.model_dump(mode="json")},
        batch_format="pyarrow", batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors))
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def tokenize_to_file(kind: Kind, data_path: str | Path, model_dir: str | Path, stage_cfg: _StageConfig,
                     out_dir: Path, batch_size: int = 64, num_actors: int = 1,
                     in_process_max_rows: int = 4096) -> DataReport:
    """Validate, tokenize, apply the length policy and write `out_dir/tokenized.arrow`."""
    what = "sft dataset" if kind == "sft" else "pairs dataset"
    files = list_parquet_files(data_path, what)
    require_ref = kind == "pairs" and carries_reference(files, stage_cfg)
    # Under loss: dpo the gaps choose nothing, so an unknown gap is no error.
    gap_betas = stage_cfg.gap_betas if kind == "pairs" and stage_cfg.loss != "dpo" else None
    rows_in = validate_files(files, kind, gap_betas, require_ref=require_ref)
    load_tokenizer(model_dir)  # fail here, on the driver, with the path in the message
    names = storage.read_schema(files[0]).names
    columns = list(SFT_COLUMNS) if kind == "sft" else (
        list(PAIRS_COLUMNS) + [c for c in ("beta", "gap") if c in names] + (list(REF_COLUMNS) if require_ref else []))
    batches = _tokenized_batches(kind, files, columns, model_dir, stage_cfg, batch_size, num_actors, rows_in,
                                 in_process_max_rows)

    report = DataReport(kind=kind, source=str(data_path), rows_in=rows_in,
                        truncation_policy=stage_cfg.truncation, max_length=stage_cfg.max_length,
                        gap_betas=dict(stage_cfg.gap_betas) if kind == "pairs" else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (TOKENIZED + ".tmp")
    writer = None
    seen = 0
    for batch in batches:
        seen += batch.num_rows
        status = batch.column("status")
        report.dropped_prompt_too_long += pc.sum(pc.equal(status, "dropped_prompt")).as_py() or 0
        report.dropped_too_long += pc.sum(pc.equal(status, "dropped_length")).as_py() or 0
        report.truncated += pc.sum(pc.equal(status, "truncated")).as_py() or 0
        kept = batch.filter(pc.invert(pc.starts_with(status, "dropped"))).drop_columns(["status"])
        if "beta_source" in kept.column_names:
            for vc in pc.value_counts(kept.column("beta_source")).to_pylist():
                report.beta_sources[vc["values"]] = report.beta_sources.get(vc["values"], 0) + vc["counts"]
            kept = kept.drop_columns(["beta_source"])
        if kept.num_rows == 0:
            continue
        kept = kept.combine_chunks()
        for col in REF_COLUMNS if require_ref else ():
            if kept.column(col).null_count:
                raise ValueError(f"{what} {str(data_path)!r}: column {col!r} is null in {kept.column(col).null_count}"
                                 " rows that training keeps: give every kept pair its reference log-probs, or "
                                 "drop both columns and the training workers compute them")
        if writer is None:
            writer = pa.ipc.new_file(str(tmp), kept.schema)
        writer.write_table(kept)
        report.rows_kept += kept.num_rows
        id_cols = ["input_ids"] if kind == "sft" else ["chosen_ids", "rejected_ids"]
        report.tokens_kept += sum(int(pc.sum(pc.list_value_length(kept.column(c))).as_py()) for c in id_cols)
        if kind == "pairs":
            for gap, cnt in zip(*np.unique(kept.column("gap").to_numpy(zero_copy_only=False), return_counts=True)):
                report.per_gap_rows[str(gap)] = report.per_gap_rows.get(str(gap), 0) + int(cnt)
    if seen != rows_in:
        raise RuntimeError(f"tokenization returned {seen} rows for {rows_in} input rows")
    if writer is None:
        raise ValueError(f"{what} {str(data_path)!r}: no row fits max_length={stage_cfg.max_length} / "
                         f"max_prompt_length={stage_cfg.max_prompt_length} ({rows_in} rows in)")
    writer.close()
    tmp.replace(out_dir / TOKENIZED)
    return report
