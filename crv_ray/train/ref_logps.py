"""Reference log-probs: one batch-inference pass of the frozen SFT model over all pairs (Ray Data), stored as
`ref_chosen_logp` / `ref_rejected_logp` columns beside each pair, so CogPO training holds one model.

Tokenization and the length policy are the training ones (`tokenize_pairs_batch` with the CogPO config), so the
sums cover exactly the response tokens CogPO will score. Pairs the policy drops get nulls (training drops them too).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from crv_ray import storage
from crv_ray.run_paths import REF_LOGPS_MARKER
from crv_ray.train.config import CogPOConfig, TrainConfig
from crv_ray.train.batching import TokenizedRows
from crv_ray.storage import AnyPath
from crv_ray.train.data import (REF_COLUMNS, list_parquet_files, load_tokenizer, read_parquet_dataset,
                                tokenize_pairs_batch, validate_files)

COMPLETE_MARKER = REF_LOGPS_MARKER


class RefLogpsPredictor:
    """Ray Data callable class: holds the reference model (CPU fp32, or GPU bf16) and its tokenizer."""

    def __init__(self, model_dir: str, cogpo_cfg: dict, use_gpu: bool, cpu_threads: int = 1):
        import torch

        if not use_gpu:
            # Ray caps a 1-CPU actor at one thread; this pass runs alone, so it may use its share of the node.
            torch.set_num_threads(max(1, cpu_threads))

        from crv_ray.train.distributed import TokenLogps, load_hf_model

        self.cfg = CogPOConfig.model_validate(cogpo_cfg)
        self.tokenizer = load_tokenizer(model_dir)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        local = str(storage.local_copy(model_dir))  # a model on object storage: copied to this node's cache
        lm = load_hf_model(local).to(self.device, torch.bfloat16 if use_gpu else torch.float32).eval()
        self.model = TokenLogps(lm, self.cfg.logprob_chunk_size)
        self.pad_id = pad_token_id(self.tokenizer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from crv_ray.train.logprobs import shift_labels

        tokenized = tokenize_pairs_batch(self.tokenizer, batch, self.cfg)
        kept = np.flatnonzero(~np.char.startswith(tokenized.column("status").to_numpy(zero_copy_only=False)
                                                  .astype(str), "dropped"))
        chosen = np.full(batch.num_rows, np.nan)
        rejected = np.full(batch.num_rows, np.nan)
        if kept.size:
            rows = TokenizedRows.from_table(tokenized.take(pa.array(kept)))
            coll = rows.collate(np.arange(kept.size), self.pad_id)
            with torch.no_grad():
                ids = coll["input_ids"].to(self.device)
                labels = shift_labels(ids, coll["loss_mask"].to(self.device))
                seq = self.model(ids, coll["attention_mask"].to(self.device), labels).sum(-1).double().cpu().numpy()
            chosen[kept], rejected[kept] = seq[: kept.size], seq[kept.size:]
        out = batch.drop_columns([c for c in REF_COLUMNS if c in batch.column_names])
        mask = np.isnan(chosen)
        out = out.append_column(REF_COLUMNS[0], pa.array(chosen, pa.float64(), mask=mask))
        return out.append_column(REF_COLUMNS[1], pa.array(rejected, pa.float64(), mask=mask))


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _fingerprint(model_dir: Path, pairs_path: Path, cfg: CogPOConfig) -> str:
    payload = {"model_dir": str(model_dir), "pairs": str(pairs_path),
               "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in list_parquet_files(pairs_path)],
               "length": cfg.model_dump(mode="json", include={"max_length", "max_prompt_length", "truncation"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(out_path: str | AnyPath, fingerprint: str | None = None) -> bool:
    marker = storage.as_path(out_path) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    return fingerprint is None or json.loads(marker.read_text()).get("fingerprint") == fingerprint


def compute_ref_logps(model_dir: str | Path, pairs_path: str | Path, out_path: str | Path,
                      cfg: TrainConfig) -> AnyPath:
    """Write the pairs plus `ref_chosen_logp`, `ref_rejected_logp` as a Parquet directory at `out_path`.

    Skipped when `out_path` holds a complete result for the same model, input files and length settings.
    Ray must be initialised by the caller (or is started with defaults by Ray Data).
    """
    model_dir, pairs_path, out_path = map(storage.absolute, (model_dir, pairs_path, out_path))
    load_tokenizer(model_dir)  # names a bad model path before any Ray work
    files = list_parquet_files(pairs_path, "pairs dataset")
    rows_in = validate_files(files, "pairs", cfg.cogpo.gap_betas)
    fingerprint = _fingerprint(model_dir, pairs_path, cfg.cogpo)
    if is_complete(out_path, fingerprint):
        return out_path
    import ray.data

    use_gpu = cfg.scaling.use_gpu
    ds = read_parquet_dataset(files).map_batches(
        RefLogpsPredictor,
        fn_constructor_kwargs={"model_dir": str(model_dir), "cogpo_cfg": cfg.cogpo.model_dump(mode="json"),
                               "use_gpu": use_gpu,
                               "cpu_threads": max(1, (os.cpu_count() or 1) // cfg.ref_num_actors)},
        batch_format="pyarrow", batch_size=cfg.ref_batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.ref_num_actors),
        **({"num_gpus": 1} if use_gpu else {"num_cpus": 1}))
    # Local disk: written beside and renamed into place. Object storage has no rename: written in place, after the
    # old marker is gone, with the marker last.
    local = isinstance(out_path, Path)
    tmp = out_path.with_name(out_path.name + ".tmp") if local else out_path
    (tmp / COMPLETE_MARKER).unlink(missing_ok=True)
    storage.rmtree(tmp)
    fs, key = storage.resolve(tmp)
    ds.write_parquet(key, filesystem=fs)
    rows_out = sum(storage.parquet_file(f).metadata.num_rows for f in list_parquet_files(tmp))
    if rows_out != rows_in:
        raise RuntimeError(f"reference log-probs: wrote {rows_out} rows for {rows_in} input pairs")
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"fingerprint": fingerprint, "rows": rows_out,
                                                   "model_dir": str(model_dir), "pairs": str(pairs_path)}))
    if local:
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
    return out_path
