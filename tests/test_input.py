"""Input reading: column mapping, formats, and bad rows quarantined with reasons (never dropped)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crv_ray.config import InputConfig
from crv_ray.data.input import read_problems, stable_problem_id

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


def write_messy_jsonl(path: Path) -> None:
    good = {"q": "What is 2+3?", "a": "5", "s": "2+3=5.\n\nThe final answer is \\boxed{5}."}
    lines = [
        json.dumps(good).encode(),                                   # 1 ok
        b'{"q": "broken", "a": ',                                    # 2 malformed JSON
        json.dumps({"q": "No answer", "s": "x"}).encode(),           # 3 missing field
        json.dumps({"q": "  ", "a": "1", "s": "x"}).encode(),        # 4 empty field
        b'{"q": "caf\xe9", "a": "1", "s": "x"}',                     # 5 not UTF-8
        json.dumps({"q": "Long", "a": "1", "s": "x" * 5000}).encode(),  # 6 over-long CoT
        b"",                                                          # blank line: ignored
        json.dumps([1, 2]).encode(),                                  # 8 not an object
        json.dumps(good).encode(),                                   # 9 duplicate of line 1
        json.dumps({"q": "What is 7*6?", "a": 42, "s": "7*6=42 \\boxed{42}"}).encode(),  # 10 ok, numeric answer
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_messy_jsonl_every_row_accounted(tmp_path):
    f = tmp_path / "messy.jsonl"
    write_messy_jsonl(f)
    cfg = InputConfig(source="file", path=str(f), columns={"problem": "q", "answer": "a", "cot": "s"},
                      max_cot_chars=1000)
    recs = list(read_problems(cfg))
    assert len(recs) == 9  # 10 lines, one blank
    errors = {r["source"]: r["error"] for r in recs if r["error"]}
    assert set(errors) == {f"messy.jsonl:{i}" for i in (2, 3, 4, 5, 6, 8, 9)}
    assert "malformed JSON" in errors["messy.jsonl:2"] and "line 2" in errors["messy.jsonl:2"]
    assert "missing field 'a'" in errors["messy.jsonl:3"]
    assert "field 'q' is empty" in errors["messy.jsonl:4"]
    assert "not valid UTF-8" in errors["messy.jsonl:5"]
    assert "max_cot_chars=1000" in errors["messy.jsonl:6"]
    assert "expected a JSON object" in errors["messy.jsonl:8"]
    assert "duplicate problem_id" in errors["messy.jsonl:9"] and "messy.jsonl:1" in errors["messy.jsonl:9"]
    ok = [r for r in recs if not r["error"]]
    assert [r["answer"] for r in ok] == ["5", "42"]
    assert len({r["problem_id"] for r in recs}) == len(recs)  # ids unique even for bad rows
    assert ok[0]["problem_id"] == stable_problem_id("What is 2+3?", "5")


def test_parquet_and_id_column(tmp_path):
    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "problem": ["p1", "p2"], "answer": ["1", "2"],
                             "cot": ["\\boxed{1}", "\\boxed{2}"]}), f)
    recs = list(read_problems(InputConfig(source="file", path=str(f), columns={"id": "id"})))
    assert [r["problem_id"] for r in recs] == ["a", "b"]
    with pytest.raises(ValueError, match="no column\\(s\\) \\['question'\\]"):
        list(read_problems(InputConfig(source="file", path=str(f), columns={"problem": "question"})))


def test_saved_datasets_folder(tmp_path):
    import datasets

    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"problem": ["p"], "answer": ["3"], "cot": ["\\boxed{3}"]}).save_to_disk(str(d))
    recs = list(read_problems(InputConfig(source="hf", path=str(d))))
    assert len(recs) == 1 and recs[0]["answer"] == "3" and recs[0]["error"] is None


def test_missing_path_names_it(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list(read_problems(InputConfig(source="file", path=str(tmp_path / "nope.jsonl"))))


def test_synthetic_limit():
    recs = list(read_problems(InputConfig(source="synthetic", limit=5)))
    assert len(recs) == 5 and all(r["error"] is None for r in recs)


@pytest.mark.skipif(not BENCH.exists(), reason="shared benchmarks folder not present")
def test_gsm8k_slice_through_column_mapping(tmp_path):
    # GSM8K's worked solutions double as CoTs; the gold is the number after ####.
    src = BENCH / "gsm8k_test.jsonl"
    f = tmp_path / "gsm8k.jsonl"
    f.write_text("".join(src.read_text().splitlines(keepends=True)[:30]))
    cfg = InputConfig(source="file", path=str(f), columns={"problem": "question", "answer": "answer", "cot": "answer"},
                      answer_format="gsm8k")
    recs = list(read_problems(cfg))
    assert len(recs) == 30 and all(r["error"] is None for r in recs)
    assert recs[0]["answer"] == "18"
    assert all(r["answer"].lstrip("-").replace(".", "").isdigit() for r in recs)


def test_an_id_column_is_the_problem_id_by_default(tmp_path):
    f = tmp_path / "with_ids.jsonl"
    rows = [{"id": "gsm-1", "problem": "p1", "answer": "1", "cot": "\\boxed{1}"},
            {"id": 7, "problem": "p2", "answer": "2", "cot": "\\boxed{2}"},  # an integer id
            {"problem": "p3", "answer": "3", "cot": "\\boxed{3}"},  # no id in this row: hashed
            {"id": "gsm-1", "problem": "p4", "answer": "4", "cot": "\\boxed{4}"},  # repeated id
            {"id": "", "problem": "p5", "answer": "5", "cot": "\\boxed{5}"}]  # an empty id
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = list(read_problems(InputConfig(source="file", path=str(f))))
    assert [r["problem_id"] for r in recs[:3]] == ["gsm-1", "7", stable_problem_id("p3", "3")]
    assert recs[3]["problem_id"].startswith("gsm-1#dup-")
    assert "duplicate problem_id 'gsm-1' (first seen at with_ids.jsonl:1)" in recs[3]["error"]
    assert "id field 'id' is empty" in recs[4]["error"] and "with_ids.jsonl:5" in recs[4]["error"]
    assert len({r["problem_id"] for r in recs}) == len(recs)
    assert [r["error"] is None for r in recs] == [True, True, True, False, False]
    # null: ids are hashed even where an id column exists.
    hashed = list(read_problems(InputConfig(source="file", path=str(f), columns={"id": None})))
    assert hashed[0]["problem_id"] == stable_problem_id("p1", "1")


def test_a_named_id_column_is_required(tmp_path):
    f = tmp_path / "uid.jsonl"
    f.write_text(json.dumps({"uid": "a", "problem": "p", "answer": "1", "cot": "c"}) + "\n"
                 + json.dumps({"problem": "q", "answer": "2", "cot": "c"}) + "\n"
                 + json.dumps({"uid": ["x"], "problem": "r", "answer": "3", "cot": "c"}) + "\n")
    recs = list(read_problems(InputConfig(source="file", path=str(f), columns={"id": "uid"})))
    assert recs[0]["problem_id"] == "a" and recs[0]["error"] is None
    assert "uid.jsonl:2: id field 'uid' is missing" in recs[1]["error"]
    assert "id field 'uid' is a list" in recs[2]["error"]
    pf = tmp_path / "no_uid.parquet"
    pq.write_table(pa.table({"problem": ["p"], "answer": ["1"], "cot": ["c"]}), pf)
    with pytest.raises(ValueError, match=r"no column\(s\) \['uid'\]"):
        list(read_problems(InputConfig(source="file", path=str(pf), columns={"id": "uid"})))


def test_parquet_without_an_id_column_hashes_ids(tmp_path):
    f = tmp_path / "no_id.parquet"
    pq.write_table(pa.table({"problem": ["p1"], "answer": ["1"], "cot": ["\\boxed{1}"]}), f)
    recs = list(read_problems(InputConfig(source="file", path=str(f))))
    assert recs[0]["problem_id"] == stable_problem_id("p1", "1") and recs[0]["error"] is None
    with_ids = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": [11, 12], "problem": ["p1", "p2"], "answer": ["1", "2"], "cot": ["c", "c"]}),
                   with_ids)
    assert [r["problem_id"] for r in read_problems(InputConfig(source="file", path=str(with_ids)))] == ["11", "12"]
