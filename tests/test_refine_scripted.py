"""The refine stage's role logic through the real Ray Data stages, with a scripted reply double.

Tags in each problem steer the double (crv_ray.testing.tagged_replies): forced labels, a critic that never
parses, a verifier that fails round 1 and passes round 2, a student that answers right.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crv_ray.config import load_config_dict
from crv_ray.refine.runner import run_refine

ROOT = Path(__file__).resolve().parents[1]

COT_OK = "We add 2 and 3.\n\nThat gives 2 + 3 = 5.\n\nThe final answer is \\boxed{5}."
COT_BAD = "We add 2 and 3.\n\nThat gives 2 + 3 = 6.\n\nThe final answer is \\boxed{6}."
CASES = {
    "easy": ("[label=easy] What is 2+3?", COT_OK),
    "medium": ("[label=medium] What is 2+3?", COT_OK),
    "hard_fail1": ("[label=hard][verify=fail1] What is 2+3?", COT_OK),
    "hard_never": ("[label=hard][verify=never] What is 2+3?", COT_OK),
    "garbage": ("[critic=garbage] What is 2+3?", COT_OK),
    "garbage_once": ("[critic=garbage_once][label=easy] What is 2+3?", COT_OK),
    "wrong_orig": ("[label=medium] What is 2+3 really?", COT_BAD),
    "student_right": ("[label=medium][student=right] What is 2+3?", COT_OK),
}


def write_cases(path: Path, bad_lines: bool = False) -> None:
    lines = [json.dumps({"id": k, "problem": p, "answer": "5", "cot": c}) for k, (p, c) in CASES.items()]
    if bad_lines:
        lines += ['{"id": "broken", "problem": ', json.dumps({"id": "noans", "problem": "x", "cot": "y"})]
    path.write_text("\n".join(lines) + "\n")


def make_cfg(tmp_path: Path, mode: str = "streaming", **over) -> object:
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        write_cases(inp, bad_lines=True)
    raw = {
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "file", "path": str(inp), "columns": {"id": "id"}},
        "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"},
                    "student": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}},
        # The labelled fallback (not the default error row) stays under test here; 1 garbage row in a shard of 3.
        "roles": {"critic": {"max_parse_retries": 1, "fallback_label": "medium", "max_fallback_rate": 0.5},
                  "verifier": {"max_rounds": 2}},
        "negatives": {"student": {"k": 2}},
        "refine": {"mode": mode, "shard_size": 3, "watchdog_s": 120},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return load_config_dict(raw)


def read(run_dir: Path, name: str) -> list[dict]:
    return pq.read_table(run_dir / "refine" / name).to_pylist()


def comparable(run_dir: Path, name: str) -> list[dict]:
    """Rows sorted, without the input's absolute path (each test has its own tmp dir)."""
    rows = [{k: v for k, v in r.items() if k != "reason"} for r in read(run_dir, name)]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


@pytest.fixture(scope="module")
def streaming_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    cfg = make_cfg(tmp)
    res = run_refine(cfg)
    return cfg, res


def test_role_logic(streaming_run):
    cfg, res = streaming_run
    trace = {r["problem_id"]: r for r in read(cfg.run_dir, "trace")}
    assert trace["easy"]["label"] == "easy" and trace["easy"]["aligned_source"] == "refined"
    assert "Let me check this intermediate step" in trace["easy"]["aligned_cot"]
    assert trace["medium"]["aligned_source"] == "original" and trace["medium"]["rounds"] == []
    hf = trace["hard_fail1"]
    assert [r["passed"] for r in hf["rounds"]] == [False, True] and hf["rounds_used"] == 2
    assert hf["rounds"][0]["reason"] == "step 2 skips the subtraction."
    assert hf["aligned_source"] == "refined"
    hn = trace["hard_never"]
    assert [r["passed"] for r in hn["rounds"]] == [False, False] and hn["aligned_cot"] is None
    assert trace["garbage"]["label_source"] == "fallback" and trace["garbage"]["critic_attempts"] == 2
    assert trace["garbage"]["label"] == "medium"
    go = trace["garbage_once"]
    assert go["critic_attempts"] == 2 and go["label"] == "easy" and go["label_source"] == "critic"
    wo = trace["wrong_orig"]
    assert wo["orig_correct"] is False and wo["rounds"][0]["mode"] == "repair"
    assert wo["aligned_source"] == "refined" and wo["negative_source"] == "wrong_original"
    assert trace["student_right"]["negative_source"] == "injected"
    assert trace["easy"]["negative_source"] == "student_sample"
    assert len(trace["easy"]["student_samples"]) == 2


