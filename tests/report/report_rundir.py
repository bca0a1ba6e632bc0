"""A finished run directory in the real formats, built without models: refine working rows go through the real
assemble/commit/manifest code; metrics.jsonl lines are what MetricsLogger writes; eval/summary.json has the eval
stage's shape."""

from __future__ import annotations

import json
from pathlib import Path

from crv_ray.cli import default_config_path
from crv_ray.config import load_config
from crv_ray.refine.assemble import assemble_shard
from crv_ray.refine.manifest import write_manifest
from crv_ray.refine.state import empty_state, round_col
from crv_ray.refine.store import DATASETS, RefineStore

MAX_ROUNDS = 2
# Figure ids of a report with every input present.
ALL_FIGURES = {"fig-labels", "fig-rounds", "fig-lengths", "fig-negatives", "fig-pairs", "fig-sft-loss",
               "fig-cogpo-loss", "fig-cogpo-margins", "fig-cogpo-accuracies", "fig-eval-pass1"}
# A critic label that needs escaping, to prove data never becomes markup.
EVIL_LABEL = "<script>alert(1)</script>"

# (label, original correct, original CoT, round results [(cot, passed)], student samples [(text, pred, correct)])
PROBLEMS = [
    ("easy", True, "x=2 so 4.", [("First, x=2. Then 2*2=4. So the answer is 4.", True)], [("wrong 5", "5", False)]),
    ("easy", True, "y=3, 9.", [("y is 3 and 3*3 is 9, hence 9.", True)], [("9", "9", True)]),
    ("easy", True, "z is 1.", [("bad", False), ("still bad", False)], [("2", "2", False)]),
    ("hard", True, "Long roundabout working that finally arrives at 7 after many steps.",
     [("too short", False), ("So 7.", True)], [("8", "8", False)]),
    ("hard", False, "A wrong long derivation ending in 11 instead.", [("Repaired: 12.", True)], [("12", "12", True)]),
    ("medium", True, "Plain working: 6.", [], [("3", "3", False)]),
    ("medium", True, "Another plain one: 10.", [], [("10", "10", True)]),
    (EVIL_LABEL, True, "An odd label row: 1.", [], [("1", "1", True)]),
]


def _problem_rows(cfg, pid: str, shard: int, label, orig_correct, cot, rounds, samples) -> list[dict]:
    row = empty_state(MAX_ROUNDS)
    row.update(problem_id=pid, shard=shard, source=f"synthetic:{pid}", problem=f"Problem {pid}?", answer="4",
               answer_raw="4", cot=cot, student_prompt=f"Solve {pid}", orig_pred="4" if orig_correct else "11",
               orig_correct=orig_correct, orig_check="rule", critic_raw=json.dumps([f'{{"label": "{label}"}}']),
               critic_attempts=1, label=label, label_source="critic", tok_in_critic=50, tok_out_critic=5)
    for k, (rcot, passed) in enumerate(rounds, 1):
        row.update({round_col(k, "mode"): "repair" if not orig_correct else ("extend" if label == "easy" else
                                                                             "simplify"),
                    round_col(k, "rethink_raw"): rcot, round_col(k, "cot"): rcot, round_col(k, "passed"): passed,
                    round_col(k, "rule_ok"): passed, round_col(k, "judge_pass"): passed})
    if rounds:
        last_ok = [c for c, p in rounds if p]
        row.update(refined_cot=last_ok[0] if last_ok else rounds[-1][0], refined_verified=bool(last_ok),
                   rounds_used=len(rounds))
    return [dict(row, sample_index=i, student_raw=t, student_pred=p, student_correct=c, tok_out_student=7)
            for i, (t, p, c) in enumerate(samples)]


