"""Answer states through refine, on a real-format teacher set (boxed, GSM8K '####', answers stated on the last line
without a box, Minerva, R1 and QwQ traces, a truncated trace, multiple choice), with the scripted reply double:
no correct CoT becomes a negative or is repaired as wrong, a no_answer original follows input.on_no_answer, and
the manifest counts it. The input's own `id` column is the problem id (no columns.id in the config)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crv_ray.config import ConfigError, load_config_dict
from crv_ray.refine.roles import build_stages
from crv_ray.refine.runner import run_refine

EGGS = "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4."
# id: (problem tags, gold, CoT, the CoT is correct (a human's label), expected orig_status)
TEACHER = {
    "last_eq": ("[label=medium]", "18", "She has 16 - 3 - 4 = 9 eggs left.\nShe sells them at $2 each, so she makes "
                "9 * $2 = $18 every day at the farmers' market.", True, "correct"),
    "last_plain": ("[label=easy]", "18", "16 - 3 - 4 = 9 eggs are left to sell.\n\nTherefore, she makes $18 every day.",
                   True, "correct"),
    "answer_is": ("[label=hard]", "18", "16 - 3 - 4 = 9 eggs.\n9 * 2 = 18 dollars.\nThe answer is 18.", True, "correct"),
    "hash": ("[label=medium]", "18", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = "
             "$<<9*2=18>>18 every day at the farmer's market.\n#### 18", True, "correct"),
    "minerva": ("[label=easy]", "18", "She keeps $16-3-4=9$ eggs and earns $9\\cdot 2=18$.\nFinal Answer: The final "
                "answer is $18$. I hope it is correct.", True, "correct"),
    "r1": ("[label=medium][student=none]", "18", "<think>\nOkay, 16 eggs, minus 3 is 13, minus 4 is 9. Wait, maybe the "
           "price is 3? No, 2. So 9 * 2 = 18.\n</think>\n\nShe sells 9 eggs at $2 each, so she makes $18 a day.",
           True, "correct"),
    "qwq": ("[label=hard]", "18", "Let me see: 16 - 3 - 4 = 9 eggs, and 9 * 2 = 18, or 27 at $3? No, $2.\n</think>\n\n"
            "$9 \\times 2 = 18$, so she makes $\\boxed{18}$ dollars.", True, "correct"),
    "choice": ("[label=medium]", "B", "Only option (B) gives 18 eggs sold in two days.\nSo the correct option is (B).",
               True, "correct"),
    "ambiguous_ok": ("[label=medium]", "15", "She bought 24 liters and used 9 of them.\nThus she keeps 15 of the 24 "
                     "liters.", True, "no_answer"),
    "wrong_last": ("[label=medium]", "18", "She has 16 - 3 - 3 = 10 eggs left.\nTherefore, she makes $20 every day.",
                   False, "wrong"),
    "wrong_boxed": ("[label=easy]", "18", "16 - 3 - 4 = 9 and 9 * 3 = 27.\n\nThe final answer is \\boxed{27}.",
                    False, "wrong"),
    "r1_cut": ("[label=medium]", "18", "<think>\nOkay, so 16 - 3 - 4 = 9 eggs are left. Then 9 times", False,
               "no_answer"),
}
NO_ANSWER = {k for k, v in TEACHER.items() if v[4] == "no_answer"}


def make_cfg(tmp_path: Path, policy: str, mode: str = "streaming"):
    inp = tmp_path / "teacher.jsonl"
    inp.write_text("".join(json.dumps({"id": k, "problem": f"{tags} {EGGS} How much does she make?", "answer": gold,
                                       "cot": cot}) + "\n" for k, (tags, gold, cot, _, _) in TEACHER.items()))
    engine = {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}
    return load_config_dict({
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "file", "path": str(inp), "on_no_answer": policy},
        "engines": {"agent": engine, "student": engine},
        "roles": {"verifier": {"max_rounds": 1}},
        "negatives": {"student": {"k": 2}},
        "refine": {"mode": mode, "shard_size": 6, "watchdog_s": 120},
    })


def read(cfg, name: str) -> list[dict]:
    return pq.read_table(Path(cfg.run_dir) / "refine" / name).to_pylist()


def assert_no_correct_cot_is_a_negative(cfg) -> dict:
    trace = {r["problem_id"]: r for r in read(cfg, "trace")}
    assert set(trace) == set(TEACHER)  # the user's own ids
    assert {k: r["orig_status"] for k, r in trace.items()} == {k: v[4] for k, v in TEACHER.items()}
    # A negative is the rejected side of a medium or large pair; the small pair rejects a correct original on
    # purpose (aligned rewrite vs the misaligned original).
    negatives = {p["rejected"] for p in read(cfg, "pairs") if p["gap"] != "small"}
    for pid, (_, _, cot, is_correct, _) in TEACHER.items():
        row = trace[pid]
        if is_correct or pid in NO_ANSWER:
            assert cot not in negatives, pid
            assert row["negative_source"] != "wrong_original", pid
            assert all(rd["mode"] != "repair" for rd in row["rounds"]), pid
        else:
            assert row["status"] == "error" or row["negative_source"] == "wrong_original", pid
    for pid in ("wrong_last", "wrong_boxed"):
        assert trace[pid]["orig_correct"] is False and trace[pid]["rounds"][0]["mode"] == "repair"
    # A student sample with no final answer is no negative: that row's negative is the injected CoT.
    samples = trace["r1"]["student_samples"]
    assert [s["status"] for s in samples] == ["no_answer", "no_answer"] and trace["r1"]["negative_source"] == "injected"
    return trace


def manifest(cfg) -> dict:
    return json.loads((Path(cfg.run_dir) / "refine" / "manifest.json").read_text())


def test_judge_policy(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, "judge")
    run_refine(cfg)
    trace = assert_no_correct_cot_is_a_negative(cfg)
    ok = trace["ambiguous_ok"]
    assert ok["status"] == "ok" and ok["orig_judged"] is True and ok["orig_correct"] is True
    assert "ambiguous" in ok["orig_reason"] and ok["orig_judge_raw"].startswith("VERDICT: PASS")
    assert {r["problem_id"]: r["aligned_source"] for r in read(cfg, "sft")}["ambiguous_ok"] == "original"
    errors = {e["problem_id"]: e for e in read(cfg, "errors")}
    assert set(errors) == {"r1_cut"} and errors["r1_cut"]["stage"] == "no_answer"
    assert "cut inside <think>" in errors["r1_cut"]["reason"] and "the judge says" in errors["r1_cut"]["reason"]
    m = manifest(cfg)
    check = m["stages"]["check_original"]
    assert check["statuses"] == {"correct": 8, "wrong": 2, "no_answer": 2, "error": 0}
    assert check["no_answer"] == 2 and check["on_no_answer"] == "judge"
    assert check["no_answer_outcomes"] == {"judged_correct": 1, "judged_not_correct": 1}
    assert m["errors_by_stage"] == {"no_answer": 1} and m["reconciliation"]["balanced"]
    # r1's two samples, and the choice row's ("B1": no choice letter against the gold letter B).
    assert m["stages"]["student_samples"]["no_answer"] == 4
    state = json.loads((Path(cfg.run_dir) / "refine" / "_work" / "state.json").read_text())
    assert [s["no_answer"] for s in state["shards"]] == [0, 2]  # counted at ingest: the judge pool is needed
    assert [s.name for s in build_stages(cfg)][:3] == ["check_original", "judge_original", "critic_a0"]
    assert [s.name for s in build_stages(cfg, judge_original=False)][:2] == ["check_original", "critic_a0"]


def test_keep_unverified_policy(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, "keep_unverified")
    run_refine(cfg)
    trace = assert_no_correct_cot_is_a_negative(cfg)
    for pid in NO_ANSWER:
        assert trace[pid]["status"] == "ok" and trace[pid]["orig_correct"] is None and trace[pid]["orig_judged"] is None
        assert "small" not in trace[pid]["pair_gaps"]  # never the rejected side
    assert {r["problem_id"] for r in read(cfg, "sft")} >= {"ambiguous_ok", "r1_cut"}  # medium labels: kept as SFT
    check = manifest(cfg)["stages"]["check_original"]
    assert check["no_answer"] == 2 and check["no_answer_outcomes"] == {"kept_unverified": 2}
    assert not read(cfg, "errors")


def test_drop_policy(ray_local, tmp_path):
    cfg = make_cfg(tmp_path, "drop")
    run_refine(cfg)
    assert_no_correct_cot_is_a_negative(cfg)
    errors = {e["problem_id"]: e for e in read(cfg, "errors")}
    assert set(errors) == NO_ANSWER and {e["stage"] for e in errors.values()} == {"no_answer"}
    assert all("(input.on_no_answer=drop)" in e["reason"] for e in errors.values())
    m = manifest(cfg)
    assert m["stages"]["check_original"]["no_answer_outcomes"] == {"dropped": 2}
    assert m["stages"]["critic"]["rows"] == 8  # dropped rows and wrong originals never reach the critic


def test_judge_needs_the_llm_judge(tmp_path):
    raw = {"run_dir": str(tmp_path), "student": {"name": "T", "size": "1M", "model": "builtin:tiny"},
           "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}},
           "negatives": {"sources": ["wrong_original"]},
           "roles": {"verifier": {"llm_judge": False, "require": ["rule"]}}}
    with pytest.raises(ConfigError, match="input.on_no_answer is 'judge'.*roles.verifier.llm_judge is false"):
        load_config_dict(raw)
    cfg = load_config_dict({**raw, "input": {"on_no_answer": "drop"}})
    assert cfg.input.on_no_answer == "drop"


def test_role_stages_keep_no_answer_apart_from_wrong(tmp_path):
    """Pure stage functions: a rewrite, an injected CoT or a student sample with no final answer is no negative,
    and the verifier's rule check says why it failed."""
    from crv_ray.refine.roles import Reply, check_original, inject_stage, student_stage, verify_stage
    from crv_ray.refine.state import empty_state

    cfg = make_cfg(tmp_path, "judge")
    base = {**empty_state(1), "problem_id": "p", "problem": "How much?", "answer": "18", "cot": "x"}
    row = verify_stage(cfg, 1).apply({**base, "r1_cot": "Let me think about the eggs first."}, Reply(None, skipped=True))
    assert row["r1_rule_status"] == "no_answer" and row["r1_passed"] is False
    assert row["r1_reason"].startswith("no final answer: no final answer found") and "\\boxed{}" in row["r1_reason"]
    row = verify_stage(cfg, 1).apply({**base, "r1_cot": "So she makes $20."}, Reply(None, skipped=True))
    assert row["r1_rule_status"] == "wrong" and "'20' does not match the expected answer '18'" in row["r1_reason"]

    inject = inject_stage(cfg)
    assert inject.apply(dict(base), Reply("<rewrite>Then we would need to</rewrite>"))["injected_ok"] is False
    assert inject.apply(dict(base), Reply("<rewrite>9 * 3 = 27, so \\boxed{27}.</rewrite>"))["injected_ok"] is True
    sample = student_stage(cfg).apply({**base, "sample_index": 0}, Reply("I would first add the"))
    assert (sample["student_status"], sample["student_correct"]) == ("no_answer", None)

    # A check that cannot finish is an error row with the reason, never a hang.
    slow = cfg.model_copy(update={"answers": cfg.answers.model_copy(update={"timeout_s": 0.5})})
    row = check_original({**base, "cot": "\\boxed{(x+1)^{999}}", "answer": "(x+2)^{999}"}, slow)
    assert row["orig_status"] == "error" and row["error_stage"] == "check_original"
    assert "timeout after 0.5s" in row["error"]
