"""A scripted-engine refine run with its input and run_dir on S3 (a real S3 API server), on the real Ray local
cluster: a partial run, a resume that skips the committed shards, counts that reconcile, `crv-ray status` and the
report read from the URI. Nothing is written to local disk under the run's name."""

import json

import pytest

from crv_ray import storage
from crv_ray.cli import main
from crv_ray.refine.runner import run_refine
from crv_ray.refine.store import RefineStore
from crv_ray.run_status import run_status
from crv_ray.storage import RemotePath

from test_refine_scripted import CASES, make_cfg, write_cases  # tests/ is on sys.path (its conftest)


@pytest.fixture
def s3_cfg(s3_server, tmp_path):
    root = s3_server.uri("refine-e2e")
    storage.rmtree(root)
    write_cases(tmp_path / "in.jsonl", bad_lines=True)
    storage.copy_file(tmp_path / "in.jsonl", f"{root}/input/in.jsonl")

    def make(**over):
        cfg = make_cfg(tmp_path, mode="staged", **over)
        return cfg.model_copy(update={"run_dir": storage.as_path(f"{root}/run"),
                                      "input": cfg.input.model_copy(update={"path": f"{root}/input/in.jsonl"})})

    return make


def test_refine_on_s3_resumes_from_committed_shards(ray_local, s3_cfg, capsys):
    first = run_refine(s3_cfg(refine={"max_shards_per_run": 2}))
    assert isinstance(first.run_dir, RemotePath)
    assert first.shards_run == 2 and not first.manifest["reconciliation"]["complete"]
    store = RefineStore(first.run_dir)
    assert store.committed_shards() == ([0, 1], 4)
    # Staged mode's per-stage outputs live on S3 too.
    stages = store.work / "stages"
    assert [p.name for p in stages.iterdir()][0].startswith("00-") and any(stages.rglob("shard-00000.parquet"))
    assert run_status(first.run_dir)["refine"] == {"state": "partial", "detail": "2 of 4 shards committed"}

    second = run_refine(s3_cfg(refine={"mode": "streaming"}))  # the mode is not part of the config hash
    assert second.shards_skipped == 2 and second.shards_run == 2
    m = json.loads(store.manifest_path.read_text())
    rec = m["reconciliation"]
    rows_in = len(CASES) + 2  # two bad input lines
    assert rec["rows_in"] == rows_in and rec["trace_rows"] == rows_in and rec["balanced"] and rec["complete"]
    assert rec["errors_rows"] == 2 == m["rows_quarantined_at_input"]  # quarantined, with their reasons
    trace = [r for f in store.committed_files("trace") for r in storage.read_table(f).to_pylist()]
    assert len(trace) == rows_in and len({r["problem_id"] for r in trace}) == rows_in
    errors = [r for f in store.committed_files("errors") for r in storage.read_table(f).to_pylist()]
    assert any("malformed JSON" in e["reason"] and "s3://" in e["reason"] for e in errors)
    assert run_status(first.run_dir)["refine"]["state"] == "done"
    assert main(["status", str(first.run_dir)]) == 0
    out = capsys.readouterr().out
    assert str(first.run_dir) in out and "4 of 4 shards committed" in out
    assert run_refine(s3_cfg()).shards_run == 0

    from crv_ray.report import write_report

    report = write_report(first.run_dir)
    assert str(report) == f"{first.run_dir}/report.html" and "crv-ray run report" in report.read_text()
