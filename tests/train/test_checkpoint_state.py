"""Trainer state and RNG files of a checkpoint: JSON and weights-only tensors, never a pickle (no Ray needed)."""

import json
import pickle
import random

import numpy as np
import pytest
import torch

from crv_ray.train.checkpoint import (
    OLD_TRAINER_STATE, TRAINER_STATE, OldCheckpointError, read_state_files, rng_file, write_state_files,
)
from crv_ray.train.distributed import rng_state, set_rng_state


def _scheduler(steps: int):
    from transformers import get_scheduler

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), np.random.randn(), torch.rand(3).tolist()


def test_state_round_trip_restores_scheduler_and_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    scheduler = _scheduler(3)
    write_state_files(tmp_path, 0, scheduler.state_dict(), {"global_step": 3, "config_hash": "abc"}, rng_state())
    expected = _draws()

    on_disk = json.loads((tmp_path / TRAINER_STATE).read_text())
    assert on_disk["global_step"] == 3 and on_disk["config_hash"] == "abc" and on_disk["scheduler"]["last_epoch"] == 3
    torch.load(tmp_path / rng_file(0), weights_only=True)  # no pickled object in it

    train_state, rng = read_state_files(tmp_path, 0)
    set_rng_state(rng)
    assert _draws() == expected
    fresh = _scheduler(0)
    fresh.load_state_dict(train_state.pop("scheduler"))
    assert fresh.get_last_lr() == scheduler.get_last_lr() and fresh.last_epoch == 3
    assert train_state == {"global_step": 3, "config_hash": "abc"}


def test_rank_without_rng_file(tmp_path):
    write_state_files(tmp_path, 0, {}, {"global_step": 1}, rng_state())
    assert read_state_files(tmp_path, 1) == ({"scheduler": {}, "global_step": 1}, None)


class _RunsCode:
    def __reduce__(self):
        return (open, (str(_RunsCode.marker), "w"))


def test_old_pickle_checkpoint_is_refused_unread(tmp_path):
    ckpt = tmp_path / "checkpoints" / "sft-abc" / "checkpoint_step00000004"
    ckpt.mkdir(parents=True)
    _RunsCode.marker = tmp_path / "code-ran"
    (ckpt / OLD_TRAINER_STATE).write_bytes(pickle.dumps({"global_step": 4, "x": _RunsCode()}))
    with pytest.raises(OldCheckpointError) as e:
        read_state_files(ckpt, 0)
    msg = str(e.value)
    assert str(ckpt) in msg and OLD_TRAINER_STATE in msg and f"Delete {ckpt.parent}" in msg
    assert not _RunsCode.marker.exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(OldCheckpointError, match=f"has no {TRAINER_STATE}"):
        read_state_files(tmp_path, 0)


class _Storage:
    """Ray Train's StorageContext, as far as `write_and_report` uses it."""

    def __init__(self, fs, root: str):
        self.storage_filesystem, self.root = fs, root

    def build_checkpoint_path_from_name(self, name: str) -> str:
        return f"{self.root}/{name}"


def _reports(monkeypatch, storage) -> list[dict]:
    """ray.train's context and report, recording what each report carried (and the files there at that moment)."""
    import os
    from types import SimpleNamespace

    import ray.train

    out: list[dict] = []
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_storage=lambda: storage))

    def report(metrics, checkpoint=None, checkpoint_dir_name=None,
               checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC):
        out.append({"metrics": metrics, "path": checkpoint.path, "files": sorted(os.listdir(checkpoint.path)),
                    "name": checkpoint_dir_name, "mode": checkpoint_upload_mode})

    monkeypatch.setattr(ray.train, "report", report)
    return out


def test_checkpoint_on_a_filesystem_path_is_written_in_place(tmp_path, monkeypatch):
    import pyarrow.fs
    import ray.train

    from crv_ray.train.checkpoint import write_and_report

    reports = _reports(monkeypatch, _Storage(pyarrow.fs.LocalFileSystem(), str(tmp_path / "exp")))
    # A part left by a run that died mid-write at this step: never reported, overwritten by the next save.
    target = tmp_path / "exp" / "checkpoint_step00000007"
    target.mkdir(parents=True)
    (target / "__0_0.distcp").write_text("half")
    seen = []

    def write(d):
        seen.append(d)
        (d / "__0_0.distcp").write_text("whole")

    write_and_report(7, {"loss": 1.5}, write)
    assert seen == [target]  # no temporary directory: Ray Train registers the files where they are
    assert (target / "__0_0.distcp").read_text() == "whole"
    assert reports == [{"metrics": {"loss": 1.5}, "path": str(target), "files": ["__0_0.distcp"],
                        "name": "checkpoint_step00000007", "mode": ray.train.CheckpointUploadMode.NO_UPLOAD}]


def test_checkpoint_on_object_storage_goes_through_a_temporary_directory(tmp_path, monkeypatch):
    import pyarrow.fs
    import ray.train

    from crv_ray.train.checkpoint import write_and_report

    # Any filesystem but a local one (S3 in tests/storage): Ray Train uploads a local directory.
    reports = _reports(monkeypatch, _Storage(pyarrow.fs._MockFileSystem(), "bucket/exp"))
    seen = []

    def write(d):
        seen.append(d)
        (d / "__0_0.distcp").write_text("whole")

    write_and_report(3, {}, write)
    (report,) = reports
    assert report["path"] == str(seen[0]) and report["files"] == ["__0_0.distcp"]
    assert report["name"] == "checkpoint_step00000003" and report["mode"] == ray.train.CheckpointUploadMode.SYNC
    assert not seen[0].exists()  # removed once Ray Train has uploaded it
