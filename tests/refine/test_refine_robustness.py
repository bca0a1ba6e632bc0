"""Failure handling of a real refine run (Ray Data, scripted replies): a full disk while committing fails that shard
and keeps the committed ones, the rerun resumes; the manifest added up from shard summaries equals the all-rows
summary; runtime knobs resume a finished run, an edited input refuses it."""

import errno
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from manifest_v0 import summarize_trace as summarize_v0

import crv_ray.refine.store as store_mod
from crv_ray.config import load_config_dict
from crv_ray.refine.manifest import write_manifest
from crv_ray.refine.runner import ConfigChanged, InputChanged, run_refine
from crv_ray.refine.store import RefineStore, StoreWriteError

COT_OK = "We add 2 and 3.\n\nThat gives 2 + 3 = 5.\n\nThe final answer is \\boxed{5}."
COT_BAD = "We add 2 and 3.\n\nThat gives 2 + 3 = 6.\n\nThe final answer is \\boxed{6}."
COT_NONE = "We add 2 and 3 and write the sum down."  # no final answer: the judge decides (input.on_no_answer)
CASES = [
    ("easy", "[label=easy] What is 2+3?", COT_OK),
    ("medium", "[label=medium][student=none] What is 2+3?", COT_OK),
    ("hard_fail1", "[label=hard][verify=fail1] What is 2+3?", COT_OK),
    ("hard_never", "[label=hard][verify=never] What is 2+3?", COT_OK),
    ("wrong_orig", "[label=medium] What is 2+3 really?", COT_BAD),
    ("student_right", "[label=medium][student=right] What is 2+3?", COT_OK),
    ("judged_pass", "[judge=pass][label=easy] What is 2+3?", COT_NONE),
    ("judged_fail", "[judge=fail] What is 2+3?", COT_NONE),
]


def make_cfg(tmp_path: Path, **over):
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        lines = [json.dumps({"id": k, "problem": p, "answer": "5", "cot": c}) for k, p, c in CASES]
        inp.write_text("\n".join(lines + ['{"id": "broken", "problem": ']) + "\n")
    raw = {
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "file", "path": str(inp), "columns": {"id": "id"}},
        "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"},
                    "student": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}},
        "roles": {"verifier": {"max_rounds": 2}},
        "negatives": {"student": {"k": 2}},
        "refine": {"shard_size": 3, "watchdog_s": 120},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return load_config_dict(raw)


@pytest.fixture(scope="module")
def disk_full_then_resumed(ray_local, tmp_path_factory):
    """First run: the disk is full when the second shard's pairs file is written. Second run: space again."""
    tmp = tmp_path_factory.mktemp("diskfull")
    cfg = make_cfg(tmp)
    store = RefineStore(cfg.run_dir)
    real = store_mod.pq.write_table
    pairs_writes = []

    def write_table(table, where, *a, **k):
        if Path(where).parent.name == "pairs":
            pairs_writes.append(where)
            if len(pairs_writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, *a, **k)

    store_mod.pq.write_table = write_table
    try:
        with pytest.raises(StoreWriteError) as err:
            run_refine(cfg)
    finally:
        store_mod.pq.write_table = real
    after_failure = {
        "done": store.committed_shards()[0],
        "files": {name: sorted(p.name for p in store.dataset_dir(name).glob("*")) for name in ("trace", "sft", "pairs")},
        "bytes": {p: p.read_bytes() for d in ("trace", "sft", "pairs", "errors")
                  for p in store.dataset_dir(d).glob("*.parquet")},
    }
    resumed = run_refine(cfg)
    return cfg, str(err.value), after_failure, resumed


def test_a_full_disk_fails_the_shard_and_keeps_the_committed_one(disk_full_then_resumed):
    cfg, msg, after, resumed = disk_full_then_resumed
    assert len(after["done"]) == 1  # the first committed shard stays committed
    (done,) = after["done"]
    assert "the disk is full" in msg and "was not committed" in msg and "/refine/pairs/shard-0000" in msg
    for name in ("trace", "sft", "pairs"):  # no file of the failed shard, no temporary file
        assert after["files"][name] == [f"shard-{done:05d}.parquet"], name
    # the rerun resumes: the committed shard is skipped and its files are the same bytes
    assert resumed.shards_skipped == 1 and resumed.shards_run == 2
    for p, data in after["bytes"].items():
        assert p.read_bytes() == data
    rec = resumed.manifest["reconciliation"]
    assert rec["complete"] and rec["balanced"] and rec["rows_in"] == 9 and rec["trace_rows"] == 9


def test_manifest_equals_the_all_rows_summary(disk_full_then_resumed):
    cfg, _, _, resumed = disk_full_then_resumed
    rows = pq.read_table(Path(cfg.run_dir) / "refine" / "trace").to_pylist()
    old = summarize_v0(rows, cfg.roles.verifier.max_rounds, cfg.input.on_no_answer)
    m = resumed.manifest
    assert {k: m[k] for k in old} == old
    check = m["stages"]["check_original"]
    assert check["no_answer"] == 2 and check["no_answer_outcomes"] == {"judged_correct": 1, "judged_not_correct": 1}
    assert m["errors_by_stage"] == {"input": 1, "no_answer": 1}
    assert m["stages"]["student_samples"]["no_answer"] == 2  # the [student=none] samples
    assert m["stages"]["rethink_verify"][1] == {"round": 2, "rethought": 2, "passed": 1, "pass_rate": 0.5}
    # recomputed from the trace files of "old" markers: the same
    store = RefineStore(cfg.run_dir)
    for s in store.committed_shards()[0]:
        info = store.done_info(s)
        del info["summary"]
        store.done_marker(s).write_text(json.dumps(info))
    again = write_manifest(cfg, store)
    assert {k: again[k] for k in old} == old


def test_runtime_knobs_resume_and_an_edited_input_refuses(disk_full_then_resumed):
    cfg, _, _, _ = disk_full_then_resumed
    tmp = Path(cfg.run_dir).parent
    res = run_refine(make_cfg(tmp, refine={"mode": "staged", "watchdog_s": 30, "max_shards_per_run": 1},
                              input={"max_bad_fraction": 0.9}, roles={"critic": {"max_fallback_rate": 1.0}}))
    assert res.shards_run == 0 and res.shards_skipped == 3
    with pytest.raises(ConfigChanged):
        run_refine(make_cfg(tmp, refine={"shard_size": 4}))
    inp = tmp / "in.jsonl"
    original = inp.read_bytes()
    inp.write_bytes(original.replace(b"What is 2+3 really?", b"What is 2+4 really?"))
    try:
        with pytest.raises(InputChanged, match=r"in\.jsonl: content changed .*--restart"):
            run_refine(cfg)
    finally:
        inp.write_bytes(original)
    assert run_refine(cfg).shards_run == 0  # the same bytes again (a new mtime): resumes
