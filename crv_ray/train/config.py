"""Typed configuration of the training half: SFT, reference log-probs and CogPO.

Every field has a default and a description; unknown keys fail at load time (`extra="forbid"`), so a typo in a
YAML file names the offending field instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Project defaults for the per-gap beta (method.md, "Beta values"): a subtle preference gets a gentle push.
DEFAULT_GAP_BETAS: dict[str, float] = {"small": 1.0, "medium": 0.5, "large": 0.2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=1, description="Number of Ray Train workers (one process per device).")
    use_gpu: bool = Field(False, description="Train on GPUs (nccl) instead of CPUs (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs reserved per worker when use_gpu is true.")


class FSDPConfig(_Strict):
    enabled: bool = Field(True, description="Shard each decoder layer and the root with FSDP2 (fully_shard).")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Parameter dtype inside forward/backward: auto = bf16 on GPU and on CPUs with native bf16 "
        "(AVX512-BF16/AMX), else fp32. "
        "Gradients are always reduced in fp32 and master weights stay fp32.")
    activation_checkpointing: Literal["off", "full", "selective"] = Field(
        "off", description="Recompute decoder-layer activations in backward: off; full = every decoder layer; "
        "selective = every activation_checkpointing_every-th layer (and, with activation_checkpointing_save_matmuls, "
        "those layers keep their matmul outputs and recompute only the cheap ops). true/false of older configs "
        "mean full/off.")
    activation_checkpointing_every: int = Field(
        2, ge=1, description="selective: checkpoint layers 0, k, 2k, ... (k = this); the others keep their "
        "activations. 1 = every layer.")
    activation_checkpointing_save_matmuls: bool = Field(
        False, description="selective: inside a checkpointed layer keep the matmul/attention outputs (torch's "
        "selective activation checkpointing policy) and recompute only norms, activations and the like.")
    cpu_offload: bool = Field(False, description="Keep sharded parameters/grads/optimizer state in CPU memory "
                              "(FSDP2 CPUOffloadPolicy); only meaningful on GPU.")
    load: Literal["sharded", "full"] = Field(
        "sharded", description="How a sharded run loads the starting weights: sharded = build the model on the meta "
        "device, shard it, then read only this rank's slices from the safetensors files (memory per rank is about "
        "its shard, for students too big for one host's memory); full = every rank loads the whole model first. "
        "LoRA runs and unsharded runs always load in full.")

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _ac_bool(cls, v):
        return {True: "full", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _ac_options_apply(self):
        if self.activation_checkpointing != "selective" and (self.activation_checkpointing_every != 2
                                                             or self.activation_checkpointing_save_matmuls):
            raise ValueError("activation_checkpointing_every / activation_checkpointing_save_matmuls apply to "
                             f"activation_checkpointing: selective (it is {self.activation_checkpointing!r})")
        return self


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[2, 3] = Field(3, description="ZeRO stage: 3 partitions parameters, gradients and optimizer "
                                      "state; 2 only gradients and optimizer state.")
    offload: bool = Field(False, description="Keep optimizer state (and, with ZeRO-3, parameters) in CPU memory.")
    bucket_size: int = Field(50_000_000, ge=1, description="Elements per gradient-reduction and parameter-prefetch "
                             "bucket.")


class LoRAConfig(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get LoRA adapters.")


class _StageConfig(_Strict):
    epochs: int = Field(1, ge=1, description="Passes over the dataset.")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of optimizer steps of linear warmup.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm to this; null = no clip.")
    per_device_batch_size: int = Field(1, ge=1, description="Rows per micro-batch per worker.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per worker per optimizer step.")
    max_length: int = Field(8192, ge=8, description="Max tokens of prompt + response (long CoTs need 8k-32k).")
    max_prompt_length: int = Field(4096, ge=1, description="Rows whose prompt is longer are dropped (counted).")
    truncation: Literal["drop", "truncate_response"] = Field(
        "drop", description="Rows over max_length: drop them, or cut the response to fit. Both are counted "
        "in data_report.json.")
    packing: bool = Field(False, description="Padding-free micro-batches: pack a micro-batch's sequences into one "
                          "row with restarting position ids (a pair's chosen and rejected together); the model keeps "
                          "the sequences apart by those position ids. Log-probs and losses equal the padded path.")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="With packing: cut each worker's rows of an optimizer step into micro-batches of at "
        "most this many tokens (a row longer than that goes alone); null = per_device_batch_size rows each. The "
        "step's rows and its loss are the same either way.")
    kernels: Literal["none", "liger", "compile"] = Field(
        "none", description="Fused kernels in the trained model's decoder: none; liger = Liger's Triton RMSNorm, "
        "SwiGLU and RoPE (needs CUDA and the gpu extra; the LM head stays on the chunked log-prob path); compile = "
        "torch.compile of each decoder layer's forward (CPU or GPU).")
    group_by_length: bool = Field(True, description="Build batches of similar length to waste less on padding.")
    length_group_window: int = Field(64, ge=1, description="Optimizer steps per window that is sorted by length "
                                     "(larger = less padding, less randomness).")
    seed: int = Field(42, description="Seed of data order, initialisation of LoRA and RNG streams.")
    checkpoint_every_steps: int = Field(100, ge=1, description="Save a sharded checkpoint every N optimizer steps "
                                        "(and always at the end).")
    keep_last_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on storage (older ones deleted).")
    max_failures: int = Field(2, ge=-1, description="Times Ray Train restarts a failed worker group (a worker "
                              "process or node died); each restart resumes from the latest checkpoint (-1 = no "
                              "limit, 0 = fail the run at the first worker failure). Not part of the config hash.")
    log_every_steps: int = Field(1, ge=1, description="Write metrics (metrics.jsonl, TensorBoard) every N optimizer "
                                 "steps.")
    logprob_chunk_size: int = Field(1024, ge=1, description="Tokens per chunk when projecting hidden states to "
                                    "vocab log-probs (bounds the [tokens, vocab] logits memory).")
    stop_after_steps: int | None = Field(None, ge=1, description="Stop (after checkpointing) once this many "
                                         "optimizer steps are done, without exporting. For tests and "
                                         "time-boxed jobs; a rerun resumes. Not part of the config hash.")

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if self.max_tokens_per_micro_batch is not None and not self.packing:
            raise ValueError("max_tokens_per_micro_batch sizes packed micro-batches: set packing: true")
        return self


class SFTConfig(_StageConfig):
    epochs: int = Field(3, ge=1, description="Passes over the SFT dataset (recipe: 3).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (recipe: 2e-5).")


class CogPOConfig(_StageConfig):
    epochs: int = Field(1, ge=1, description="Passes over the pairs (recipe: 1).")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (recipe: 1e-6).")
    loss: Literal["cogpo", "dpo", "ipo", "simpo"] = Field(
        "cogpo", description="Functional form of the preference loss (crv_ray/train/losses.py): cogpo = DPO's "
        "sigmoid loss with each pair's beta (beta column, else gap_betas, else default_beta); dpo = the same with "
        "default_beta for every pair (beta column and gaps ignored); ipo = IPO's squared loss on per-token "
        "log-ratios, each pair's beta as tau; simpo = reference-free SimPO on average log-probs with margin "
        "simpo_gamma, each pair's beta.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO target reward margin gamma (loss: simpo only).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Conservative-DPO label smoothing eps "
                                   "(cogpo, dpo, simpo; not ipo).")
    gap_betas: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_GAP_BETAS),
                                        description="Beta per gap type, used for rows without a beta column value.")
    default_beta: float = Field(0.5, gt=0, description="Beta for rows with neither a beta nor a known gap.")
    reference: Literal["precomputed", "online"] = Field(
        "precomputed", description="precomputed: before the first step the training workers score every pair with "
        "the starting model (the policy itself: same sharding and precision, so policy and reference agree exactly "
        "at step 1) and keep the scores beside the tokenized rows for a resume; pairs that carry "
        "ref_chosen_logp/ref_rejected_logp columns use those instead. One model in memory. online: run a frozen "
        "copy of the starting model beside the policy at every step.")

    @property
    def uses_reference(self) -> bool:
        """SimPO is reference-free: no reference log-probs are read or computed."""
        return self.loss != "simpo"

    @model_validator(mode="after")
    def _smoothing_applies(self):
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing does not apply to loss: ipo (set it to 0)")
        return self

    @field_validator("gap_betas")
    @classmethod
    def _positive_betas(cls, v: dict[str, float]) -> dict[str, float]:
        for gap, beta in v.items():
            if not beta > 0:
                raise ValueError(f"gap_betas[{gap!r}] must be > 0, got {beta}")
        return v


class TrainConfig(_Strict):
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning stage.")
    cogpo: CogPOConfig = Field(default_factory=CogPOConfig, description="CogPO preference stage.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers.")
    strategy: Literal["fsdp2", "deepspeed"] = Field(
        "fsdp2", description="How the workers shard the model: fsdp2 (torch fully_shard; the `fsdp` section) or "
        "deepspeed (ZeRO, the `deepspeed` section; needs the deepspeed extra). Losses, data, checkpoint cadence, "
        "resume and export are the same; a checkpoint resumes only under the strategy that wrote it.")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="FSDP2 sharding options; with strategy: "
                             "deepspeed only mixed_precision and the activation_checkpointing fields apply.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed options "
                                       "(strategy: deepspeed).")
    lora: LoRAConfig | None = Field(None, description="Train LoRA adapters (merged at export); null = full.")
    cogpo_variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Extra preference runs from the same SFT model and pairs, each `name: {cogpo fields to change}`, "
        "e.g. `dpo: {loss: dpo}` (default_beta for every pair) or `simpo: {loss: simpo, default_beta: 2.0, gap_betas: "
        "{small: 2.0, medium: 2.0, large: 2.0}}`. Trained "
        "after `cogpo` into <run_dir>/variants/<name>/ and evaluated beside it when eval.models names them.")
    tokenize_num_actors: int = Field(1, ge=1, description="Max Ray Data actors tokenizing the datasets.")
    tokenize_in_process_max_rows: int = Field(
        4096, ge=0, description="Datasets up to this many rows are tokenized in the driver process (a Ray Data "
        "actor pool costs ~10 s of start-up); larger ones by tokenize_num_actors Ray Data actors.")

    @field_validator("cogpo_variants")
    @classmethod
    def _variant_names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            if name in RESERVED_MODEL_NAMES or not _VARIANT_NAME_RE.match(name):
                raise ValueError(f"cogpo_variants: {name!r} cannot name a variant (letters, digits, '_', '-', '.'; "
                                 f"not one of {RESERVED_MODEL_NAMES})")
        return v

    @model_validator(mode="after")
    def _deepspeed_supports(self):
        if self.strategy == "deepspeed" and self.cogpo.reference == "online" and self.cogpo.uses_reference:
            raise ValueError("cogpo.reference: online is not supported with strategy: deepspeed (use precomputed)")
        return self

    @model_validator(mode="after")
    def _kernels_fit_the_device(self):
        for stage in ("sft", "cogpo"):
            if getattr(self, stage).kernels == "liger" and not self.scaling.use_gpu:
                raise ValueError(f"{stage}.kernels: liger runs Triton kernels, which need CUDA: set "
                                 "scaling.use_gpu: true, or kernels: compile / none on CPU")
        return self

    @model_validator(mode="after")
    def _variants_valid(self):
        for name, fields in self.cogpo_variants.items():
            try:
                CogPOConfig.model_validate({**self.cogpo.model_dump(mode="json"), **fields})
            except ValidationError as e:
                detail = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
                raise ValueError(f"cogpo_variants.{name}: {detail}") from None
        return self


RESERVED_MODEL_NAMES = ("base", "sft", "cogpo")
_VARIANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def variant_config(cfg: TrainConfig, name: str) -> TrainConfig:
    """The training config of one cogpo variant: the `cogpo` section with the variant's fields replaced."""
    if name not in cfg.cogpo_variants:
        raise ValueError(f"no cogpo variant {name!r} (defined: {sorted(cfg.cogpo_variants)})")
    cogpo = CogPOConfig.model_validate({**cfg.cogpo.model_dump(mode="json"), **cfg.cogpo_variants[name]})
    return cfg.model_copy(update={"cogpo": cogpo, "cogpo_variants": {}})


def stage_hash(cfg: TrainConfig, stage: str, **inputs: str) -> str:
    """Hash of what determines a stage's result: its config, the shared parts and the input paths.

    `stop_after_steps` and `max_failures` are left out: they say when a run stops or restarts, not what it
    computes, so a stopped or restarted run and its resumption share one run directory; so is `fsdp.load` (how
    the same starting weights are read).
    """
    stage_cfg = getattr(cfg, stage).model_dump(mode="json", exclude={"stop_after_steps", "max_failures"})
    payload = {
        "stage": stage, "stage_cfg": stage_cfg, "inputs": inputs,
        "scaling": cfg.scaling.model_dump(mode="json"), "fsdp": cfg.fsdp.model_dump(mode="json", exclude={"load"}),
        **({"strategy": cfg.strategy, "deepspeed": cfg.deepspeed.model_dump(mode="json")}
           if cfg.strategy != "fsdp2" else {}),
        "lora": None if cfg.lora is None else cfg.lora.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
