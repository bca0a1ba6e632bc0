"""Pure helpers of jobs/bench_serve_llm.py (the benchmark itself starts engines and Ray Serve: not a test)."""

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "jobs" / "bench_serve_llm.py"
_spec = importlib.util.spec_from_file_location("bench_serve_llm", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_workload_is_the_critic_prompt_with_problem_and_cot_deterministic():
    rows = bench.workload(3)
    assert [r["problem_id"] for r in rows] == ["syn-7-000000", "syn-7-000001", "syn-7-000002"]
    msgs = json.loads(rows[0]["messages"])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "<chain_of_thought>" in msgs[1]["content"] and "<problem>" in msgs[1]["content"]
    assert bench.workload(3) == rows


def test_agreement_counts_identical_texts_and_errors_never_agree():
    a = {"p1": "x", "p2": "y", "p3": None, "only_a": "z"}
    b = {"p1": "x", "p2": "other", "p3": None, "only_b": "z"}
    assert bench.agreement(a, b) == (pytest.approx(1 / 3), 3)
    assert bench.agreement({}, b) == (0.0, 0)


def test_marginal_rate_between_two_sizes():
    assert bench.marginal_rate(100, 10.0, 400, 16.0) == pytest.approx(50.0)
    assert bench.marginal_rate(100, 10.0, 400, 9.0) is None  # the larger run was not slower: no rate


def test_serve_reply_reads_the_chat_completion_or_the_error():
    ok = {"problem_id": "p", "choices": [{"message": {"content": "medium"}}], "__inference_error__": ""}
    assert bench._serve_reply(ok) == {"problem_id": "p", "text": "medium", "error": None}
    bad = {"problem_id": "q", "__inference_error__": "ValueError: too long"}
    assert bench._serve_reply(bad) == {"problem_id": "q", "text": None, "error": "ValueError: too long"}


def test_error_summary_finds_the_innermost_error_in_a_colored_ray_traceback():
    e = RuntimeError("\x1b[36mray::MapWorker(x).submit()\x1b[39m (pid=1)\n  File \"a.py\"\n"
                     "ray.exceptions.ActorDiedError: The actor died\nThe above exception was the direct cause\n"
                     "ray.exceptions.UserCodeException: UDF failed to process a data block.\n")
    assert bench.error_summary(e) == "ray.exceptions.ActorDiedError: The actor died"
    assert bench.error_summary(ValueError("plain")) == "ValueError: plain"
