"""The Ray Data side of a vLLM engine pool: a light stage that sends a batch of chat requests to the pool and adds
the reply columns. Rows that need no call (SKIP) never reach the engine."""

from __future__ import annotations

import json
from collections.abc import Callable

import pyarrow as pa
import ray

from crv_ray.config import Sampling, VLLMEngineConfig
from crv_ray.engines import CALLER_CPUS
from crv_ray.engines.columns import MESSAGES, OUT_ERROR, OUT_PROMPT_TOKENS, OUT_REPLY, OUT_TOKENS, SEED, SKIP
from crv_ray.engines.vllm_pool import PoolClient, sampling_dict, uses_gpu


def pool_sampling(cfg: VLLMEngineConfig, sampling: Sampling, structured: dict | None) -> tuple[dict, bool]:
    """(vLLM sampling parameters shared by a stage's requests, whether rows carry their own seed)."""
    seeded = uses_gpu(cfg)
    return sampling_dict(sampling, structured if cfg.structured_output else None, seeded=seeded), seeded


def pool_requests(messages: list, skips: list, seeds: list, keys: list, base: dict,
                  seeded: bool) -> tuple[list[int], list[dict], list[str]]:
    """(indices of the rows that need a call, their requests, their routing keys) from the request columns."""
    todo = [i for i, s in enumerate(skips) if not s]
    requests = []
    for i in todo:
        params = dict(base)
        if seeded and seeds[i] is not None:
            params["seed"] = int(seeds[i])
        requests.append({"messages": json.loads(messages[i]), "sampling": params})
    return todo, requests, [str(keys[i]) for i in todo]


REPLY_TYPES = {OUT_REPLY: pa.string(), OUT_TOKENS: pa.int64(), OUT_PROMPT_TOKENS: pa.int64(), OUT_ERROR: pa.string()}


def reply_columns(n: int, todo: list[int], replies: list[dict]) -> dict[str, list]:
    """The reply columns for n rows, from the replies to rows `todo` (the others needed no call)."""
    cols: dict[str, list] = {OUT_REPLY: [None] * n, OUT_TOKENS: [0] * n, OUT_PROMPT_TOKENS: [0] * n,
                             OUT_ERROR: [None] * n}
    for i, rep in zip(todo, replies):
        cols[OUT_REPLY][i], cols[OUT_TOKENS][i] = rep["text"], rep["completion_tokens"]
        cols[OUT_PROMPT_TOKENS][i], cols[OUT_ERROR][i] = rep["prompt_tokens"], rep["error"]
    return cols


class PoolStage:
    """Ray Data callable class (async: several batches in flight per actor, all waiting on the engine)."""

    def __init__(self, client: PoolClient, base: dict, seeded: bool, keep: list[str], key_column: str):
        self.client, self.base, self.seeded, self.keep, self.key = client, base, seeded, keep, key_column

    async def __call__(self, batch: pa.Table):
        seeds = batch.column(SEED).to_pylist() if SEED in batch.column_names else [None] * batch.num_rows
        todo, requests, keys = pool_requests(batch.column(MESSAGES).to_pylist(), batch.column(SKIP).to_pylist(),
                                             seeds, batch.column(self.key).to_pylist(), self.base, self.seeded)
        replies = await self.client.agenerate(requests, keys) if todo else []
        out = batch.select([c for c in self.keep if c in batch.column_names])
        for name, values in reply_columns(batch.num_rows, todo, replies).items():
            out = out.append_column(name, pa.array(values, REPLY_TYPES[name]))
        yield out


def build_vllm_transform(cfg: VLLMEngineConfig, client: PoolClient, sampling: Sampling, structured: dict | None,
                         keep: list[str], key_column: str) -> Callable:
    import ray.data

    base, seeded = pool_sampling(cfg, sampling, structured)
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


class ModelPool:
    """One vLLM pool that serves models one after another (eval's base, SFT and CogPO models), for a model that no
    `engines:` entry names. `load(path)` swaps the next model's weights into the running engines when
    `weight_swap.swap_blocker` finds nothing against it (seconds instead of a new engine), else closes the pool and
    loads a new one. Nothing starts before the first `load`. `stats()`: the LoadLog's loads and reloads.

    Calls must not be in flight across a `load` (eval's passes are over by then; the engine would finish them on the
    old weights first anyway)."""

    def __init__(self, name: str, cfg: VLLMEngineConfig, startup_timeout_s: float, key_column: str = "problem_id"):
        self.name, self.cfg, self.startup_timeout_s, self.key_column = name, cfg, startup_timeout_s, key_column
        self.pool = None  # the open VLLMPool
        self.opened = 0  # pools opened so far: each gets its own name, so a LoadLog count is one pool's loads
        self._log: tuple | None = None  # (name, handle) of the LoadLog, kept across pools
        self._stats = {"loads": [], "reloads": []}

    def __enter__(self) -> ModelPool:
        return self

    def load(self, model_path: str, label: str = "") -> Callable[[Sampling, dict | None, list[str]], Callable]:
        """Serve `model_path`; returns `make(sampling, structured, keep) -> transform` (every transform made shares
        the loaded engines)."""
        from crv_ray.engines.vllm_pool import VLLMPool, new_load_log
        from crv_ray.engines.weight_swap import swap_blocker

        what = f"{label} ({model_path})" if label else model_path
        if self.pool is not None:
            # A hub id or a model on object storage is no local folder: a new pool (the actors fetch it).
            blocker = swap_blocker(self.pool.model_path, model_path)
            if blocker is None:
                secs = self.pool.reload(model_path, self.startup_timeout_s)
                print(f"[engines] pool {self.pool.name}: weights of {what} reloaded in {secs:.1f}s", flush=True)
                return self._make()
            print(f"[engines] pool {self.pool.name}: {what} needs a new engine ({blocker})", flush=True)
            self.close()
        if self._log is None:
            self._log = new_load_log()
        self.opened += 1
        name = self.name if self.opened == 1 else f"{self.name}-{self.opened}"
        self.pool = VLLMPool(name, self.cfg, model_path, self._log[0])
        self.pool.start()
        secs = self.pool.wait_ready(self.startup_timeout_s)
        print(f"[engines] pool {name}: {self.cfg.replicas} replica(s) of {what} loaded in {secs:.0f}s", flush=True)
        return self._make()

    def _make(self) -> Callable[[Sampling, dict | None, list[str]], Callable]:
        client = self.pool.client()  # type: ignore[union-attr]
        return lambda sampling, structured, keep: build_vllm_transform(self.cfg, client, sampling, structured, keep,
                                                                      self.key_column)

    def close(self) -> None:
        """Stop the engines (a later `load` opens a new pool)."""
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        self.stats()

    def __exit__(self, *exc) -> None:
        self.close()
        if self._log is not None:
            ray.kill(self._log[1])
            self._log = None

    def stats(self) -> dict[str, list[dict]]:
        """{"loads": [...], "reloads": [...]} as the LoadLog recorded them (one entry per replica), also after
        the pool closed."""
        if self._log is not None:
            self._stats = {"loads": ray.get(self._log[1].all.remote()),
                           "reloads": ray.get(self._log[1].all_reloads.remote())}
        return self._stats
