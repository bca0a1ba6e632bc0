"""Sharded, resumable checkpoints with torch.distributed.checkpoint (DCP), persisted through Ray Train.

Layout of one checkpoint (Ray Train V2 merges the files every rank reports into one directory):
  .metadata, __<rank>_0.distcp   model + optimizer, sharded (DCP; rank 0 writes the metadata)
  trainer_state.pt               scheduler, global step, epoch, config hash (rank 0)
  rng_rank<r>.pt                 python / numpy / torch RNG of rank r
A rerun with the same run name and storage path gets the latest one from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from crv_ray.train.distributed import rank_and_world, rng_state, set_rng_state

TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, train_state: dict,
                    metrics: dict) -> None:
    """Write this rank's shard and report it (a barrier: every rank must call this at the same step)."""
    import ray.train

    rank, _ = rank_and_world()
    with tempfile.TemporaryDirectory(prefix="crv-ckpt-") as tmp:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save(rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save({"scheduler": scheduler.state_dict(), **train_state}, Path(tmp) / TRAINER_STATE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step{train_state['global_step']:08d}")


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
        # get_state_dict initialises the optimizer state, so DCP has tensors to load into.
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train_state = torch.load(Path(ckpt_dir) / TRAINER_STATE, weights_only=False)
        rng_file = Path(ckpt_dir) / f"rng_rank{rank}.pt"
        if rng_file.exists():  # absent when resuming with more ranks than saved
            set_rng_state(torch.load(rng_file, weights_only=False))
    scheduler.load_state_dict(train_state.pop("scheduler"))
    return train_state
