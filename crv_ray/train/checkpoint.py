"""Sharded, resumable checkpoints with torch.distributed.checkpoint (DCP), persisted through Ray Train.

Layout of one checkpoint (Ray Train V2 merges the files every rank reports into one directory):
  .metadata, __<rank>_0.distcp   model + optimizer, sharded (DCP; rank 0 writes the metadata)
  trainer_state.json             scheduler, global step, config hash (rank 0)
  rng_rank<r>.pt                 python / numpy / torch RNG of rank r: tensors and plain lists only
A rerun with the same run name and storage path gets the latest one from `ray.train.get_checkpoint()`.

Nothing here is read with pickle: a checkpoint directory from elsewhere (a shared bucket) cannot run code when it
is loaded. JSON for the state, `torch.load(weights_only=True)` for the RNG tensors, DCP for the weights.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from crv_ray.train.distributed import rank_and_world, rng_state, set_rng_state

TRAINER_STATE = "trainer_state.json"
OLD_TRAINER_STATE = "trainer_state.pt"  # the earlier format, a pickle: recognised, never loaded


class OldCheckpointError(RuntimeError):
    pass


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def rng_to_tensors(state: dict) -> dict:
    """`distributed.rng_state()` as data `torch.load(weights_only=True)` reads: numpy's key array as a list."""
    version, internal, gauss = state["python"]
    name, key, pos, has_gauss, cached = state["numpy"]
    out = {"python": [version, list(internal), gauss], "numpy": [name, key.tolist(), pos, has_gauss, cached],
           "torch": state["torch"]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def rng_from_tensors(saved: dict) -> dict:
    """The inverse of `rng_to_tensors`: what `distributed.set_rng_state` takes."""
    version, internal, gauss = saved["python"]
    name, key, pos, has_gauss, cached = saved["numpy"]
    out = {"python": (version, tuple(internal), gauss),
           "numpy": (name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached), "torch": saved["torch"]}
    if "cuda" in saved:
        out["cuda"] = saved["cuda"]
    return out


def write_state_files(ckpt_dir: Path, rank: int, scheduler_state: dict, train_state: dict, rng: dict) -> None:
    """The non-weight files of one rank's checkpoint part (trainer state on rank 0 only)."""
    torch.save(rng_to_tensors(rng), Path(ckpt_dir) / rng_file(rank))
    if rank == 0:
        (Path(ckpt_dir) / TRAINER_STATE).write_text(json.dumps({"scheduler": scheduler_state, **train_state},
                                                               indent=2))


def read_state_files(ckpt_dir: Path, rank: int) -> tuple[dict, dict | None]:
    """(trainer state with its "scheduler" entry, this rank's RNG state or None when the checkpoint has none)."""
    ckpt_dir = Path(ckpt_dir)
    state_path = ckpt_dir / TRAINER_STATE
    if not state_path.is_file():
        if (ckpt_dir / OLD_TRAINER_STATE).is_file():
            raise OldCheckpointError(
                f"checkpoint {ckpt_dir} was written by an older crv-ray ({OLD_TRAINER_STATE}, a pickle, which is "
                f"not loaded because loading it can run code). Delete {ckpt_dir.parent} to train this stage from "
                "the start, or finish it with the crv-ray version that wrote it")
        raise OldCheckpointError(f"checkpoint {ckpt_dir} has no {TRAINER_STATE}: not a crv-ray checkpoint")
    train_state = json.loads(state_path.read_text())
    path = ckpt_dir / rng_file(rank)
    rng = rng_from_tensors(torch.load(path, weights_only=True)) if path.exists() else None
    return train_state, rng


def write_and_report(global_step: int, metrics: dict, write: Callable[[Path], None]) -> None:
    """`write(dir)` this rank's part of the checkpoint of `global_step`, then report it to Ray Train (a barrier:
    every rank calls this at the same step).

    On a filesystem path (local, or a shared mount) `dir` is the checkpoint's own directory in the run's storage:
    Ray Train records it where it is (NO_UPLOAD). Writing to a temporary directory for Ray Train to copy wrote every
    byte twice and needed the node's temp disk to hold a whole checkpoint part (a 7B student's weights with AdamW
    state are about 84 GB). On object storage Ray Train uploads a temporary directory, as before. A part left
    behind by a crash mid-write is never reported, and the same step's next save overwrites it."""
    import pyarrow.fs
    import ray.train

    name = f"checkpoint_step{global_step:08d}"
    storage = ray.train.get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        path = Path(storage.build_checkpoint_path_from_name(name))
        path.mkdir(parents=True, exist_ok=True)
        write(path)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint(str(path), filesystem=storage.storage_filesystem),
                         checkpoint_dir_name=name, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        return
    with tempfile.TemporaryDirectory(prefix="crv-ckpt-") as tmp:
        write(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, train_state: dict,
                    metrics: dict) -> None:
    """Write this rank's shard and report it (a barrier: every rank must call this at the same step)."""
    rank, _ = rank_and_world()

    def write(ckpt_dir: Path) -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir))
        write_state_files(ckpt_dir, rank, scheduler.state_dict(), train_state, rng_state())

    write_and_report(train_state["global_step"], metrics, write)


def load_latest_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict | None:
    """Restore model, optimizer, scheduler and this rank's RNG from the run's latest checkpoint.

    Returns the saved train state (global_step, ...) or None when the run starts fresh.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    rank, _ = rank_and_world()
    with checkpoint.as_directory() as ckpt_dir:
        train_state, rng = read_state_files(Path(ckpt_dir), rank)  # first: an old checkpoint fails before DCP works
        # get_state_dict initialises the optimizer state, so DCP has tensors to load into.
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if rng is not None:  # absent when resuming with more ranks than saved
            set_rng_state(rng)
    scheduler.load_state_dict(train_state.pop("scheduler"))
    return train_state
