"""Commits are durable (file and folder fsynced before a file counts) and a full disk fails one shard, keeping
every committed one; readers see committed shards only."""

import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import crv_ray.refine.store as store_mod
from crv_ray.refine.store import DATASETS, RefineStore, StoreWriteError, refine_store_of, write_text_atomic


def tables(shard: int, n: int = 3) -> dict[str, pa.Table]:
    return {name: pa.table({"problem_id": [f"{name}-{shard}-{i}" for i in range(n)]}) for name in DATASETS}


def commit(store: RefineStore, shard: int) -> None:
    store.commit_shard(shard, tables(shard), {name: 3 for name in DATASETS} | {"shard": shard})


def shard_files(store: RefineStore, shard: int) -> list[Path]:
    return [store.dataset_dir(n) / f"shard-{shard:05d}.parquet" for n in DATASETS]


def leftovers(store: RefineStore) -> list[Path]:
    return [p for p in store.root.rglob("*.tmp")]


def test_files_and_folders_are_fsynced_before_they_count(tmp_path, monkeypatch):
    store = RefineStore(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    commit(store, 0)
    finals = [str(p) for p in shard_files(store, 0)] + [str(store.done_marker(0))]
    assert [e for e in events if e[0] == "replace"] == [("replace", f) for f in finals]  # the marker last
    for f in finals:
        i = events.index(("replace", f))
        # before the rename: the temporary file itself; after it: the folder holding the new name
        assert events[i - 1][0] == "fsync" and Path(events[i - 1][1]).name.startswith(f".{Path(f).name}.")
        assert events[i + 1] == ("fsync", str(Path(f).parent))
    assert store.is_done(0) and not leftovers(store)


def _full_disk_on(monkeypatch, dataset: str):
    real = store_mod.pq.write_table

    def write_table(table, where, *a, **k):
        if Path(where).parent.name == dataset:
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, *a, **k)

    monkeypatch.setattr(store_mod.pq, "write_table", write_table)


def test_full_disk_fails_the_shard_and_keeps_committed_ones(tmp_path, monkeypatch):
    store = RefineStore(tmp_path)
    store.write_state({"shards": [{"shard": s, "rows": 3} for s in range(3)]})
    commit(store, 0)
    commit(store, 1)
    before = {p: p.read_bytes() for s in (0, 1) for p in shard_files(store, s) + [store.done_marker(s)]}
    _full_disk_on(monkeypatch, "pairs")  # the third of the four datasets
    with pytest.raises(StoreWriteError) as err:
        commit(store, 2)
    msg = str(err.value)
    assert "shard 2 was not committed" in msg and "the disk is full" in msg
    assert str(store.dataset_dir("pairs") / "shard-00002.parquet") in msg
    assert "Committed shards are kept" in msg
    # the failed shard leaves nothing (its trace and sft files written before the failure are removed) ...
    assert not any(p.exists() for p in shard_files(store, 2)) and not store.is_done(2)
    assert not leftovers(store)
    # ... and the committed ones are untouched
    assert {p: p.read_bytes() for p in before} == before
    assert store.committed_shards() == ([0, 1], 3)
    assert [p.name for p in store.committed_files("sft")] == ["shard-00000.parquet", "shard-00001.parquet"]
    monkeypatch.undo()
    commit(store, 2)  # space freed: the same shard commits
    assert store.committed_shards() == ([0, 1, 2], 3)
    assert pq.read_table(store.dataset_dir("pairs") / "shard-00002.parquet").num_rows == 3


def test_a_marker_whose_folder_sync_fails_is_not_left_behind(tmp_path, monkeypatch):
    """The marker's rename may land before its folder's fsync fails: the shard must not look committed."""
    store = RefineStore(tmp_path)
    real = store_mod._fsync_dir

    def fsync_dir(path):
        if path.name == "done":
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(store_mod, "_fsync_dir", fsync_dir)
    with pytest.raises(StoreWriteError, match="Input/output error"):
        commit(store, 0)
    assert not store.done_marker(0).exists() and not any(p.exists() for p in shard_files(store, 0))


def test_text_write_error_names_the_path(tmp_path, monkeypatch):
    real_open = open

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr("builtins.open", full_open)
    target = tmp_path / "refine" / "_work" / "state.json"
    with pytest.raises(StoreWriteError, match=f"could not write {target}: the disk is full"):
        write_text_atomic(target, json.dumps({"a": 1}))
    monkeypatch.undo()
    assert not target.exists() and not list(target.parent.iterdir())


def test_only_refine_dataset_folders_are_filtered(tmp_path):
    store = RefineStore(tmp_path / "run")
    store.write_state({"shards": [{"shard": 0, "rows": 3}, {"shard": 1, "rows": 3}]})
    commit(store, 0)
    # shard 1's file exists but its marker does not (a run in progress, or killed mid-commit)
    pq.write_table(tables(1)["sft"], store.dataset_dir("sft") / "shard-00001.parquet")
    assert refine_store_of(store.dataset_dir("sft")).root == store.root
    assert refine_store_of(tmp_path / "elsewhere" / "sft") is None
    assert refine_store_of(store.work) is None

    from crv_ray.train.data import list_parquet_files

    assert [p.name for p in list_parquet_files(store.dataset_dir("sft"))] == ["shard-00000.parquet"]
    other = tmp_path / "plain"
    other.mkdir()
    for i in range(2):
        pq.write_table(tables(i)["sft"], other / f"part-{i}.parquet")
    assert len(list_parquet_files(other)) == 2  # any other folder: every file, as before
    empty = RefineStore(tmp_path / "run2")
    empty.write_state({"shards": [{"shard": 0, "rows": 3}]})
    empty.dataset_dir("sft").mkdir(parents=True)
    pq.write_table(tables(0)["sft"], empty.dataset_dir("sft") / "shard-00000.parquet")  # no marker
    with pytest.raises(ValueError, match="no committed refine shard"):
        list_parquet_files(empty.dataset_dir("sft"))
