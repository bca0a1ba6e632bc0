"""Entry points of the training stages (what the CLI calls). Each reads datasets and writes a model directory.

Stage directory layout (`out_dir`; names in crv_ray.run_paths):
  data/<hash>/tokenized.arrow   tokenized rows after the length policy (reused by a rerun)
  data/<hash>/ref_logps.parquet cogpo: the starting model's log-probs of each tokenized pair (written by the workers
                                before step 1, read back on a resume)
  data_report.json              rows in, dropped / truncated counts, padding fraction, steps per epoch
  checkpoints/<stage>-<hash>/   Ray Train run: sharded DCP checkpoints (latest K kept)
  metrics.jsonl, tb/            metrics of rank 0 (JSON lines; TensorBoard)
  model/                        the exported Hugging Face model (+ crv_ray_train.json, the completion marker)

Each stage is idempotent: a finished stage with the same config hash is skipped; an unfinished one resumes from its
latest checkpoint. On multi-node clusters the run directory must be on storage every node sees: object storage
(`s3://...`, crv_ray.storage: checkpoints go there directly through Ray Train's `storage_filesystem`, workers copy
the model and the tokenized rows to a local cache) or a shared file system. Ray is initialised by the caller.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

from crv_ray import storage
from crv_ray.redact import redact
from crv_ray.storage import AnyPath
from crv_ray.run_paths import (REF_LOGPS, TOKENIZED, TRAIN_MARKER, stage_checkpoints, stage_data_dir,
                               stage_data_report, stage_metrics, stage_model)
from crv_ray.train.config import TrainConfig, stage_hash
from crv_ray.train.batching import TokenizedRows, plan_padding_fraction, steps_per_epoch
from crv_ray.train.data import DataReport

logger = logging.getLogger(__name__)

MARKER = TRAIN_MARKER


def _fingerprint(*paths: AnyPath) -> str:
    entries = []
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        entries += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files
                    if f.suffix in (".parquet", ".safetensors", ".json", ".bin")]
    return "|".join(entries)


def _is_done(model_dir: AnyPath, config_hash: str) -> bool:
    marker = model_dir / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("config_hash") == config_hash


def _prepare_data(kind: str, data_path: AnyPath, model_dir: AnyPath, cfg: TrainConfig, stage: str,
                  out_dir: AnyPath, config_hash: str) -> AnyPath:
    """Tokenize once per config hash; write data_report.json (with the plan's padding fraction). On object storage
    the tokenized file is written locally and uploaded, then the report (what marks the data as complete)."""
    from crv_ray.train.data import describe_beta_sources, tokenize_to_file

    stage_cfg = getattr(cfg, stage)
    data_dir = stage_data_dir(out_dir, config_hash)
    tokenized = data_dir / TOKENIZED
    report_path = stage_data_report(data_dir)
    if tokenized.is_file() and report_path.is_file():
        storage.copy_file(report_path, stage_data_report(out_dir))
        return tokenized
    with tempfile.TemporaryDirectory(prefix="crv-tokenized-") as tmp:
        work = data_dir if isinstance(data_dir, Path) else Path(tmp)
        report = tokenize_to_file(kind, data_path, model_dir, stage_cfg, work, num_actors=cfg.tokenize_num_actors,
                                  in_process_max_rows=cfg.tokenize_in_process_max_rows)
        _plan_report(report, TokenizedRows(work / TOKENIZED), cfg, stage_cfg)
        if work != data_dir:
            storage.upload_file(work / TOKENIZED, tokenized)
    report.write(report_path)
    storage.copy_file(report_path, stage_data_report(out_dir))
    logger.info("%s data: %d rows in, %d kept, %d dropped (prompt), %d dropped (length), %d truncated, "
                "padding %.1f%%", stage, report.rows_in, report.rows_kept, report.dropped_prompt_too_long,
                report.dropped_too_long, report.truncated, 100 * report.padding_fraction)
    if report.beta_sources:
        logger.info("%s beta per pair: %s", stage, describe_beta_sources(report))
    return tokenized


def _plan_report(report: DataReport, rows: TokenizedRows, cfg: TrainConfig, stage_cfg) -> None:
    world = cfg.scaling.num_workers
    report.padding_fraction = plan_padding_fraction(rows.seq_lengths, world, stage_cfg)
    report.steps_per_epoch = steps_per_epoch(len(rows), world, stage_cfg.per_device_batch_size,
                                             stage_cfg.grad_accum_steps)


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """Logical resources one Ray Train worker holds."""
    sc = cfg.scaling
    return {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}


def _fit(train_fn: Callable[[dict], None], cfg: TrainConfig, stage: str, run: dict, out_dir: AnyPath,
         config_hash: str):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    stage_cfg = getattr(cfg, stage)
    sc = cfg.scaling
    resources = worker_resources(cfg)
    # Checkpoints go straight to their storage (a bucket: through pyarrow, no local copy of the run first).
    fs, checkpoints = storage.resolve(stage_checkpoints(out_dir))
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=run,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        # Same name + storage path on a rerun: Ray Train restores the run and hands out its latest checkpoint.
        run_config=ray.train.RunConfig(
            name=f"{stage}-{config_hash}", storage_path=checkpoints, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=stage_cfg.keep_last_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=stage_cfg.max_failures)),
    )
    from crv_ray.progress import follow_metrics

    # The workers' output does not reach the console: follow rank 0's metrics file instead.
    with follow_metrics(stage_metrics(out_dir), f"[{stage}] train", _total_steps(out_dir, stage_cfg.epochs)):
        return trainer.fit()


def _total_steps(out_dir: AnyPath, epochs: int) -> int | None:
    try:
        return int(json.loads(stage_data_report(out_dir).read_text())["steps_per_epoch"]) * epochs
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_stage(stage: str, kind: str, train_fn, cfg: TrainConfig, model_dir: AnyPath, data_path: AnyPath,
               out_dir: AnyPath) -> AnyPath:
    from crv_ray.train.data import load_tokenizer, pad_token_id

    model_dir, data_path, out_dir = map(storage.absolute, (model_dir, data_path, out_dir))
    tokenizer = load_tokenizer(model_dir)  # a bad model path fails here, named
    # Paths plus file sizes/mtimes: data rewritten in place must not reuse a stale tokenization or export.
    config_hash = stage_hash(cfg, stage, model_dir=str(model_dir), data=str(data_path),
                             files=_fingerprint(model_dir, data_path))
    export_dir = stage_model(out_dir)
    if _is_done(export_dir, config_hash):
        logger.info("%s: %s is complete for config %s, skipping", stage, export_dir, config_hash)
        return export_dir
    if export_dir.exists():  # an export of another config: never leave it looking like this run's result
        (export_dir / MARKER).unlink(missing_ok=True)  # first: object stores delete a folder object by object
        storage.rmtree(export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenized = _prepare_data(kind, data_path, model_dir, cfg, stage, out_dir, config_hash)
    run = {"train_cfg": cfg.model_dump(mode="json"), "model_dir": str(model_dir), "data_file": str(tokenized),
           "ref_logps_file": str(stage_data_dir(out_dir, config_hash) / REF_LOGPS),
           "out_dir": str(out_dir), "config_hash": config_hash, "pad_id": pad_token_id(tokenizer)}
    _fit(train_fn, cfg, stage, run, out_dir, config_hash)
    if (export_dir / "config.json").is_file():
        (export_dir / MARKER).write_text(json.dumps(redact({"stage": stage, "config_hash": config_hash,
                                                            "model_dir": str(model_dir), "data": str(data_path),
                                                            "config": cfg.model_dump(mode="json")}), indent=2))
    else:
        logger.info("%s stopped before the end (stop_after_steps); rerun to resume", stage)
    return export_dir


def run_sft(cfg: TrainConfig, model_dir: AnyPath, sft_path: AnyPath, out_dir: AnyPath) -> AnyPath:
    """SFT of the student at `model_dir` on the `sft` dataset; returns `out_dir/model`.

    With `cfg.sft.stop_after_steps` the run stops early and nothing is exported yet (the path does not exist).
    """
    from crv_ray.train.sft_recipe import sft_train_loop

    return _run_stage("sft", "sft", sft_train_loop, cfg, model_dir, sft_path, out_dir)


def run_cogpo(cfg: TrainConfig, sft_model_dir: AnyPath, pairs_path: AnyPath, out_dir: AnyPath) -> AnyPath:
    """CogPO from the SFT model on pairs (the reference log-probs: the pairs' own ref columns, or computed by the
    workers from the SFT model before the first step; see `CogPOConfig.reference`); returns `out_dir/model`."""
    from crv_ray.train.cogpo_recipe import cogpo_train_loop

    return _run_stage("cogpo", "pairs", cogpo_train_loop, cfg, sft_model_dir, pairs_path, out_dir)


def read_metrics(out_dir: str | AnyPath) -> list[dict]:
    """metrics.jsonl of a stage, one entry per step (the last one written wins after a resume)."""
    by_step: dict[int, dict] = {}
    path = stage_metrics(out_dir)
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            by_step[entry["step"]] = entry
    return [by_step[s] for s in sorted(by_step)]


def load_report(out_dir: str | AnyPath) -> DataReport:
    return DataReport(**json.loads(stage_data_report(out_dir).read_text()))
