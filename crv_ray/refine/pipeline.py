"""The refine stage on Ray Data: ingest into shards, run the role stages (streaming or staged), commit per shard.

The glue is thin: `roles.build_stages` says what each stage does to a row, `dataflow.build_stages_dataset` makes
Ray Data operators of them, and this module runs those over the shards and commits results.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import pyarrow as pa

from crv_ray import storage
from crv_ray.config import RunConfig
from crv_ray.data.fingerprint import input_fingerprint
from crv_ray.data.input import InputError, check_bad_fraction, read_problems
from crv_ray.engines import EnginePools, engine_pool_key, pool_resources
from crv_ray.progress import Progress
from crv_ray.refine.guards import critic_fallback_stats, shorten
from crv_ray.refine.prompts import render_student_prompt
from crv_ray.refine.dataflow import build_stages_dataset, caller_cpus
from crv_ray.refine.roles import StageSpec, build_stages, check_original
from crv_ray.refine.state import empty_state, state_schema, to_table
from crv_ray.refine.store import RefineStore, write_parquet_atomic
from crv_ray.run_paths import shard_name
from crv_ray.storage import AnyPath

log = logging.getLogger("crv_ray.refine")


class RefineError(RuntimeError):
    pass


class RefineStalled(RefineError):
    pass


class CriticFallbackError(RefineError):
    """Too many critic replies held no label: the critic is cut off (a reasoning model inside <think> with a small
    max_tokens) or ignores the format. Going on would turn CRV into plain SFT."""


class CriticFallbackGuard:
    """Checks the critic fallback rate once, on the first shard that had critic calls (streaming: the first shard
    committed; staged: the first pending shard, right after the critic stages, before the costly rounds)."""

    def __init__(self, cfg: RunConfig):
        self.max_rate = cfg.roles.critic.max_fallback_rate
        self.max_tokens = cfg.roles.critic.sampling.max_tokens
        self.fallback_label = cfg.roles.critic.fallback_label
        self.done = False

    def __call__(self, shard: int, rows: list[dict]) -> bool:
        """rows: one working row per problem. True once the check has been made (and passed)."""
        if self.done:
            return True
        stats = critic_fallback_stats(rows)
        if stats.asked == 0:
            return False  # no critic call in this shard (all failed earlier or all originals wrong): judge the next
        self.done = True
        if stats.rate <= self.max_rate:
            return True
        shown = "\n".join(f"  - {shorten(r)!r}" for r in stats.replies)
        raise CriticFallbackError(
            f"critic fallback rate {stats.rate:.0%} ({stats.fallback} of {stats.asked} rows the critic judged in "
            f"shard {shard}) is above roles.critic.max_fallback_rate={self.max_rate:g}: no reply held a label "
            f"easy/medium/hard. Last replies of some of them:\n{shown}\n"
            f"A reasoning critic needs room to think: raise roles.critic.sampling.max_tokens (now {self.max_tokens}); "
            "use structured output (guided `choice`) on a vLLM engine; or check the critic prompt. To accept "
            f"fallbacks ({self.fallback_label!r} rows), raise roles.critic.max_fallback_rate. Nothing of this shard "
            "was committed."
        )


# ------------------------------------------------------------------ ingest
def ingest(cfg: RunConfig, store: RefineStore) -> dict:
    """Read the input once into fixed shards of working rows; rerun-safe (skipped when already done)."""
    state = store.read_state()
    if state is not None and state.get("ingested"):
        return state
    t0 = time.time()
    fingerprint = input_fingerprint(cfg.input)  # before reading: runner.check_input compares it on every rerun
    schema = state_schema(cfg.roles.verifier.max_rounds)
    shards: list[dict] = []
    buf: list[dict] = []

    def flush() -> None:
        shard = len(shards)
        for r in buf:
            r["shard"] = shard
        write_parquet_atomic(store.input_file(shard), to_table(buf, schema))
        # Rows the judge stage must see (input.on_no_answer=judge): without any, its pool is not started.
        no_answer = sum(1 for r in buf if r["error"] is None and r["orig_status"] == "no_answer")
        shards.append({"shard": shard, "rows": len(buf), "no_answer": no_answer})
        buf.clear()

    n_in = n_bad = 0
    first_reasons: list[str] = []
    for rec in read_problems(cfg.input):
        n_in += 1
        row = empty_state(cfg.roles.verifier.max_rounds)
        row.update({k: rec[k] for k in ("problem_id", "source", "problem", "answer", "answer_raw", "cot")})
        if rec["error"] is not None:
            n_bad += 1
            if len(first_reasons) < 5:
                first_reasons.append(rec["error"])
            row["error_stage"], row["error"] = "input", rec["error"]
        else:
            row["student_prompt"] = render_student_prompt(rec["problem"], cfg.refine.student_prompt)
            check_original(row, cfg)  # here, not in a Ray stage: whether a judge pool is needed depends on it
        buf.append(row)
        if len(buf) >= cfg.refine.shard_size:
            flush()
    if buf:
        flush()
    if n_in == 0:
        raise RefineError(f"the input has no rows ({cfg.input.source}: {cfg.input.path})")
    try:
        check_bad_fraction(n_in, n_bad, first_reasons, cfg.input)
    except InputError:
        storage.rmtree(store.work / "input")  # no state written: nothing counts as ingested
        raise
    state = {
        "config_hash": cfg.refine_hash(),
        "ingested": True,
        "input_fingerprint": fingerprint,
        "rows_in": n_in,
        "rows_quarantined_at_input": n_bad,
        "shards": shards,
        "ingest_s": round(time.time() - t0, 3),
    }
    store.write_state(state)
    return state


# ------------------------------------------------------------------ collecting per shard, with a watchdog
KEY_COLUMNS = ("shard", "problem_id", "sample_index", "sample_copies")


def spill_rows(batch: pa.Table, schema: pa.Schema, spill_dir: str) -> pa.Table:
    """The pipeline's last step, in a Ray worker: write the finished rows, one file per shard in the batch, under
    `spill_dir/shard-NNNNN/`, and return only their keys to the driver.

    Why: the driver reading result blocks maps object-store pages into its memory, and Ray Data returns rows out of
    order (at 20k problems the first shard completed among the last), so holding or mapping rows there grows with
    the input (306 MB of mapped object store at 50k rows). Keys are a few bytes a row."""
    batch = conform(batch, schema)
    shards = batch.column("shard").to_pylist()
    distinct = list(dict.fromkeys(shards))
    root = storage.as_path(spill_dir)
    for shard in distinct:
        part = batch if len(distinct) == 1 else batch.filter(pa.array([s == shard for s in shards]))
        write_parquet_atomic(root / shard_name(int(shard)) / f"{uuid.uuid4().hex}.parquet", part)
    return batch.select(list(KEY_COLUMNS))


class ShardCollector:
    """Counts finished rows per shard and problem (from `spill_rows`' keys); a shard is complete when all its
    problems have all copies, and is then read back from its spilled files (one shard's rows) for `on_complete`.

    A copy is counted once even if a retried task wrote it twice (reading keeps the first of each copy)."""

    def __init__(self, expected: dict[int, int], on_complete: Callable[[int, dict[str, list[dict]]], None],
                 spill_dir: AnyPath):
        self.expected = expected  # shard -> number of problems
        self.on_complete = on_complete
        self.spill_dir = spill_dir
        self.finished: dict[int, int] = defaultdict(int)  # shard -> problems with all their copies
        self._seen: dict[int, dict[str, int]] = defaultdict(dict)  # open shards: problem -> bitmask of copies seen
        for shard in expected:  # parts of a killed run: the shard runs again from its start
            storage.rmtree(self.spill_dir / shard_name(shard))

    def add_keys(self, keys: pa.Table) -> None:
        cols = [keys.column(c).to_pylist() for c in KEY_COLUMNS]
        for shard, pid, index, copies in zip(*cols):
            seen = self._seen[shard]
            bit = 1 << int(index or 0)
            mask = seen.get(pid, 0)
            if mask & bit:
                continue
            seen[pid] = mask = mask | bit
            if mask == (1 << int(copies or 1)) - 1:
                self.finished[shard] += 1
                if self.finished[shard] == self.expected[shard]:
                    self._complete(shard)

    def _complete(self, shard: int) -> None:
        del self._seen[shard]
        folder = self.spill_dir / shard_name(shard)
        by_problem: dict[str, list[dict]] = defaultdict(list)
        copies: set[tuple[str, int]] = set()
        for f in sorted(folder.glob("*.parquet")):
            for row in storage.read_table(f).to_pylist():
                key = (row["problem_id"], row["sample_index"])
                if key not in copies:
                    copies.add(key)
                    by_problem[row["problem_id"]].append(row)
        self.on_complete(shard, by_problem)
        storage.rmtree(folder)

    def incomplete(self) -> list[int]:
        return sorted(s for s in self.expected if self.finished.get(s, 0) < self.expected[s])


def conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """`batch` with exactly `schema`'s columns and types (Ray Data may drop all-null columns or infer null types)."""
    cols = [batch.column(f.name).cast(f.type) if f.name in batch.column_names else pa.nulls(batch.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def iterate_with_watchdog(batches: Iterable, timeout_s: float, what: str, first_timeout_s: float | None = None):
    """Yield from `batches`, raising RefineStalled if nothing arrives for `timeout_s` (ray.data.llm can hang silently).

    The first item may take `first_timeout_s`: a streaming pipeline yields nothing until every pool has started.
    """
    q: queue.Queue = queue.Queue(maxsize=4)
    done = object()
    stop = threading.Event()  # the consumer has gone (finished or raised, e.g. a failed fallback check)

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=1.0)
                return True
            except queue.Full:
                pass
        return False

    def pump() -> None:
        try:
            for b in batches:
                if not put(b):
                    break
            else:
                put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
        finally:
            close = getattr(batches, "close", None)
            if stop.is_set() and close is not None:
                close()  # ends Ray Data's execution, and its engine pools with it

    threading.Thread(target=pump, daemon=True, name="refine-pump").start()
    first = True
    try:
        while True:
            wait = first_timeout_s if first and first_timeout_s else timeout_s
            try:
                item = q.get(timeout=wait)
            except queue.Empty:
                knob = "refine.startup_timeout_s" if first and first_timeout_s else "refine.watchdog_s"
                raise RefineStalled(
                    f"{what}: no row finished for {wait:.0f} s ({knob}). A pool may be waiting for "
                    "resources it cannot get (see `ray status`), or an engine hung."
                ) from None
            first = False
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def stop_execution(ds) -> None:
    """End the Ray Data execution of `ds` now. After a stall the watchdog's pump thread is blocked inside Ray Data's
    iterator, which only ends its execution once a batch arrives (a running generator cannot be closed from another
    thread); its executor thread would otherwise go on scheduling, and die at `ray.shutdown`, in a library user's
    process. Ray Data has no public call for it: its executor is a thread named by the dataset's id."""
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor

        dataset_id = ds.get_dataset_id()
        for t in threading.enumerate():
            if isinstance(t, StreamingExecutor) and getattr(t, "_dataset_id", None) == dataset_id:
                t.shutdown(force=True)
    except Exception as e:  # noqa: BLE001 - best effort on a path that already raises
        log.debug("could not stop a Ray Data execution: %s", e)


def run_dataset(ds, collector: ShardCollector, cfg: RunConfig, what: str, schema: pa.Schema) -> None:
    # Whole blocks as Ray Data finishes them: a fixed batch size held finished rows back until more rows arrived,
    # so a done shard waited for other shards' slow rows (or a node that died holding them) before it committed.
    # Default task resources, so Ray Data fuses it into the last stage's tasks: a separate operator with its own
    # (smaller) CPU share starved behind tasks hung on a lost node (tests/multinode).
    ds = ds.map_batches(spill_rows, fn_kwargs={"schema": schema, "spill_dir": str(collector.spill_dir)},
                        batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    batches = iterate_with_watchdog(ds.iter_batches(batch_size=None, batch_format="pyarrow"),
                                    cfg.refine.watchdog_s, what, cfg.refine.startup_timeout_s)
    bar = Progress(what, sum(collector.expected.values()), unit="problems")
    try:
        with contextlib.closing(batches):  # a commit that raises stops the pipeline (its pools) too
            for keys in batches:
                collector.add_keys(keys)
                bar.update(sum(collector.finished.values()))
    except BaseException:
        stop_execution(ds)
        raise
    bar.close()
    missing = collector.incomplete()
    if missing:
        raise RefineError(f"{what}: shards {missing[:10]} ended incomplete (rows were lost in the pipeline)")


# ------------------------------------------------------------------ the two execution modes
def _read(files: list[AnyPath], schema: pa.Schema):
    """The shards' rows, one block (one task) per shard file. `ray.data.read_parquet` rolls small files into one
    read task, and every stage fused behind it would then run on one node of a multi-node cluster; per shard, the
    tasks spread over the nodes (Ray Data's default SPREAD strategy)."""
    import ray

    def read(batch: pa.Table) -> pa.Table:
        return pa.concat_tables([storage.read_table(f).cast(schema) for f in batch.column("file").to_pylist()])

    return ray.data.from_items([{"file": str(f)} for f in files], override_num_blocks=len(files)).map_batches(
        read, batch_size=1, batch_format="pyarrow")


def run_streaming(cfg: RunConfig, store: RefineStore, stages: list[StageSpec], shards: list[dict],
                  commit: Callable[[int, dict], None], pools: EnginePools) -> dict[str, float]:
    """Every pool up at once; the stages are light steps that call them, with no bubble between stages."""
    schema = state_schema(cfg.roles.verifier.max_rounds)
    pools.ensure(s.engine for s in stages if s.engine is not None)
    ds = build_stages_dataset(_read([store.input_file(s["shard"]) for s in shards], schema), cfg, stages, schema,
                              pools)
    collector = ShardCollector({s["shard"]: s["rows"] for s in shards}, commit, store.paths.refine_spill)
    run_dataset(ds, collector, cfg, "refine (streaming)", schema)
    return {}  # stages overlap in streaming mode: only the run's total wall time is meaningful


def run_staged(cfg: RunConfig, store: RefineStore, stages: list[StageSpec], shards: list[dict],
               commit: Callable[[int, dict], None], pools: EnginePools,
               critic_guard: Callable[[int, list[dict]], bool] | None = None) -> dict[str, float]:
    """One stage at a time over all pending shards; each stage's output lands on disk before the next starts.

    A pool loads before the first stage that needs it and unloads after its last one, so with the usual order
    (judge, critic, rethink/verify rounds, injection on the agent; then the student) one model is resident at a time
    and each loads once. `critic_guard(shard, rows)` sees the shards in order right after the last critic stage
    (it may raise)."""
    schema = state_schema(cfg.roles.verifier.max_rounds)
    prev = {s["shard"]: store.input_file(s["shard"]) for s in shards}
    walls: dict[str, float] = {}
    # Per pool, not per engine name: engines with identical settings share one pool, which unloads after the last
    # stage of any of them.
    engines = {s.engine for s in stages if s.engine is not None}
    last_use = {pools.key(s.engine) or s.engine: i for i, s in enumerate(stages) if s.engine is not None}
    for i, spec in enumerate(stages):
        t0 = time.time()
        stage_dir = f"{i:02d}-{spec.name}"
        todo = [s for s in shards if not store.stage_file(stage_dir, s["shard"]).exists()]
        if todo:
            if spec.engine is not None:
                pools.ensure([spec.engine])
            print(f"[refine] stage {i + 1}/{len(stages)} {spec.name}: {len(todo)} shard(s)", flush=True)

            def write(shard: int, by_problem: dict[str, list[dict]], _d: str = stage_dir) -> None:
                rows = [r for pid in sorted(by_problem) for r in by_problem[pid]]
                write_parquet_atomic(store.stage_file(_d, shard), to_table(rows, schema))

            ds = build_stages_dataset(_read([prev[s["shard"]] for s in todo], schema), cfg, [spec], schema, pools)
            run_dataset(ds, ShardCollector({s["shard"]: s["rows"] for s in todo}, write, store.paths.refine_spill),
                        cfg, f"refine stage {spec.name}", schema)
        prev = {s["shard"]: store.stage_file(stage_dir, s["shard"]) for s in shards}
        pools.release(name for name in engines if last_use[pools.key(name) or name] == i)
        walls[spec.name] = round(time.time() - t0, 3)
        if todo:
            print(f"[refine] stage {spec.name} done in {walls[spec.name]:.0f}s", flush=True)
        last_critic = spec.role == "critic" and (i + 1 == len(stages) or stages[i + 1].role != "critic")
        if critic_guard is not None and last_critic:
            for s in shards:
                if critic_guard(s["shard"], storage.read_table(prev[s["shard"]]).to_pylist()):
                    break
    # Commit from the last stage's files.
    for s in shards:
        by_problem: dict[str, list[dict]] = defaultdict(list)
        for row in storage.read_table(prev[s["shard"]]).to_pylist():
            by_problem[row["problem_id"]].append(row)
        commit(s["shard"], by_problem)
    return walls


# ------------------------------------------------------------------ resources
def _resident(cfg: RunConfig, stages: list[StageSpec]) -> list[tuple[str, dict[str, float]]]:
    """(what runs, resources held) at each point of the run: streaming holds every pool at once; staged holds, per
    stage, the pools whose first..last use spans it (each pool counted once, however many engines name it)."""
    used = [(i, s) for i, s in enumerate(stages) if s.engine is not None]
    if not used:
        return []

    def total(engines: set[str], callers: list[str]) -> dict[str, float]:
        seen: dict[str, dict[str, float]] = {}
        for name in engines:
            seen[engine_pool_key(cfg, name) or f"-{name}"] = pool_resources(cfg, name)
        out = {"CPU": caller_cpus(cfg, callers), "GPU": 0.0}
        for r in seen.values():
            out["CPU"] += r["CPU"]
            out["GPU"] += r["GPU"]
        return out

    if cfg.refine.mode == "streaming":
        return [("all role pools together (refine.mode=streaming)",
                 total({s.engine for _, s in used}, [s.engine for _, s in used]))]
    first = {}
    for i, s in used:
        first.setdefault(s.engine, i)
    last = {s.engine: i for i, s in used}
    return [(f"the largest single stage ({s.name}, refine.mode=staged)",
             total({e for e in first if first[e] <= i <= last[e]}, [s.engine])) for i, s in used]


def check_resources(cfg: RunConfig, stages: list[StageSpec]) -> dict:
    """Fail before starting when the pools cannot fit (they would otherwise wait for resources forever); on a
    cluster with an autoscaler, ask it for the largest point of the run and wait (`crv_ray.cluster_resources`)."""
    from crv_ray.cluster_resources import ensure

    points = _resident(cfg, stages)
    need = {k: max((r[k] for _, r in points), default=0.0) for k in ("CPU", "GPU")}
    # The first point where the most is held names what needs it.
    what = {k: next(w for w, r in points if r[k] == need[k]) for k in need if need[k] > 0}
    hint = ("use refine.mode=staged, fewer replicas, or a bigger cluster" if cfg.refine.mode == "streaming"
            else "use fewer replicas or tensor_parallel_size, or a bigger cluster")
    ensure(need, subject="the engine pools", what=what, timeout_s=cfg.ray.autoscale_timeout_s, hint=hint, error=RefineError)
    return need


def required_local_cpus(cfg: RunConfig) -> int:
    need = max((r["CPU"] for _, r in _resident(cfg, build_stages(cfg))), default=0.0)
    return int(need + 0.999) + 2  # + driver-side map tasks
