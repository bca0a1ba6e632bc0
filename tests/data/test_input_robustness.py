"""Input at scale: .json arrays, a mostly-bad input stopping at ingest, and the input fingerprint that keeps an edited
file from mixing with shards of its old rows."""

import hashlib
import json
import os

import pytest

import crv_ray.data.fingerprint as fingerprint_mod
from crv_ray.config import InputConfig, load_config_dict
from crv_ray.data.input import InputError, read_problems
from crv_ray.refine.pipeline import ingest
from crv_ray.refine.runner import InputChanged, check_input, run_refine
from crv_ray.refine.store import RefineStore

COT = "2+3=5.\n\nThe final answer is \\boxed{5}."


def good(i: int) -> dict:
    return {"id": f"p{i}", "problem": f"What is 2+3? ({i})", "answer": "5", "cot": COT}


# ---------------------------------------------------------------- .json arrays
def test_a_json_array_file_is_read_as_rows(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps([good(1), good(2), ["not", "an object"], good(3)], indent=2))
    recs = list(read_problems(InputConfig(source="file", path=str(f))))
    assert [r["source"] for r in recs] == [f"data.json:row{i}" for i in (1, 2, 3, 4)]
    assert [r["problem_id"] for r in recs if r["error"] is None] == ["p1", "p2", "p3"]
    assert recs[2]["error"] == f"item 3 of the JSON array in {f}: expected a JSON object, got list"
    assert [r["answer"] for r in recs if r["error"] is None] == ["5", "5", "5"]


def test_json_arrays_with_a_bom_and_json_lines_in_a_folder(tmp_path):
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf\n  \n" + json.dumps([good(1), good(2)]).encode())
    (tmp_path / "b.json").write_text("\n".join(json.dumps(good(i)) for i in (3, 4)) + "\n")  # JSON lines in .json
    (tmp_path / "c.jsonl").write_text(json.dumps(good(5)) + "\n")
    recs = list(read_problems(InputConfig(source="file", path=str(tmp_path))))
    assert [(r["source"], r["problem_id"], r["error"]) for r in recs] == [
        ("c.jsonl:1", "p5", None), ("a.json:row1", "p1", None), ("a.json:row2", "p2", None),
        ("b.json:1", "p3", None), ("b.json:2", "p4", None)]


def test_a_broken_json_array_names_the_file_and_position(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('[\n  {"problem": "x", "answer": "1", "cot": "c"},\n  {"problem": \n')
    with pytest.raises(ValueError, match=r"broken\.json starts a JSON array but does not parse: .* at line 4"):
        list(read_problems(InputConfig(source="file", path=str(f))))


# ---------------------------------------------------------------- mostly bad input
def run_cfg(tmp_path, path, **input_over):
    return load_config_dict({
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "file", "path": str(path), **input_over},
        "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"},
                    "student": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}},
        "refine": {"shard_size": 8},
    })


