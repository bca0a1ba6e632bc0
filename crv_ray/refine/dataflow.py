"""How the refine stages become Ray Data operators.

A stage's own work is row steps (one working row in, the rows it becomes out): the apply of one stage, the fanout
and prepare of the next. Between them sit the engine calls. Two shapes:

- Every engine a vLLM pool: one operator, `BlockRunner`, takes a block through every stage in one async actor. Row
  steps run in its worker thread, engine calls are awaited on the pools' actors, and many blocks are in flight at
  once. Between stages a block crosses no operator: no object-store hop, no Ray task per stage and block. On a
  2-core machine those hops (the driver's scheduling, the raylet's task and object traffic) took the model worker's
  core; the rows and calls are the same either way.
- Otherwise (OpenAI-compatible endpoints, scripted doubles, whose transforms are Ray Data operators of their own):
  a chain, the row steps between two engine calls as one fused Ray Data task per block, and each engine call its
  engine's transform.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from crv_ray.config import RunConfig, VLLMEngineConfig
from crv_ray.engines import CALLER_CPUS, EnginePools, build_engine_transform, caller_resources
from crv_ray.engines.columns import (MESSAGES, OUT_ERROR, OUT_PROMPT_TOKENS, OUT_REPLY, OUT_TOKENS, SEED, SKIP,
                                     request_schema)
from crv_ray.refine.roles import Reply, StageSpec

# A row step: one working row in, the rows it becomes out (one, or several for a fanout).
RowStep = Callable[[dict], list[dict]]


def _prepare_step(spec: StageSpec) -> RowStep:
    per_sample_seed = spec.extra.get("per_sample_seed", False)
    base_seed = (spec.sampling.seed or 0) if spec.sampling else 0

    def prepare(row: dict) -> list[dict]:
        msgs = spec.prepare(row) if spec.prepare else None
        row[MESSAGES] = json.dumps(msgs) if msgs is not None else None
        row[SKIP] = msgs is None
        row[SEED] = base_seed + int(row.get("sample_index") or 0) if per_sample_seed else None
        return [row]

    return prepare


def _apply_step(spec: StageSpec) -> RowStep:
    def apply(row: dict) -> list[dict]:
        skipped = bool(row.get(SKIP, True))
        if spec.apply is not None and (not skipped or spec.apply_on_skip):
            reply = Reply(text=row.get(OUT_REPLY), prompt_tokens=row.get(OUT_PROMPT_TOKENS) or 0,
                          completion_tokens=row.get(OUT_TOKENS) or 0, error=row.get(OUT_ERROR), skipped=skipped)
            row = spec.apply(row, reply)
        return [row]

    return apply


def _skipped_step(spec: StageSpec) -> RowStep:
    return lambda row: [spec.apply(row, Reply(text=None, skipped=True))]


def _callable_step(obj: Callable[[dict], dict]) -> RowStep:
    return lambda row: [obj(row)]


def _run_steps(rows: list[dict], steps: list[RowStep]) -> list[dict]:
    for step in steps:
        rows = [out for row in rows for out in step(row)]
    return rows


def run_row_steps(batch: pa.Table, steps: list[RowStep], schema: pa.Schema) -> pa.Table:
    """The Ray Data task between two engine calls: every row step in order on a whole block, one Arrow -> Python ->
    Arrow conversion for all of them. The explicit schema keeps column types fixed (Ray Data's row `map` infers
    them per block: an int column with nulls became floats, which vLLM rejects as a seed)."""
    return pa.Table.from_pylist(_run_steps(batch.to_pylist(), steps), schema=schema)


class RowStepsActor:
    """`run_row_steps` in an actor, for a step that builds something costly once (OriginalCheck's tokenizers)."""

    def __init__(self, cls: type, cfg: RunConfig, schema: pa.Schema):
        self.steps, self.schema = [_callable_step(cls(cfg))], schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        return run_row_steps(batch, self.steps, self.schema)


class BlockRunner:
    """Ray Data callable class: every stage on one block. Engine calls go to the vLLM pools' actors (`PoolClient`,
    which also isolates poison rows); the row steps run in one worker thread, so answer checks waiting on their
    math-verify process do not hold up the event loop that sends and receives the other blocks' calls."""

    def __init__(self, cfg: RunConfig, stages: list[StageSpec], schema: pa.Schema, clients: dict, key_column: str):
        from crv_ray.engines.vllm_engine import pool_sampling

        self.schema, self.key = schema, key_column
        # (row steps, then a call: client, sampling base, seeded), ..., then the last row steps.
        self.calls: list[tuple[list[RowStep], object, dict, bool]] = []
        steps: list[RowStep] = []
        for spec in stages:
            if spec.fanout is not None:
                steps.append(spec.fanout)
            if spec.engine is None:
                steps.append(_callable_step(spec.extra["callable_class"](cfg)) if "callable_class" in spec.extra
                             else _skipped_step(spec))
                continue
            steps.append(_prepare_step(spec))
            base, seeded = pool_sampling(cfg.engines[spec.engine], spec.sampling, spec.structured)
            self.calls.append((steps, clients[spec.engine], base, seeded))
            steps = [_apply_step(spec)]
        self.tail = steps
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="row-steps")

    async def __call__(self, batch: pa.Table):
        from crv_ray.engines.vllm_engine import pool_requests, reply_columns

        loop = asyncio.get_running_loop()
        rows = batch.to_pylist()
        for steps, client, base, seeded in self.calls:
            rows = await loop.run_in_executor(self.pool, _run_steps, rows, steps)
            todo, requests, keys = pool_requests([r.get(MESSAGES) for r in rows], [r.get(SKIP, True) for r in rows],
                                                 [r.get(SEED) for r in rows], [r.get(self.key) for r in rows],
                                                 base, seeded)
            replies = await client.agenerate(requests, keys) if todo else []
            for name, values in reply_columns(len(rows), todo, replies).items():
                for row, value in zip(rows, values):
                    row[name] = value
        rows = await loop.run_in_executor(self.pool, _run_steps, rows, self.tail)
        yield pa.Table.from_pylist(rows, schema=self.schema)


