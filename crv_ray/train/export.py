"""Export the trained (sharded) model as ONE consolidated Hugging Face directory that transformers and vLLM load:
safetensors weights (in the starting model's dtype), config, tokenizer, generation_config; LoRA merged."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from crv_ray import storage
from crv_ray.train.config import LoRAConfig
from crv_ray.train.distributed import rank_and_world


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All shards gathered into full CPU tensors on rank 0 (other ranks get {}). A collective: call on all ranks.

    Keys are those of the HF model (the TokenLogps wrapper's `lm.` prefix is removed).
    """
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in sd.items()}


def save_hf_model(state_dict: dict[str, torch.Tensor], base_model_dir: str | Path, out_dir: str | Path,
                  lora: LoRAConfig | None = None) -> Path:
    """Write an HF directory from a full state dict of the (possibly peft-wrapped) model started from
    `base_model_dir` (a local folder). Written to a temp dir and renamed, so a half-written export is never mistaken
    for one; an `out_dir` on object storage gets the temp dir's files uploaded (the caller's marker, written after,
    is what says the export is complete)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base_model_dir, out_dir = Path(base_model_dir), storage.as_path(out_dir)
    config = AutoConfig.from_pretrained(str(base_model_dir))
    save_dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(save_dtype, str):
        save_dtype = getattr(torch, save_dtype)
    if lora is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        # Tied output embeddings are not separate entries of the state dict.
        missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
        if missing or unexpected:
            raise ValueError(f"export: state dict does not match {base_model_dir}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if config.tie_word_embeddings:
            model.tie_weights()
    else:
        from peft import LoraConfig, get_peft_model

        model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        model.load_state_dict(state_dict, strict=True)
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.to(save_dtype)

    remote = isinstance(out_dir, storage.RemotePath)
    if not remote:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=None if remote else out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(base_model_dir)).save_pretrained(str(tmp))
        if (base_model_dir / "generation_config.json").exists():
            GenerationConfig.from_pretrained(str(base_model_dir)).save_pretrained(str(tmp))
        if remote:
            storage.upload_dir(tmp, out_dir)
        else:
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_model(model: nn.Module, base_model_dir: str | Path, out_dir: str | Path,
                 lora: LoRAConfig | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Gather the full weights to rank 0 and save them there; all ranks must call it. `state_dict`: the full
    weights already gathered (rank 0) by another strategy than FSDP2."""
    rank, _ = rank_and_world()
    if state_dict is None:
        state_dict = full_state_dict(model)
    if rank == 0:
        save_hf_model(state_dict, base_model_dir, out_dir, lora)
    if dist.is_initialized():
        dist.barrier()