def build_run_dir(run_dir: Path, *, sft: bool = True, cogpo: bool = True, eval_summary: bool = True) -> dict:
    cfg = load_config(default_config_path(), [f"run_dir={run_dir}", f"roles.verifier.max_rounds={MAX_ROUNDS}",
                                              "refine.shard_size=5"])
    store = RefineStore(run_dir)
    problems = {f"p{i:02d}": p for i, p in enumerate(PROBLEMS)}
    failed = "p99"  # a row that failed at the critic: a trace row with status error and an errors row
    ids = sorted([*problems, failed])
    shards = [ids[:5], ids[5:]]
    store.write_state({"rows_in": len(ids), "shards": [{"shard": i, "rows": len(s)} for i, s in enumerate(shards)],
                       "config_hash": cfg.refine_hash()})
    for shard, pids in enumerate(shards):
        by_problem = {}
        for pid in pids:
            if pid == failed:
                row = empty_state(MAX_ROUNDS)
                row.update(problem_id=pid, shard=shard, source="synthetic:p99", problem="?", answer_raw="",
                           cot="c", student_prompt="Solve p99", error_stage="critic", error="engine timeout")
                by_problem[pid] = [row]
            else:
                by_problem[pid] = _problem_rows(cfg, pid, shard, *problems[pid])
        tables = assemble_shard(cfg, by_problem, cfg.refine_hash())
        info = {name: tables[name].num_rows for name in DATASETS}
        store.commit_shard(shard, tables, dict(info, shard=shard, committed_at=0.0))
    manifest = write_manifest(cfg, store)

    if sft:
        _write_metrics(run_dir / "sft", [{"loss": 2.5 - 0.3 * s, "lr": 2e-5, "grad_norm": 1.0, "epoch": 0.0,
                                          "tokens_per_s": 100.0, "padding_fraction": 0.2, "peak_memory_mb": 900.0}
                                         for s in range(1, 5)])
    if cogpo:
        entries = []
        for s in range(1, 4):
            m = {"loss": 0.69 - 0.05 * s, "lr": 1e-6, "grad_norm": 0.5, "epoch": 0.0, "tokens_per_s": 50.0,
                 "padding_fraction": 0.1, "peak_memory_mb": 1000.0, "rewards/chosen": 0.01 * s,
                 "rewards/rejected": -0.01 * s, "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.1 * s,
                 "logps/chosen": -20.0, "logps/rejected": -25.0}
            for gap, scale in (("small", 1.0), ("medium", 2.0), ("large", 3.0)):
                if gap == "small" and s == 2:  # a step with no small pair: finalize_metric_sums leaves it out
                    m["count/small"] = 0.0
                    continue
                m.update({f"rewards/margins/{gap}": 0.01 * s * scale, f"rewards/accuracies/{gap}": min(1.0, 0.2 * s * scale),
                          f"count/{gap}": 2.0})
            entries.append(m)
        _write_metrics(run_dir / "cogpo", entries)
    summary = None
    if eval_summary:
        summary = {"created_at": "2026-01-02T03:04:05Z", "results": [
            _result("base", "gsm8k", 0.1234, 0.1100, 0.15, 4, 180.5, 0.2),
            _result("sft", "gsm8k", 0.2345, 0.2250, 0.26, 4, 150.25, 0.1),
            _result("cogpo", "gsm8k", 0.3456, 0.3300, 0.37, 4, 140.0, 0.05),
            _result("base", "math500", None, 0.05, None, None, 300.0, 0.4, groups=True),
            _result("cogpo", "math500", None, 0.0875, None, None, 280.0, 0.3, groups=True),
            _result("sft", "math500", None, 0.0625, None, None, 290.0, 0.35, groups=True),
        ]}
        (run_dir / "eval").mkdir(parents=True)
        (run_dir / "eval" / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"manifest": manifest, "summary": summary, "cfg": cfg}


def _result(model, bench, greedy, pass1, maj, k, tokens, no_answer, groups=False) -> dict:
    r = {"model": model, "model_path": f"/runs/x/{model}/model", "benchmark": bench, "n_problems": 40,
         "n_samples": k or 1, "greedy_pass@1": greedy, "pass@1": pass1, "maj@k": maj, "k": k,
         "mean_response_tokens": tokens, "no_answer_rate": no_answer, "groups": {}}
    if groups:
        r["groups"] = {"subject": {"Algebra": {"n": 25, "pass@1": pass1 + 0.01},
                                   "Geometry": {"n": 15, "pass@1": pass1 - 0.01}},
                       "level": {"1": {"n": 20, "pass@1": pass1 * 2}, "5": {"n": 20, "pass@1": 0.0}}}
    return r


def _write_metrics(stage_dir: Path, entries: list[dict]) -> None:
    # MetricsLogger.log's line format: {"step", "time", **metrics}, one line per logged optimizer step.
    stage_dir.mkdir(parents=True)
    with (stage_dir / "metrics.jsonl").open("w") as f:
        for step, m in enumerate(entries, 1):
            f.write(json.dumps({"step": step, "time": 1700000000.0 + step, **m}) + "\n")