def runs_as_block_runner(cfg: RunConfig, engines: set[str]) -> bool:
    """Whether stages calling `engines` run as one `BlockRunner` operator (every engine a vLLM pool)."""
    return bool(engines) and all(isinstance(cfg.engines[e], VLLMEngineConfig) for e in engines)


def block_runners(cfg: RunConfig, engines: set[str]) -> int:
    """One runner per replica of the largest pool, so the row steps (answer checks) grow with the engines."""
    return max(cfg.engines[e].replicas for e in engines)


def caller_cpus(cfg: RunConfig, stage_engines: list[str]) -> float:
    """Logical CPUs the callers of stages calling `stage_engines` (one entry per stage) hold: the block runners, or
    each stage's callers in a chain."""
    engines = set(stage_engines)
    if runs_as_block_runner(cfg, engines):
        return CALLER_CPUS * block_runners(cfg, engines)
    return sum(caller_resources(cfg, e)["CPU"] for e in stage_engines)


def build_stages_dataset(ds, cfg: RunConfig, stages: list[StageSpec], schema: pa.Schema,
                         pools: EnginePools | None = None, key_column: str = "problem_id"):
    """Chain the stages on `ds`: one `BlockRunner` operator when every engine they call is a vLLM pool, else
    `_chain`."""
    engines = {s.engine for s in stages if s.engine is not None}
    if pools is None or not runs_as_block_runner(cfg, engines):
        return _chain(ds, cfg, stages, schema, pools)
    import ray.data

    clients = {e: pools.client(e) for e in engines}
    engine_cfgs = [cfg.engines[e] for e in engines]
    runners = block_runners(cfg, engines)
    # Each runner keeps as many blocks in flight as a chain's callers would keep waiting on a replica.
    inflight = max(c.max_inflight_batches for c in engine_cfgs) * sum(1 for s in stages if s.engine is not None)
    return ds.map_batches(
        BlockRunner, fn_constructor_args=(cfg, stages, schema, clients, key_column),
        batch_size=min(c.batch_size for c in engine_cfgs), batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=runners, max_tasks_in_flight_per_actor=inflight,
                                           max_concurrent_calls_per_actor=inflight),
        num_cpus=CALLER_CPUS)


def _chain(ds, cfg: RunConfig, stages: list[StageSpec], schema: pa.Schema, pools: EnginePools | None):
    """The stages as a chain of operators: the row steps between two engine calls as one fused Ray Data task per
    block, each engine call its engine's transform."""
    call_schema = request_schema(schema)
    steps: list[RowStep] = []

    def flush(ds, out_schema: pa.Schema):
        if steps:
            ds = ds.map_batches(run_row_steps, fn_kwargs={"steps": list(steps), "schema": out_schema},
                                batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
            steps.clear()
        return ds

    for spec in stages:
        if spec.fanout is not None:
            steps.append(spec.fanout)
        if spec.engine is None:
            if "callable_class" in spec.extra:
                import ray.data

                ds = flush(ds, schema).map_batches(
                    RowStepsActor, fn_constructor_args=(spec.extra["callable_class"], cfg, schema),
                    batch_format="pyarrow", batch_size=None, compute=ray.data.ActorPoolStrategy(size=1))
            else:
                steps.append(_skipped_step(spec))
            continue
        steps.append(_prepare_step(spec))
        ds = flush(ds, call_schema)
        ds = build_engine_transform(cfg, spec.engine, spec.sampling, spec.structured, schema.names + [SKIP],
                                    caller=spec.name, pools=pools)(ds)
        steps.append(_apply_step(spec))
    return flush(ds, schema)
