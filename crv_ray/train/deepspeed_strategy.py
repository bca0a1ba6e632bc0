"""`train.strategy: deepspeed`: DeepSpeed ZeRO (stage 3 by default) inside the Ray Train workers, in place of FSDP2.

The loop (loop.py), losses, data plan, RNG/trainer-state files and export format are the same as with FSDP2; what
differs lives here: the engine (the same `TokenLogps` module and torch AdamW, partitioned by ZeRO), backward with
gradient-accumulation boundaries, clipping inside `engine.step()`, DeepSpeed's own checkpoint files, and gathering
the full weights for export.

The chunked log-prob head multiplies the hidden states by the LM-head weight outside the lm_head module's forward,
so ZeRO-3 would hand it an empty partition: the weight is registered as an external parameter of the root module,
which ZeRO then gathers for the root's whole forward (and reduces its gradient) like its own.

On CPU (tests, laptops) DeepSpeed runs with its CPU accelerator over gloo; `DS_ACCELERATOR` is set before the first
import of deepspeed, since the accelerator is chosen then.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from crv_ray.train.config import TrainConfig, _StageConfig
from crv_ray.train.distributed import (TokenLogps, apply_activation_checkpointing, apply_kernels, base_causal_lm,
                                       device, load_hf_model, rank_and_world, rng_state, set_rng_state)

DS_TAG = "ds"  # the one tag inside a crv-ray checkpoint directory


def import_deepspeed():
    """deepspeed with the accelerator of this worker's device (cpu without CUDA)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError("train.strategy: deepspeed needs the deepspeed package (pip install 'crv-ray[deepspeed]')"
                           ) from e
    return deepspeed


def init_deepspeed_distributed() -> None:
    """Outside Ray Train (benchmarks): a process group from the RANK/WORLD_SIZE/MASTER_* environment."""
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def deepspeed_config(cfg: TrainConfig, stage: _StageConfig, world: int, dev: torch.device) -> dict:
    """The DeepSpeed config of a stage: one micro-batch per `engine.backward`, accumulation boundaries set by the
    loop; bf16 on GPU per `fsdp.mixed_precision`, fp32 on CPU; ZeRO stage and offload from `train.deepspeed`."""
    ds = cfg.deepspeed
    bf16 = cfg.fsdp.mixed_precision == "bf16" or (cfg.fsdp.mixed_precision == "auto" and dev.type == "cuda")
    zero: dict = {"stage": ds.zero_stage, "overlap_comm": dev.type == "cuda", "contiguous_gradients": True,
                  "reduce_bucket_size": ds.bucket_size, "stage3_prefetch_bucket_size": ds.bucket_size,
                  "stage3_param_persistence_threshold": 0,
                  "stage3_gather_16bit_weights_on_model_save": False}
    if ds.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dev.type == "cuda"}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": dev.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": stage.per_device_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": stage.per_device_batch_size * world,
        "gradient_clipping": stage.max_grad_norm if stage.max_grad_norm is not None else 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def setup_deepspeed_engine(model_dir: str | Path, cfg: TrainConfig, stage: _StageConfig):
    """(engine, torch AdamW inside it): the stage's model as a `TokenLogps` under ZeRO, kernels and activation
    checkpointing as with FSDP2."""
    from crv_ray.train.distributed import adamw_impl_kwargs

    deepspeed = import_deepspeed()
    dev = device()
    _, world = rank_and_world()
    os.environ.setdefault("LOCAL_RANK", str(dev.index or 0))  # DeepSpeed asserts it; Ray Train sets it
    lm = load_hf_model(model_dir, cfg.lora, stage.seed)
    apply_kernels(lm, stage.kernels, dev)
    apply_activation_checkpointing(lm, cfg.fsdp)
    model = TokenLogps(lm, stage.logprob_chunk_size)
    params = [p for p in model.parameters() if p.requires_grad]
    # ZeRO keeps fp32 master partitions on one device; fused AdamW there unless they sit on the host for a GPU run.
    impl = adamw_impl_kwargs("cpu" if cfg.deepspeed.offload else dev.type, cpu_offload=False)
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(stage.adam_betas),
                                  weight_decay=stage.weight_decay, **impl)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                      config=deepspeed_config(cfg, stage, world, dev))
    if cfg.deepspeed.zero_stage == 3:
        head = base_causal_lm(lm).get_output_embeddings()
        deepspeed.zero.register_external_parameter(engine.module, head.weight)
        if getattr(head, "bias", None) is not None:
            deepspeed.zero.register_external_parameter(engine.module, head.bias)
    return engine, optimizer


def save_deepspeed_checkpoint(engine, scheduler, train_state: dict, metrics: dict) -> None:
    """DeepSpeed's own checkpoint (every rank writes its partitions) plus crv-ray's state files, reported to Ray
    Train like the FSDP2 one. A barrier: every rank calls it at the same step."""
    from crv_ray.train.checkpoint import write_and_report, write_state_files

    rank, _ = rank_and_world()

    def write(ckpt_dir: Path) -> None:
        engine.save_checkpoint(str(ckpt_dir), tag=DS_TAG, save_latest=False)
        write_state_files(ckpt_dir, rank, scheduler.state_dict(), train_state, rng_state())

    write_and_report(train_state["global_step"], metrics, write)


def load_latest_deepspeed_checkpoint(engine, scheduler) -> dict | None:
    """Restore engine (weights, optimizer), scheduler and RNG from the run's latest checkpoint, or None.

    DeepSpeed writes its optimizer partitions with torch.save (pickles) and reads them back with torch.load: only
    checkpoints this run wrote to its own storage path are ever read."""
    import ray.train

    from crv_ray.train.checkpoint import read_state_files

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    rank, _ = rank_and_world()
    with checkpoint.as_directory() as ckpt_dir:
        train_state, rng = read_state_files(Path(ckpt_dir), rank)
        if not (Path(ckpt_dir) / DS_TAG).is_dir():
            raise RuntimeError(f"checkpoint {ckpt_dir} was not written by train.strategy: deepspeed (no {DS_TAG}/); "
                               "resume it with the strategy that wrote it")
        engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_lr_scheduler_states=False)
        if rng is not None:
            set_rng_state(rng)
    scheduler.load_state_dict(train_state.pop("scheduler"))
    return train_state


def deepspeed_full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full weights on rank 0 (CPU, HF keys), {} elsewhere; gathered one module at a time. A collective."""
    rank, _ = rank_and_world()
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # the module's dtype; fp32 on CPU
    else:
        sd = engine.module.state_dict()
    if rank != 0 or sd is None:
        return {}
    return {k.removeprefix("lm."): v.detach().cpu() for k, v in sd.items()}
