"""`crv-ray submit`: the job it builds (entrypoint, runtime env without secrets, notes), then real jobs on a real
`ray start --head` cluster: the tiny config end to end exits 0, a failing job exits non-zero with its error."""

import json
import os
from pathlib import Path

import pytest
import yaml

from crv_ray.cli import main
from crv_ray.submit import build_job, env_references, job_address

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny_scripted.yaml"


def test_address_from_flag_else_env_else_error_naming_both(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert job_address("http://other:8265") == "http://other:8265"
    assert job_address(None) == "http://head:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match=r"--address.*RAY_ADDRESS"):
        job_address(None)
    assert main(["submit", str(TINY)]) == 2


def test_job_holds_the_config_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SECRET_URL", "https://user:hunter2@llm.example")
    monkeypatch.delenv("UNSET_ON_THIS_MACHINE", raising=False)
    raw = yaml.safe_load(TINY.read_text())
    raw["run_dir"] = "/shared/runs/tiny"
    raw["engines"]["judge"] = {"kind": "openai", "model": "m", "base_url": "${MY_SECRET_URL}",
                               "api_key_env": "JUDGE_KEY"}
    raw["student"]["name"] = "${UNSET_ON_THIS_MACHINE}"  # may exist only on the cluster: still validates here
    config = tmp_path / "conf dir" / "my run.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(raw))
    staging = tmp_path / "staging"
    staging.mkdir()
    job = build_job(config, ["refine.shard_size=3"], pip=["math-verify"], staging=staging)
    assert job.entrypoint == "crv-ray run 'my run.yaml' --set refine.shard_size=3"
    assert job.runtime_env == {"working_dir": str(staging), "pip": ["math-verify"]}
    assert (staging / "my run.yaml").read_text() == config.read_text()  # the ${...} references travel unexpanded
    assert "hunter2" not in json.dumps(job.runtime_env) + job.entrypoint
    assert set(env_references(raw)) == {"MY_SECRET_URL", "UNSET_ON_THIS_MACHINE"}
    (note,) = job.notes
    assert "they are not sent with the job" in note
    assert all(name in note for name in ("MY_SECRET_URL", "UNSET_ON_THIS_MACHINE", "JUDGE_KEY"))
    assert "Secret" in note
    with pytest.raises(ValueError, match=r"--set engines.judge.api_key=...: a secret would be visible"):
        build_job(config, ["engines.judge.api_key=sk-123"], staging=staging)


def test_working_dir_must_hold_the_config_and_relative_paths_are_named(tmp_path):
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    raw = yaml.safe_load(TINY.read_text())
    raw["input"] = {"source": "file", "path": "data/problems.jsonl"}
    config = work / "configs" / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    job = build_job(config, [], working_dir=work, image_uri="registry/crv-ray:cpu")
    assert job.entrypoint == "crv-ray run configs/run.yaml"
    assert job.runtime_env == {"working_dir": str(work.resolve()), "excludes": [".git", ".venv", "__pycache__"],
                               "image_uri": "registry/crv-ray:cpu"}
    assert any("run_dir runs/tiny_scripted is relative" in n for n in job.notes)
    assert any("input.path data/problems.jsonl is relative and not in the uploaded working dir" in n
               for n in job.notes)
    (work / "data").mkdir()
    (work / "data" / "problems.jsonl").write_text("{}\n")
    assert not any("input.path" in n for n in build_job(config, [], working_dir=work).notes)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="is not inside --working-dir"):
        build_job(config, [], working_dir=tmp_path / "elsewhere")


def test_bad_config_fails_before_submitting(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("shard_size: 6", "shard_size: -1"))
    assert main(["submit", str(bad), "--address", "http://127.0.0.1:9"]) == 2
    assert "refine.shard_size" in capsys.readouterr().err


@pytest.mark.slow
def test_failing_job_exits_nonzero_with_its_error(ray_head, tmp_path, capfd):
    missing = tmp_path / "nowhere" / "problems.jsonl"
    code = main(["submit", str(TINY), "--address", ray_head["dashboard"], "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", "input.source=file", "--set", f"input.path={missing}"])
    out, err = capfd.readouterr()
    assert code == 1, (out[-3000:], err[-3000:])
    assert str(missing) in out, (out[-3000:], err[-3000:])  # the job's own error, streamed from its logs
    assert "FAILED" in err and "crv-ray run tiny_scripted.yaml" in out


@pytest.mark.slow
def test_tiny_run_as_a_job_end_to_end(ray_head, tmp_path, capfd):
    """refine -> sft -> cogpo as a Ray job (eval and the DPO variant off: test_run_e2e runs them),
    then `crv-ray status` reads the finished run."""
    run_dir = tmp_path / "run"
    code = main(["submit", str(TINY), "--address", ray_head["dashboard"], "--set", f"run_dir={run_dir}",
                 "--set", "eval.enabled=false", "--set", "train.cogpo_variants={}"])
    out, err = capfd.readouterr()
    assert code == 0, (out[-4000:], err[-2000:])
    assert "SUCCEEDED" in out and "[run] done" in out
    assert "joining the Ray cluster at" in out and "(from RAY_ADDRESS)" in out  # the job ran on the cluster
    assert (run_dir / "cogpo" / "model" / "crv_ray_train.json").is_file()
    assert main(["status", str(run_dir)]) == 0
    status = capfd.readouterr().out
    for stage in ("refine", "sft", "cogpo"):
        assert any(line.split()[:2] == [stage, "done"] for line in status.splitlines()), status
    assert "2 of 2 shards committed" in status
