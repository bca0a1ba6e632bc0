"""Pieces shared by the SFT and CogPO recipes (run inside Ray Train workers): model setup with FSDP2 and
optional LoRA, optimizer and schedule, seeding, gradient clipping, and rank-0 metric logging."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from crv_ray import storage
from crv_ray.run_paths import stage_metrics
from crv_ray.train.config import FSDPConfig, LoRAConfig, _StageConfig
from crv_ray.train.logprobs import _logit_transform, chunked_token_logps


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    """Ray Train's device for this worker; outside Ray Train (benchmarks, torchrun) the local GPU or the CPU."""
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except (ImportError, RuntimeError):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM under an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TokenLogps(nn.Module):
    """Causal LM -> log-prob of each label token, projecting hidden states to the vocab in chunks.

    Why a wrapper: the decoder and the chunked head run inside ONE forward, so FSDP2's root (this module) keeps
    embeddings and lm_head unsharded for the whole computation and re-gathers them for backward.
    """

    def __init__(self, lm: nn.Module, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token log-probs [rows, T]. A packed row passes `position_ids` and no attention mask: transformers then
        keeps the sequences apart by where the positions restart (block-diagonal causal attention)."""
        base = base_causal_lm(self.lm)
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state
        head = base.get_output_embeddings()
        logit_scale, softcap = _logit_transform(base.config)
        return chunked_token_logps(hidden, head.weight, labels, self.chunk_size,
                                   lm_head_bias=getattr(head, "bias", None), logit_scale=logit_scale,
                                   softcap=softcap)


def load_hf_model(model_dir: str | Path, lora: LoRAConfig | None = None, seed: int = 0) -> nn.Module:
    """Full-precision (fp32 master weights) HF model, with LoRA adapters when configured."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        # Every rank must initialise the adapters identically: each keeps its shard of its own full copy.
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return model


def meta_hf_model(model_dir: str | Path) -> nn.Module:
    """The HF causal LM of `model_dir` with its parameters on the meta device (no memory, no init) and its buffers
    (rotary frequencies) real, since a weights file does not hold the non-persistent ones."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=torch.float32)
    lm.tie_weights()  # from_config on the meta device leaves a tied lm_head as its own (never loaded) parameter
    lm.config.use_cache = False
    return lm


def load_sharded_weights(model: nn.Module, model_dir: str | Path, prefix: str = "lm.") -> None:
    """Fill a sharded (FSDP2, materialised with `to_empty`) model from the safetensors files of `model_dir`, each
    rank reading only the slices of its own shards (torch.distributed.checkpoint's Hugging Face reader, in place).
    A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {k.removeprefix(prefix): v for k, v in get_model_state_dict(model).items()}
    lm = base_causal_lm(model.lm) if hasattr(model, "lm") else model
    if getattr(lm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding matrix itself: loaded under its own name
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(model_dir)))
    except Exception as e:
        raise RuntimeError(f"sharded load of {model_dir} failed ({type(e).__name__}: {str(e)[:500]}); the model's "
                           "parameter names must be the safetensors keys. Set train.fsdp.load: full to load the "
                           "whole model on each rank instead") from e


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(base_causal_lm(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find decoder layers to shard in {type(base_causal_lm(model)).__name__} "
                         f"(_no_split_modules={sorted(names)})")
    return layers


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    """Selective AC: keep what the matmuls and attention produced (the costly ops), recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten.linear.default, torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_flash_attention.default,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
              torch.ops.aten._scaled_dot_product_cudnn_attention.default}


def apply_activation_checkpointing(lm: nn.Module, fsdp: FSDPConfig) -> None:
    """Turn on the configured activation checkpointing in the HF decoder layers (their GradientCheckpointingLayer
    wraps each layer's call, FSDP2's unshard hooks included, in non-reentrant torch.utils.checkpoint)."""
    mode = fsdp.activation_checkpointing
    if mode == "off":
        return
    kwargs: dict = {"use_reentrant": False}
    every = 1
    if mode == "selective":
        every = fsdp.activation_checkpointing_every
        if fsdp.activation_checkpointing_save_matmuls:
            from functools import partial

            from torch.utils.checkpoint import create_selective_checkpoint_contexts

            kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _save_matmuls_policy)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Every k-th decoder layer (set here rather than by transformers' every_n_layers, which older versions lack).
    for i, layer in enumerate(_decoder_layers(lm)):
        layer.gradient_checkpointing = i % every == 0


def uses_cpu_offload(fsdp: FSDPConfig, dev: torch.device) -> bool:
    """FSDP2 keeps parameters, gradients and optimizer state on the host: GPU runs with `fsdp.cpu_offload` only."""
    return fsdp.enabled and fsdp.cpu_offload and dev.type == "cuda" and dist.is_initialized()


def apply_kernels(lm: nn.Module, kernels: str, dev: torch.device) -> None:
    """Swap in the configured fused kernels (see `_StageConfig.kernels`). The LM head is left alone: log-probs stay
    on `chunked_token_logps` (Liger's fused linear cross entropy gives a loss, not per-token log-probs)."""
    if kernels == "none":
        return
    if kernels == "liger":
        if dev.type != "cuda":
            raise RuntimeError(f"kernels: liger needs a CUDA device (Triton), this worker runs on {dev.type}: "
                               "use kernels: compile or none on CPU")
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError as e:
            raise RuntimeError("kernels: liger needs the liger-kernel package (pip install 'crv-ray[gpu]')") from e
        _apply_liger_kernel_to_instance(model=base_causal_lm(lm), rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
        return
    if kernels == "compile":
        # The layer's forward only: FSDP2's unshard hooks and HF's checkpoint wrapper stay outside the graph.
        for layer in _decoder_layers(lm):
            layer.forward = torch.compile(layer.forward)
        return
    raise ValueError(f"unknown kernels {kernels!r} (none, liger, compile)")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 / AMX: oneDNN runs bf16 matmuls natively (measured 7.8x fp32's on this Xeon, one thread)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_bf16(mixed_precision: str, dev: torch.device) -> bool:
    """bf16 compute (fp32 master weights and gradient reduction): `bf16`, or `auto` on a GPU or on a CPU with
    native bf16, where it halved a SmolLM2-135M training step on this 2-core Xeon (111 -> 237 tokens/s)."""
    if mixed_precision != "auto":
        return mixed_precision == "bf16"
    return dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16())


def setup_model(model_dir: str | Path, fsdp: FSDPConfig, lora: LoRAConfig | None, chunk_size: int,
                seed: int, trainable: bool = True, kernels: str = "none") -> TokenLogps:
    """Load, wrap in TokenLogps and shard with FSDP2: each decoder layer, then the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dev = device()
    sharded_load = (fsdp.enabled and dist.is_initialized() and fsdp.load == "sharded"
                    and (lora is None or not trainable))
    lm = meta_hf_model(model_dir) if sharded_load else load_hf_model(model_dir, lora if trainable else None, seed)
    if not trainable:
        lm.requires_grad_(False)
        lm.eval()
    if trainable:
        apply_kernels(lm, kernels, dev)
        apply_activation_checkpointing(lm, fsdp)
    model = TokenLogps(lm, chunk_size)
    if not fsdp.enabled or not dist.is_initialized():
        return model.to(dev)
    bf16 = uses_bf16(fsdp.mixed_precision, dev)
    kwargs = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16 else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if uses_cpu_offload(fsdp, dev) else OffloadPolicy(),
    }
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if not uses_cpu_offload(fsdp, dev) and not sharded_load:
            model.to(dev)
    for layer in _decoder_layers(lm):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if sharded_load:
        buffers = {name: buf for name, buf in model.named_buffers()}
        model.to_empty(device="cpu" if uses_cpu_offload(fsdp, dev) else dev)  # this rank's shards only
        for name, buf in buffers.items():  # to_empty left the (real) buffers uninitialised: put them back
            module_name, _, buf_name = name.rpartition(".")
            model.get_submodule(module_name)._buffers[buf_name] = buf.to(dev)
        load_sharded_weights(model, model_dir)
    if uses_cpu_offload(fsdp, dev):
        # FSDP2 moves only parameters; buffers (e.g. rotary inv_freq) must sit where the compute runs.
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(dev)
    return model


def reshard(model: nn.Module) -> None:
    """After forwards without a backward (scoring under no_grad), FSDP2's root keeps its parameters unsharded,
    waiting for the backward: reshard them, or an optimizer built next would hold the unsharded copies (never
    updated for real, and its state dict fails)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_sharded(model: nn.Module) -> None:
    """Every parameter of an FSDP2 model is its sharded DTensor (see `reshard`; an unsharded one left by a no_grad
    forward does not even require grad, so the optimizer would silently skip it)."""
    from torch.distributed.tensor import DTensor

    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(f"{len(plain)} parameter(s) are not sharded before the optimizer is built (e.g. "
                           f"{plain[:3]}): a forward ran without a backward and without `reshard`")


def adamw_impl_kwargs(param_device_type: str, cpu_offload: bool) -> dict[str, bool]:
    """Which AdamW implementation to use: `fused` (one kernel per parameter group) wherever the parameters live on
    one device, CUDA or CPU: torch >= 2.4 has a fused CPU AdamW, and on CPU it measured ~5x the single-tensor loop
    and ~3.5x foreach (4M-param Llama, FSDP2 DTensors, one thread). The single-tensor loop only under FSDP CPU
    offload, where the host-side state would meet device-side tensors in the multi-tensor kernels."""
    if cpu_offload and param_device_type != "cpu":
        raise ValueError(f"cpu_offload keeps parameters on the CPU, got parameters on {param_device_type!r}")
    if cpu_offload:
        return {"foreach": False, "fused": False}
    if param_device_type in ("cuda", "cpu"):
        return {"fused": True}
    return {"foreach": True}  # a device type without a fused AdamW kernel


def setup_optimizer(model: nn.Module, cfg: _StageConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; `cpu_offload` says FSDP keeps them on the CPU for a GPU run."""
    params = [p for p in model.parameters() if p.requires_grad]
    device_types = {p.device.type for p in params}
    if len(device_types) != 1:
        raise ValueError(f"trainable parameters must live on one device type, found {sorted(device_types)}")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                             **adamw_impl_kwargs(device_types.pop(), cpu_offload))


def setup_scheduler(optimizer: torch.optim.Optimizer, cfg: _StageConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> float:
    """Global grad norm (clipping when max_norm is set). With FSDP2 the norm is a DTensor: make it full."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device() if device().type == "cuda" else "cpu")
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def worker_node_count() -> int:
    """How many Ray nodes the worker group spans (a collective: every rank calls it). Logged with each step, so
    metrics.jsonl shows where a multi-node run really ran, also after a restart on other nodes."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray (torchrun, benchmarks)
        node = None
    node = node or socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLogger:
    """Rank 0 writes `metrics.jsonl` and TensorBoard. A run resumed from a checkpoint appends (steps after the
    checkpoint may repeat after a crash: take the last line per step); a fresh run starts a new file.

    On object storage (no appends) both are written to a local folder; metrics.jsonl is uploaded whole after every
    step (one small PUT, so a crash loses no logged step) and tb/ when the logger closes."""

    def __init__(self, out_dir: str | Path, enabled: bool, resumed: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = storage.as_path(out_dir)
        self.remote = isinstance(self.out_dir, storage.RemotePath)
        local = Path(tempfile.mkdtemp(prefix="crv-metrics-")) if self.remote else self.out_dir
        local.mkdir(parents=True, exist_ok=True)
        self.local_jsonl = stage_metrics(local)
        if self.remote and resumed and stage_metrics(self.out_dir).is_file():
            self.local_jsonl.write_bytes(stage_metrics(self.out_dir).read_bytes())
        self.jsonl = self.local_jsonl.open("a" if resumed else "w")
        self.local_tb = local / "tb"
        self.tb = SummaryWriter(str(self.local_tb))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()
        if self.remote:
            storage.upload_file(self.local_jsonl, stage_metrics(self.out_dir))
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            if self.remote:
                storage.upload_file(self.local_jsonl, stage_metrics(self.out_dir))
                storage.upload_dir(self.local_tb, self.out_dir / "tb", replace=False)  # a resumed run adds files
                shutil.rmtree(self.local_jsonl.parent, ignore_errors=True)


# Test-only fault injection: a JSON file {"rank": r, "step": n} under the stage's out_dir makes rank r's process
# exit hard right after optimizer step n, once (the file is renamed to FAULT_FILE + ".done" first).
FAULT_FILE = ".inject_worker_failure.json"


def maybe_inject_failure(out_dir: str | Path, rank: int, step: int) -> None:
    path = storage.as_path(out_dir) / FAULT_FILE
    if not path.is_file():
        return
    spec = json.loads(path.read_text())
    if (spec["rank"], spec["step"]) == (rank, step):
        path.replace(path.with_name(FAULT_FILE + ".done"))
        os._exit(1)
