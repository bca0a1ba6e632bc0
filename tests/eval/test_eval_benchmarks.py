"""Benchmarks: the four packaged files, user files through the refine column mapping, quarantine, eval config."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crv_ray.config import ConfigError, load_config_dict
from crv_ray.eval.benchmarks import (
    BUILTIN_BENCHMARKS,
    PACKAGE_DIR,
    canonical_number,
    load_benchmark,
    select_benchmarks,
)
from crv_ray.eval.config import BenchmarkSpec, EvalConfig


def _raw(name):
    return [json.loads(line) for line in (PACKAGE_DIR / BUILTIN_BENCHMARKS[name].path.split("/")[-1]).open()]


@pytest.mark.parametrize("name,rows", [("math500", 500), ("aime24", 30), ("amc23", 40), ("gsm8k", 1319)])
def test_packaged_benchmarks_load_whole(name, rows):
    b = load_benchmark(BUILTIN_BENCHMARKS[name])
    assert len(b.problems) == rows and b.quarantined == []
    assert len({p["problem_id"] for p in b.problems}) == rows
    assert all(p["problem"].strip() and p["gold"].strip() for p in b.problems)
    assert load_benchmark(BUILTIN_BENCHMARKS[name], limit=7).problems == b.problems[:7]


def test_packaged_files_ship_with_their_origin_notes():
    notes = (PACKAGE_DIR / "README.md").read_text()
    for word in ("MIT", "PRM800K", "Cobbe", "Qwen2.5-Math", "MAA"):
        assert word in notes


def test_gsm8k_gold_is_the_number_after_hashes_without_separators():
    b = load_benchmark(BUILTIN_BENCHMARKS["gsm8k"])
    raw = _raw("gsm8k")
    assert [p["gold"] for p in b.problems[:4]] == ["18", "3", "70000", "540"]
    assert b.problems[0]["problem"] == raw[0]["question"]
    with_commas = [i for i, r in enumerate(raw) if re.search(r"####\s*\d{1,3},\d{3}", r["answer"])]
    assert with_commas, "the test file has answers with thousands separators"
    for i in with_commas:
        assert "," not in b.problems[i]["gold"] and b.problems[i]["gold"].isdigit()
    # Ids are content hashes (the file has none): stable whatever the order.
    assert all(p["problem_id"].startswith("p-") for p in b.problems)


def test_amc23_and_aime24_numbers_read_as_a_model_writes_them():
    amc = load_benchmark(BUILTIN_BENCHMARKS["amc23"])
    assert amc.problems[0]["gold"] == "27" and amc.problems[0]["gold_raw"] == "27.0"
    assert all(re.fullmatch(r"-?\d+", p["gold"]) for p in amc.problems)
    assert any(p["gold"] == "-1" for p in amc.problems)
    assert [p["problem_id"] for p in amc.problems[:3]] == ["0", "1", "2"]
    aime = load_benchmark(BUILTIN_BENCHMARKS["aime24"])
    by_raw = {p["gold_raw"]: p["gold"] for p in aime.problems}
    assert by_raw["025"] == "25" and by_raw["204"] == "204"
    assert all(re.fullmatch(r"[1-9]\d*", p["gold"]) for p in aime.problems)


def test_math500_groups_by_subject_and_level():
    b = load_benchmark(BUILTIN_BENCHMARKS["math500"])
    assert {p["groups"]["level"] for p in b.problems} == {"1", "2", "3", "4", "5"}
    assert len({p["groups"]["subject"] for p in b.problems}) == 7
    first = b.problems[0]
    assert first["problem_id"] == "test/precalculus/807.json"
    assert first["gold"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first["groups"] == {"subject": "Precalculus", "level": "2"}


def test_canonical_number():
    assert canonical_number("27.0") == "27"
    assert canonical_number("025") == "25"
    assert canonical_number("-3.50") == "-3.5"
    assert canonical_number("0.0") == "0" and canonical_number("-0") == "0"
    assert canonical_number("+7") == "7"
    for text in ("\\frac{1}{2}", "1,000", "3.5e2", "x", "(1, 2)"):
        assert canonical_number(text) == text


def _write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def test_user_jsonl_through_a_column_map_with_bad_rows_quarantined(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        {"qid": "a", "q": "What is 2+2?", "a": 4, "topic": "add"},
        {"qid": "b", "q": "What is 3*3?", "a": "9", "topic": "mul"},
        "{not json\n",                                          # line 3
        {"qid": "d", "q": "What is 1+1?", "topic": "add"},      # line 4: no answer
        {"qid": "a", "q": "What is 5+5?", "a": "10", "topic": "add"},  # line 5: repeated id
        {"qid": "f", "q": "   ", "a": "1", "topic": "add"},     # line 6: empty problem
        {"qid": "g", "q": "What is 7-2?", "a": "5"},            # line 7: no group value
        {"qid": "h", "q": "What is 8/2?", "a": "4.0", "topic": "div"},
        {"q": "What is 9+1?", "a": "10", "topic": "add"},       # line 9: the named id column is missing
    ])
    spec = BenchmarkSpec(name="mine", path=str(path), columns={"problem": "q", "answer": "a", "id": "qid"},
                         answer_format="plain", group_by=["topic"])
    b = load_benchmark(spec)
    assert [(p["problem_id"], p["gold"], p["groups"]["topic"]) for p in b.problems] == [
        ("a", "4", "add"), ("b", "9", "mul"), ("h", "4", "div")]
    assert [q["source"] for q in b.quarantined] == ["mine.jsonl:3", "mine.jsonl:4", "mine.jsonl:5", "mine.jsonl:6",
                                                    "mine.jsonl:7", "mine.jsonl:9"]
    errors = [q["error"] for q in b.quarantined]
    assert "line 3" in errors[0] and "malformed JSON" in errors[0]
    assert errors[1] == "mine.jsonl:4: missing field 'a'"
    assert "duplicate problem id 'a'" in errors[2] and "mine.jsonl:1" in errors[2]
    assert errors[3] == "mine.jsonl:6: field 'q' is empty"
    assert errors[4] == "mine.jsonl:7: missing field 'topic'"
    assert errors[5].startswith("mine.jsonl:9: id field 'qid' is missing")
    # The limit counts usable problems.
    assert [p["problem_id"] for p in load_benchmark(spec, limit=2).problems] == ["a", "b"]


def test_user_parquet_and_gsm8k_format(tmp_path):
    table = pa.table({"question": ["Tom has 1,200 apples and buys 34. How many?", "What is 6*7?"],
                      "solution": ["1200 + 34 = 1234\n#### 1,234", "6*7=42\n#### 42"],
                      "level": [2, 1], "unused": ["x", "y"]})
    pq.write_table(table, tmp_path / "wp.parquet")
    spec = BenchmarkSpec(name="wp", path=str(tmp_path / "wp.parquet"),
                         columns={"problem": "question", "answer": "solution"}, answer_format="gsm8k",
                         group_by=["level"])
    b = load_benchmark(spec)
    assert [(p["gold"], p["groups"]) for p in b.problems] == [("1234", {"level": "2"}), ("42", {"level": "1"})]
    bad = spec.model_copy(update={"group_by": ["topic"]})
    with pytest.raises(ValueError, match=r"no column\(s\) \['topic'\]"):
        load_benchmark(bad)


def test_missing_file_and_unreadable_format_name_the_benchmark(tmp_path):
    with pytest.raises(ValueError, match="benchmark nope: path .*missing.jsonl does not exist"):
        load_benchmark(BenchmarkSpec(name="nope", path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "data.csv").write_text("q,a\n")
    with pytest.raises(ValueError, match="benchmark csv: .*suffix '.csv'"):
        load_benchmark(BenchmarkSpec(name="csv", path=str(tmp_path / "data.csv")))


def test_eval_config_validates_at_load_time(tmp_path):
    base = {"run_dir": str(tmp_path), "student": {"name": "s", "size": "1", "model": "builtin:tiny"},
            "engines": {"agent": {"kind": "vllm", "model": "builtin:tiny"},
                        "student": {"kind": "vllm", "model": "builtin:tiny"}}}
    cfg = load_config_dict({**base, "eval": {"benchmarks": ["gsm8k", {
        "name": "mine", "path": "x.jsonl", "columns": {"problem": "q", "answer": "a"}, "answer_format": "plain",
        "group_by": ["topic"]}], "limit": 50, "sampling": {"max_tokens": 256}}})
    assert cfg.eval.benchmarks[1].columns.problem == "q" and cfg.eval.limit == 50
    # A partial sampling section keeps eval's sampling defaults, not greedy ones.
    assert (cfg.eval.sampling.temperature, cfg.eval.sampling.top_p, cfg.eval.sampling.max_tokens) == (0.6, 0.95, 256)
    # Eval settings are not refine settings: changing them leaves refine's outputs valid.
    other = load_config_dict({**base, "eval": {"limit": 3, "n": 4}})
    assert other.refine_hash() == cfg.refine_hash()

    bad = {
        "gsm9k": ({"benchmarks": ["gsm9k"]}, "unknown benchmark 'gsm9k'"),
        "dup": ({"benchmarks": ["gsm8k", "gsm8k"]}, "benchmark names repeat"),
        "placeholder": ({"prompt": "Solve it."}, "must contain '{problem}'"),
        "greedy samples": ({"n": 4, "sampling": {"temperature": 0}}, "n > 1 needs sampling.temperature > 0"),
        "typo": ({"limt": 5}, "eval.limt: Extra inputs are not permitted"),
        "name": ({"benchmarks": [{"name": "a/b", "path": "x"}]}, "cannot|must be letters"),
        "limit": ({"limit": 0}, "eval.limit: Input should be greater than or equal to 1"),
    }
    for what, (section, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config_dict({**base, "eval": section})
        assert what


def test_select_benchmarks_prefers_configured_entries():
    mine = BenchmarkSpec(name="mine", path="x.jsonl")
    cfg = EvalConfig(benchmarks=["gsm8k", mine])
    assert [s.name for s in select_benchmarks(cfg.benchmarks, None)] == ["gsm8k", "mine"]
    assert select_benchmarks(cfg.benchmarks, ["mine", "math500"]) == [mine, BUILTIN_BENCHMARKS["math500"]]
    with pytest.raises(ValueError, match="unknown benchmark 'other'.*configured ones \\['gsm8k', 'mine'\\]"):
        select_benchmarks(cfg.benchmarks, ["other"])


@pytest.mark.parametrize("module", ["crv_ray.eval.config", "crv_ray.eval.benchmarks", "crv_ray.config"])
def test_import_order_does_not_matter(module):
    # crv_ray.config and crv_ray.eval.config import each other's classes; each must import first in a fresh process.
    import subprocess
    import sys

    code = f"import {module}; from crv_ray.config import RunConfig; print(RunConfig.model_fields['eval'].annotation)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "EvalConfig" in res.stdout


def test_synthetic_held_out_split():
    """A synthetic benchmark with another seed than the training input: exact answers, no problem in common."""
    from crv_ray.data.synthetic import generate_problems

    spec = BenchmarkSpec(name="held_out", source="synthetic", synthetic={"n": 60, "seed": 1000})
    b = load_benchmark(spec)
    assert len(b.problems) == 60 and b.quarantined == []
    train = {r["problem"] for r in generate_problems(300, seed=0)}
    assert not train & {p["problem"] for p in b.problems}
    assert all(re.fullmatch(r"-?\d+", p["gold"]) for p in b.problems)
    # Same settings, same problems and fingerprint (the rerun skip relies on it); another seed differs.
    again = load_benchmark(spec, limit=10)
    assert [p["problem_id"] for p in again.problems] == [p["problem_id"] for p in b.problems[:10]]
    assert again.file_sha1 == b.file_sha1
    other = load_benchmark(BenchmarkSpec(name="held_out", source="synthetic", synthetic={"n": 60, "seed": 1001}))
    assert other.file_sha1 != b.file_sha1
    with pytest.raises(ValueError, match="path is required when source is 'file'"):
        BenchmarkSpec(name="x")
