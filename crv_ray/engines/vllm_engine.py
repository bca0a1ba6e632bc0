"""The Ray Data side of a vLLM engine pool: a light stage that sends a batch of chat requests to the pool and adds
the reply columns. Rows that need no call (SKIP) never reach the engine."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

import pyarrow as pa
import ray

from crv_ray.config import Sampling, VLLMEngineConfig
from crv_ray.engines import CALLER_CPUS
from crv_ray.engines.columns import MESSAGES, OUT_ERROR, OUT_PROMPT_TOKENS, OUT_REPLY, OUT_TOKENS, SEED, SKIP
from crv_ray.engines.vllm_pool import PoolClient, sampling_dict, uses_gpu


class PoolStage:
    """Ray Data callable class (async: several batches in flight per actor, all waiting on the engine)."""

    def __init__(self, client: PoolClient, base: dict, seeded: bool, keep: list[str], key_column: str):
        self.client, self.base, self.seeded, self.keep, self.key = client, base, seeded, keep, key_column

    async def __call__(self, batch: pa.Table):
        skip = batch.column(SKIP).to_pylist()
        todo = [i for i, s in enumerate(skip) if not s]
        messages = batch.column(MESSAGES).to_pylist()
        seeds = batch.column(SEED).to_pylist() if SEED in batch.column_names else [None] * batch.num_rows
        keys = batch.column(self.key).to_pylist()
        requests = []
        for i in todo:
            params = dict(self.base)
            if self.seeded and seeds[i] is not None:
                params["seed"] = int(seeds[i])
            requests.append({"messages": json.loads(messages[i]), "sampling": params})
        replies = await self.client.agenerate(requests, [str(keys[i]) for i in todo]) if todo else []
        text: list = [None] * batch.num_rows
        out_tok, in_tok, err = [0] * batch.num_rows, [0] * batch.num_rows, [None] * batch.num_rows
        for i, rep in zip(todo, replies):
            text[i], out_tok[i], in_tok[i], err[i] = (rep["text"], rep["completion_tokens"], rep["prompt_tokens"],
                                                      rep["error"])
        out = batch.select([c for c in self.keep if c in batch.column_names])
        for name, values, typ in ((OUT_REPLY, text, pa.string()), (OUT_TOKENS, out_tok, pa.int64()),
                                  (OUT_PROMPT_TOKENS, in_tok, pa.int64()), (OUT_ERROR, err, pa.string())):
            out = out.append_column(name, pa.array(values, typ))
        yield out


def build_vllm_transform(cfg: VLLMEngineConfig, client: PoolClient, sampling: Sampling, structured: dict | None,
                         keep: list[str], key_column: str) -> Callable:
    import ray.data

    seeded = uses_gpu(cfg)
    base = sampling_dict(sampling, structured if cfg.structured_output else None, seeded=seeded)
    inflight = cfg.max_inflight_batches * cfg.replicas

    def transform(ds):
        return ds.map_batches(
            PoolStage, fn_constructor_kwargs={"client": client, "base": base, "seeded": seeded, "keep": keep,
                                              "key_column": key_column},
            batch_size=cfg.batch_size, batch_format="pyarrow",
            # One async actor keeps `inflight` batches waiting on the pool at once (no process per batch).
            compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=inflight,
                                               max_concurrent_calls_per_actor=inflight),
            num_cpus=CALLER_CPUS)

    return transform


@contextlib.contextmanager
def open_vllm(name: str, cfg: VLLMEngineConfig, model_path: str, startup_timeout_s: float,
              key_column: str = "problem_id") -> Iterator[Callable[[Sampling, dict | None, list[str]], Callable]]:
    """Load one pool for `model_path` (a model that no `engines:` entry names, e.g. a trained student under eval)
    and yield `make(sampling, structured, keep) -> transform`; every transform made shares the one load."""
    from crv_ray.engines.vllm_pool import VLLMPool, new_load_log

    log_name, load_log = new_load_log()
    pool = VLLMPool(name, cfg, model_path, log_name)
    pool.start()
    try:
        secs = pool.wait_ready(startup_timeout_s)
        print(f"[engines] pool {name}: {cfg.replicas} replica(s) of {model_path} loaded in {secs:.0f}s", flush=True)
        client = pool.client()
        yield lambda sampling, structured, keep: build_vllm_transform(cfg, client, sampling, structured, keep,
                                                                      key_column)
    finally:
        pool.stop()
        ray.kill(load_log)