def test_pairs_follow_the_gap_table(streaming_run):
    cfg, _ = streaming_run
    gaps = {}
    for p in read(cfg.run_dir, "pairs"):
        gaps.setdefault(p["problem_id"], set()).add(p["gap"])
        assert "beta" not in p  # resolved from the gap at train time
        assert p["chosen"] != p["rejected"]
    assert gaps["easy"] == {"small", "medium", "large"}
    assert gaps["medium"] == {"medium"}  # aligned == original, so "large" would repeat "medium"
    assert gaps["hard_never"] == {"medium"}  # no aligned CoT
    assert gaps["wrong_orig"] == {"large"}  # a wrong original is never chosen
    sft = {r["problem_id"]: r for r in read(cfg.run_dir, "sft")}
    assert set(sft) == {"easy", "medium", "hard_fail1", "garbage", "garbage_once", "wrong_orig", "student_right"}
    for r in sft.values():
        assert r["prompt"].startswith(CASES[r["problem_id"]][0]) and r["prompt"].endswith("\\boxed{}.")
        assert "\\boxed" in r["response"]


def test_counts_reconcile_and_errors_have_reasons(streaming_run):
    cfg, res = streaming_run
    m = json.loads((Path(cfg.run_dir) / "refine" / "manifest.json").read_text())
    rec = m["reconciliation"]
    assert rec["rows_in"] == 10 and rec["trace_rows"] == 10 and rec["balanced"] and rec["complete"]
    assert rec["trace_error"] == 2 and rec["errors_rows"] == 2
    errors = read(cfg.run_dir, "errors")
    assert sorted(e["stage"] for e in errors) == ["input", "input"]
    assert any("malformed JSON" in e["reason"] and "line 9" in e["reason"] for e in errors)
    assert any("missing field 'answer'" in e["reason"] for e in errors)
    assert m["critic_labels"] == {"easy": 2, "hard": 2, "medium": 3}  # the wrong original is not judged
    assert m["stages"]["rethink_verify"][0]["rethought"] == 5  # easy x2, hard x2, one repair
    assert m["stages"]["rethink_verify"][1] == {"round": 2, "rethought": 2, "passed": 1, "pass_rate": 0.5}
    assert m["stages"]["critic"]["fallback_labels"] == 1
    assert m["packages"]["ray"] and len(m["config_hash"]) == 16


def test_staged_equals_streaming(streaming_run, ray_local, tmp_path):
    cfg_s, _ = streaming_run
    cfg = make_cfg(tmp_path, mode="staged")
    run_refine(cfg)
    for name in ("sft", "pairs", "errors"):
        assert comparable(cfg_s.run_dir, name) == comparable(cfg.run_dir, name), name
    stage_dirs = sorted(p.name for p in (Path(cfg.run_dir) / "refine" / "_work" / "stages").iterdir())
    assert stage_dirs[:3] == ["00-check_original", "01-critic_a0", "02-critic_a1"]


