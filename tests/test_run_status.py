"""`crv-ray status` on a run directory built by a real scripted refine, then by markers as each later stage leaves
them."""

import json
from pathlib import Path

import pytest

from crv_ray.cli import main
from crv_ray.config import load_config
from crv_ray.refine.runner import run_refine
from crv_ray.run_paths import RunPaths
from crv_ray.run_status import run_status

ROOT = Path(__file__).resolve().parents[1]


def states(status: dict) -> dict:
    return {stage: e["state"] for stage, e in status.items()}


@pytest.fixture(scope="module")
def refined(ray_local, tmp_path_factory):
    """tiny_scripted's refine (12 synthetic problems, 2 shards of 6), stopped after its first shard."""
    run_dir = tmp_path_factory.mktemp("status") / "run"
    cfg = load_config(ROOT / "jobs" / "configs" / "tiny_scripted.yaml",
                      [f"run_dir={run_dir}", "refine.max_shards_per_run=1"])
    run_refine(cfg)
    partial = run_status(run_dir, list(cfg.train.cogpo_variants))
    run_refine(cfg)  # the second shard
    return cfg, run_dir, partial


def test_nothing_run_is_all_missing(tmp_path):
    status = run_status(tmp_path / "not-yet", ["dpo"])
    assert set(states(status).values()) == {"missing"}
    assert list(status) == ["refine", "sft", "cogpo", "variant dpo", "eval", "report"]


def test_refine_partial_then_done(refined):
    cfg, run_dir, partial = refined
    assert partial["refine"] == {"state": "partial", "detail": "1 of 2 shards committed"}
    status = run_status(run_dir, ["dpo"])
    manifest = json.loads((run_dir / "refine" / "manifest.json").read_text())["reconciliation"]
    assert status["refine"] == {"state": "done", "detail": f"2 of 2 shards committed ({manifest['sft_rows']} sft, "
                                                           f"{manifest['pairs_rows']} pairs, "
                                                           f"{manifest['errors_rows']} errors)"}
    assert states(status) == {"refine": "done", "sft": "missing", "cogpo": "missing",
                              "variant dpo": "missing", "eval": "missing", "report": "missing"}
    # A commit marker lost (a shard whose commit never finished) makes it partial again.
    marker = RunPaths(run_dir).refine_done_marker(1)
    saved = marker.read_bytes()
    marker.unlink()
    try:
        assert run_status(run_dir)["refine"] == {"state": "partial", "detail": "1 of 2 shards committed"}
    finally:
        marker.write_bytes(saved)


def test_later_stages_from_their_markers(refined, tmp_path, capsys):
    _, refined_dir, _ = refined
    run_dir = tmp_path / "run"
    paths = RunPaths(run_dir)
    # The refine outputs as they are, the later stages as each leaves its folder mid-way and when done.
    run_dir.mkdir()
    (run_dir / "refine").symlink_to(refined_dir / "refine", target_is_directory=True)
    paths.sft.mkdir(parents=True)
    (paths.sft / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (paths.sft / "checkpoints" / "sft-abc").mkdir(parents=True)
    assert run_status(run_dir)["sft"] == {
        "state": "partial", "detail": "no exported model yet (2 logged steps, checkpoints kept); rerun to resume"}
    paths.model("sft").mkdir()
    (paths.model("sft") / "crv_ray_train.json").write_text("{}")
    (paths.stage_dir("dpo")).mkdir(parents=True)  # a variant folder not in the config is listed too
    (paths.eval / "sft" / "gsm8k").mkdir(parents=True)
    (paths.eval / "sft" / "gsm8k" / "done.json").write_text("{}")
    status = run_status(run_dir)
    assert states(status) == {"refine": "done", "sft": "done", "cogpo": "missing",
                              "variant dpo": "partial", "eval": "partial", "report": "missing"}
    assert status["eval"]["detail"] == "1 (model, benchmark) pairs done, summary.json not written yet"
    (paths.eval / "summary.json").write_text(json.dumps({"results": [{}, {}]}))
    paths.report.write_text("<html>")
    status = run_status(run_dir)
    assert status["eval"] == {"state": "done", "detail": "2 (model, benchmark) results in summary.json"}
    assert status["report"]["state"] == "done"

    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"run {run_dir}"
    assert [line.split()[:2] for line in out[1:]] == [
        ["refine", "done"], ["sft", "done"], ["cogpo", "missing"], ["variant", "dpo"],
        ["eval", "done"], ["report", "done"]]
    assert main(["status", str(tmp_path / "typo")]) == 2
    assert "no such run directory or config file" in capsys.readouterr().err
