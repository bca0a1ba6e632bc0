"""Roles that survive reasoning models, through the real Ray Data stages with the scripted reply double:
a critic cut off inside <think> stops the run after the first shard, the critic is not asked about wrong originals,
leaking rewrites fail the verifier with reason `leak`, and refine.response_format shapes the SFT text."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crv_ray.config import load_config_dict
from crv_ray.refine.pipeline import CriticFallbackError
from crv_ray.refine.runner import run_refine

COT_OK = "We add 2 and 3.\n\nThat gives 2 + 3 = 5.\n\nThe final answer is \\boxed{5}."
COT_BAD = "We add 2 and 3.\n\nThat gives 2 + 3 = 6.\n\nThe final answer is \\boxed{6}."
COT_R1 = "<think>\nWe add 2 and 3.\n\n2 + 3 = 5.\n</think>\n\nThe final answer is \\boxed{5}."
# What the scripted agent's think-format rewrite of COT_OK for an easy label must become in `keep` mode.
THINK_REWRITE = ("<think>\nWe add 2 and 3.\n\nThat gives 2 + 3 = 5.\n\nLet me check this intermediate step carefully."
                 "\n</think>\n\nThe final answer is \\boxed{5}.")


def make_cfg(tmp_path: Path, rows: dict[str, tuple[str, str]], function: str = "tagged_replies", **over):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": k, "problem": p, "answer": "5", "cot": c}) + "\n"
                           for k, (p, c) in rows.items()))
    engine = {"kind": "scripted", "function": f"crv_ray.testing:{function}"}
    raw = {
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "file", "path": str(inp), "columns": {"id": "id"}},
        "engines": {"agent": engine, "student": engine},
        "roles": {"verifier": {"max_rounds": 2}},
        "negatives": {"sources": ["wrong_original", "injected"]},
        "refine": {"shard_size": 2, "watchdog_s": 120},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return load_config_dict(raw)


def read(cfg, name: str) -> list[dict]:
    return pq.read_table(Path(cfg.run_dir) / "refine" / name).to_pylist()


CUTOFF = {f"cut{i}": (f"[critic=cutoff] What is 2+{i}?", COT_OK) for i in range(4)}


@pytest.mark.parametrize("mode", ["streaming", "staged"])
def test_a_critic_cut_off_inside_think_stops_the_run_after_the_first_shard(ray_local, tmp_path, mode):
    cfg = make_cfg(tmp_path, CUTOFF, refine={"mode": mode})
    assert cfg.roles.critic.fallback_label == "error" and cfg.roles.critic.max_fallback_rate == 0.2  # the defaults
    with pytest.raises(CriticFallbackError) as err:
        run_refine(cfg)
    msg = str(err.value)
    assert "critic fallback rate 100% (2 of 2 rows the critic judged in shard" in msg
    assert "roles.critic.max_fallback_rate=0.2" in msg and "roles.critic.sampling.max_tokens (now 1024)" in msg
    assert msg.count("'<think>\\nOkay, let me look at this chain of thought.") == 2  # two raw replies shown
    refine_dir = Path(cfg.run_dir) / "refine"
    assert not list(refine_dir.glob("trace/*.parquet")) and not (refine_dir / "manifest.json").exists()
    if mode == "staged":  # stopped right after the critic stages, before any rethink round
        stages = sorted(p.name for p in (refine_dir / "_work" / "stages").iterdir())
        assert stages == ["00-check_original", "01-critic_a0", "02-critic_a1"]


ROWS = {
    "wrong": ("[label=medium] What is 2+3 really?", COT_BAD),
    "leak": ("[label=easy][rethink=leak] What is 2+3?", COT_OK),
    "think": ("[label=easy][rethink=think] What is 2+3?", COT_OK),
    "r1": ("[label=medium] What is 2+3 in R1 style?", COT_R1),
    "cut": ("[critic=cutoff] What is 2+3, cut?", COT_OK),
}


@pytest.fixture(scope="module")
def keep_run(ray_local, tmp_path_factory):
    from crv_ray.testing import start_call_log

    tmp = tmp_path_factory.mktemp("keep")
    log = start_call_log()
    # One shard: 4 rows judged (the wrong original is not), 1 cut off: 25% is under the 0.3 set here.
    cfg = make_cfg(tmp, ROWS, function="counted_replies", refine={"shard_size": 8},
                   roles={"critic": {"max_fallback_rate": 0.3}, "verifier": {"max_rounds": 2}})
    res = run_refine(cfg)
    calls = ray_local.get(log.get.remote())
    ray_local.kill(log)
    return cfg, res, calls


def test_the_critic_is_not_asked_about_wrong_originals(keep_run):
    cfg, res, calls = keep_run
    critic_calls = [pid for stage, pid in calls if stage.startswith("critic")]
    assert "wrong" not in critic_calls
    assert sorted(critic_calls) == ["cut", "cut", "leak", "r1", "think"]  # the cut-off critic is retried once
    assert ("rethink_r1", "wrong") in calls  # the wrong original is still repaired
    trace = {r["problem_id"]: r for r in read(cfg, "trace")}
    assert trace["wrong"]["label"] is None and trace["wrong"]["critic_attempts"] is None
    assert trace["wrong"]["aligned_source"] == "refined" and trace["wrong"]["negative_source"] == "wrong_original"
    critic = res.manifest["stages"]["critic"]
    assert critic["rows"] == 4 and critic["calls"] == 5 and critic["not_asked_wrong_original"] == 1
    # the cut-off row: an error row (the default), counted as a fallback
    assert trace["cut"]["status"] == "error" and trace["cut"]["label_source"] == "fallback"
    assert "no parseable label after 2 attempt(s)" in trace["cut"]["error"]
    assert critic["fallback_rows"] == 1 and critic["fallback_labels"] == 0


def test_leaking_rewrites_fail_with_reason_leak(keep_run):
    cfg, _, calls = keep_run
    leak = {r["problem_id"]: r for r in read(cfg, "trace")}["leak"]
    assert [rd["passed"] for rd in leak["rounds"]] == [False, False]
    for rd in leak["rounds"]:
        assert rd["reason"].startswith("leak: the rewrite says 'original reasoning'"), rd["reason"]
        assert rd["rule_ok"] is True  # the final answer was right: the leak alone failed it
    assert not [s for s, pid in calls if pid == "leak" and s.startswith("verify")]  # no judge call for a leak
    assert "leak" not in {r["problem_id"] for r in read(cfg, "sft")}


def test_keep_format_keeps_think_rewrites_without_the_agents_own_thinking(keep_run):
    cfg, _, _ = keep_run
    sft = {r["problem_id"]: r["response"] for r in read(cfg, "sft")}
    assert sft["think"] == THINK_REWRITE
    assert "The student needs more steps" not in json.dumps(read(cfg, "sft") + read(cfg, "pairs"))
    assert sft["r1"] == COT_R1
    pairs = {(p["problem_id"], p["gap"]): p for p in read(cfg, "pairs")}
    assert pairs[("think", "small")]["chosen"] == sft["think"] and pairs[("think", "small")]["rejected"] == COT_OK


@pytest.mark.parametrize(
    ("fmt", "think", "r1", "wrong_rejected"),
    [
        ("strip_think", "The final answer is \\boxed{5}.", "The final answer is \\boxed{5}.", COT_BAD),
        ("wrap_think",
         THINK_REWRITE,
         COT_R1,
         "<think>\nWe add 2 and 3.\n\nThat gives 2 + 3 = 6.\n</think>\n\nThe final answer is \\boxed{6}."),
    ],
)
def test_response_format_shapes_sft_and_pairs(ray_local, tmp_path, fmt, think, r1, wrong_rejected):
    rows = {k: ROWS[k] for k in ("wrong", "think", "r1")}
    cfg = make_cfg(tmp_path, rows, refine={"shard_size": 8, "response_format": fmt})
    run_refine(cfg)
    sft = {r["problem_id"]: r["response"] for r in read(cfg, "sft")}
    assert sft["think"] == think and sft["r1"] == r1
    pairs = {(p["problem_id"], p["gap"]): p for p in read(cfg, "pairs")}
    assert pairs[("wrong", "large")]["rejected"] == wrong_rejected  # negatives get the same format
    assert pairs[("wrong", "large")]["chosen"] == sft["wrong"]
    trace = {r["problem_id"]: r for r in read(cfg, "trace")}
    assert trace["r1"]["cot"] == COT_R1  # the trace keeps the texts as written