def write_rows(path, n_good: int, n_bad: int) -> None:
    rows = [good(i) for i in range(n_good)] + [{"id": f"b{i}", "problem": "x", "cot": "y"} for i in range(n_bad)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_a_mostly_bad_input_stops_at_ingest_with_counts_and_reasons(tmp_path):
    f = tmp_path / "in.jsonl"
    write_rows(f, 10, 20)  # the answer column is missing in 20 of 30 rows
    cfg = run_cfg(tmp_path, f)
    store = RefineStore(cfg.run_dir)
    with pytest.raises(InputError) as err:
        ingest(cfg, store)
    msg = str(err.value)
    assert "20 of 30 input rows (67%) are unusable" in msg and "input.max_bad_fraction=0.5" in msg
    assert msg.count("missing field 'answer'") == 5  # the first five reasons
    assert "in.jsonl:11: missing field 'answer'" in msg  # the first bad row, by line
    assert "answer='answer'" in msg  # the column map to check
    assert store.read_state() is None and not (store.work / "input").exists()  # nothing counts as ingested


def test_bad_rows_under_the_bound_are_quarantined(tmp_path):
    f = tmp_path / "in.jsonl"
    write_rows(f, 10, 10)  # exactly half: not more than the bound
    state = ingest(run_cfg(tmp_path, f), RefineStore(tmp_path / "run"))
    assert state["rows_in"] == 20 and state["rows_quarantined_at_input"] == 10


def test_the_bound_is_configurable_and_small_inputs_are_not_judged(tmp_path):
    f = tmp_path / "in.jsonl"
    write_rows(f, 5, 25)
    state = ingest(run_cfg(tmp_path / "a", f, max_bad_fraction=1.0), RefineStore(tmp_path / "a" / "run"))
    assert state["rows_quarantined_at_input"] == 25
    with pytest.raises(InputError, match="input.max_bad_fraction=0.1"):
        ingest(run_cfg(tmp_path / "b", f, max_bad_fraction=0.1), RefineStore(tmp_path / "b" / "run"))
    small = tmp_path / "small.jsonl"
    write_rows(small, 1, 18)  # 19 rows: too few for the share to say much; quarantined row by row
    state = ingest(run_cfg(tmp_path / "c", small), RefineStore(tmp_path / "c" / "run"))
    assert state["rows_in"] == 19 and state["rows_quarantined_at_input"] == 18


# ---------------------------------------------------------------- fingerprint
def ingested(tmp_path, **input_over):
    f = tmp_path / "in.jsonl"
    write_rows(f, 5, 0)
    cfg = run_cfg(tmp_path, f, **input_over)
    store = RefineStore(cfg.run_dir)
    ingest(cfg, store)
    return cfg, store, f


def test_ingest_stores_the_fingerprint(tmp_path):
    cfg, store, f = ingested(tmp_path)
    fp = store.read_state()["input_fingerprint"]
    st = f.stat()
    assert fp == {"source": "file", "path": str(f), "files": [
        {"name": "in.jsonl", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
         "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}]}


def test_an_edited_input_refuses_to_mix_with_old_shards(tmp_path):
    cfg, store, f = ingested(tmp_path)
    with f.open("a") as fh:
        fh.write(json.dumps(good(99)) + "\n")
    with pytest.raises(InputChanged) as err:
        run_refine(cfg)
    msg = str(err.value)
    assert "in.jsonl: content changed" in msg and "--restart" in msg and "refine.on_config_change" in msg
    assert store.read_state()["rows_in"] == 5  # nothing was touched
    check_input(load_config_dict(cfg.model_dump(mode="json"), overrides=["refine.on_config_change=restart"]), store)
    assert store.read_state() is None  # reset: the next ingest reads the new file


def test_a_touched_but_unchanged_input_resumes_and_unchanged_files_are_not_hashed(tmp_path, monkeypatch):
    cfg, store, f = ingested(tmp_path)
    old = store.read_state()["input_fingerprint"]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    check_input(cfg, store)  # same bytes: fine, and the new mtime is recorded
    new = store.read_state()["input_fingerprint"]
    assert new["files"][0]["sha256"] == old["files"][0]["sha256"]
    assert new["files"][0]["mtime_ns"] == old["files"][0]["mtime_ns"] + 10**9

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed although its size and mtime are unchanged")

    monkeypatch.setattr(fingerprint_mod, "sha256_file", no_hashing)
    check_input(cfg, store)


def test_a_run_dir_without_a_fingerprint_gets_one_and_synthetic_inputs_record_settings(tmp_path):
    cfg, store, f = ingested(tmp_path)
    state = store.read_state()
    del state["input_fingerprint"]
    store.write_state(state)
    check_input(cfg, store)
    assert store.read_state()["input_fingerprint"]["files"][0]["name"] == "in.jsonl"

    syn = load_config_dict({**cfg.model_dump(mode="json"), "run_dir": str(tmp_path / "syn"),
                            "input": {"source": "synthetic", "synthetic": {"n": 3, "seed": 5}}})
    syn_store = RefineStore(syn.run_dir)
    ingest(syn, syn_store)
    fp = syn_store.read_state()["input_fingerprint"]
    assert fp["source"] == "synthetic" and fp["settings"]["n"] == 3 and fp["settings"]["seed"] == 5


def test_a_vanished_input_resumes_from_the_ingested_rows(tmp_path, caplog):
    cfg, store, f = ingested(tmp_path)
    f.unlink()
    check_input(cfg, store)
    assert "is gone" in caplog.text and store.read_state()["rows_in"] == 5