def test_partial_run_then_resume_equals_full(streaming_run, ray_local, tmp_path):
    cfg_full, _ = streaming_run
    cfg = make_cfg(tmp_path, refine={"max_shards_per_run": 2})
    first = run_refine(cfg)
    assert first.shards_run == 2 and not first.manifest["reconciliation"]["complete"]
    cfg2 = make_cfg(tmp_path)
    second = run_refine(cfg2)
    assert second.shards_skipped == 2 and second.shards_run == 2
    for name in ("trace", "sft", "pairs"):
        got = read(cfg.run_dir, name)
        ids = [r.get("pair_id") or r["problem_id"] for r in got]
        assert len(ids) == len(set(ids)), f"duplicates in {name}"
        want = read(cfg_full.run_dir, name)
        assert len(got) == len(want)
    third = run_refine(cfg2)
    assert third.shards_run == 0


def test_changed_config_refuses_to_mix(streaming_run, ray_local, tmp_path):
    from crv_ray.refine.runner import ConfigChanged

    run_refine(make_cfg(tmp_path, refine={"max_shards_per_run": 1}))
    with pytest.raises(ConfigChanged, match="different config"):
        run_refine(make_cfg(tmp_path, pairs={"gaps": ["large"]}))
    res = run_refine(make_cfg(tmp_path, pairs={"gaps": ["large"]}, refine={"on_config_change": "restart"}))
    assert res.shards_skipped == 0
    assert {p["gap"] for p in read(Path(tmp_path / "run"), "pairs")} == {"large"}


def test_killed_run_resumes_without_loss_or_duplicates(streaming_run, tmp_path):
    """SIGKILL a real `crv-ray refine` process after its first committed shard, rerun, compare."""
    cfg_full, _ = streaming_run
    cfg = make_cfg(tmp_path, mode="staged")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "crv_ray.cli", "refine", str(yaml_path), "--set", "ray.num_cpus=4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    stage_dir = Path(cfg.run_dir) / "refine" / "_work" / "stages"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if stage_dir.exists() and any(stage_dir.glob("03-*/*.parquet")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (Path(cfg.run_dir) / "refine" / "manifest.json").exists()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("sft", "pairs", "errors"):
        assert comparable(cfg_full.run_dir, name) == comparable(cfg.run_dir, name), name


def test_watchdog_turns_a_hang_into_an_error(ray_local, tmp_path):
    from crv_ray.refine.pipeline import RefineStalled

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "h", "problem": "[hang=20] What is 2+3?", "answer": "5", "cot": COT_OK}) + "\n")
    cfg = make_cfg(tmp_path, refine={"watchdog_s": 2, "startup_timeout_s": 4})
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    def executors() -> set[str]:
        return {t.name for t in threading.enumerate() if isinstance(t, StreamingExecutor)}

    before = executors()
    t0 = time.time()
    with pytest.raises(RefineStalled, match="refine.startup_timeout_s"):
        run_refine(cfg)
    assert time.time() - t0 < 20
    # The stalled execution is ended, not left scheduling in this process until ray.shutdown (the hung call takes
    # 20 s; its executor thread is gone well before).
    deadline = time.time() + 5
    while time.time() < deadline and executors() - before:
        time.sleep(0.2)
    assert executors() - before == set()


def test_pools_that_cannot_fit_fail_before_starting(ray_local, tmp_path):
    from crv_ray.refine.pipeline import RefineError

    vllm = {"kind": "vllm", "model": "builtin:tiny", "use_gpu": True, "tensor_parallel_size": 2, "replicas": 2}
    cfg = make_cfg(tmp_path, engines={"agent": vllm}, refine={"mode": "staged"})
    with pytest.raises(RefineError, match=r"GPU: need 4 for the largest single stage .* cluster has 0"):
        run_refine(cfg)
    cpu = {"kind": "vllm", "model": "builtin:tiny", "replicas": 7}  # a CPU each, plus the stages' callers
    (tmp_path / "b").mkdir()
    cfg = make_cfg(tmp_path / "b", engines={"agent": cpu}, refine={"mode": "streaming"}, ray={"num_cpus": 6})
    with pytest.raises(RefineError, match=r"CPU: need [\d.]+ for all role pools together.*use refine.mode=staged"):
        run_refine(cfg)
    assert not list((tmp_path / "run" / "refine").glob("trace/*.parquet"))
