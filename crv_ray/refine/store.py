"""Atomic commits of the refine stage's shards, so a killed run loses no finished shard and a rerun resumes.

The folders and files are laid out by crv_ray.run_paths (`<run_dir>/refine/`: trace/ sft/ pairs/ errors/ with one
shard-NNNNN.parquet per shard and dataset, manifest.json, and _work/ with state.json, the ingested input, staged-mode
stage outputs and the commit markers _work/done/shard-NNNNN.json, each holding the shard's row counts and trace
summary: what the manifest adds up).

On local disk every file is written to a temporary name, fsynced, renamed into place and its folder fsynced. On
object storage (a `s3://...` run_dir, crv_ray.storage) there is no rename, but each object is one atomic PUT: it
is written in place. Either way the data files come first and the marker last, and a shard counts as committed
once its marker exists: readers (training) take only committed shards' files (`committed_files`).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from crv_ray import storage
from crv_ray.run_paths import REFINE_DATASETS as DATASETS
from crv_ray.run_paths import RunPaths
from crv_ray.storage import AnyPath


class RefineStore:
    def __init__(self, run_dir: str | AnyPath):
        self.paths = RunPaths(run_dir)
        self.root = self.paths.refine
        self.work = self.paths.refine_work

    # -- paths
    def dataset_dir(self, name: str) -> AnyPath:
        return self.paths.refine_dataset(name)

    def input_file(self, shard: int) -> AnyPath:
        return self.paths.refine_input_file(shard)

    def stage_file(self, stage: str, shard: int) -> AnyPath:
        return self.paths.refine_stage_file(stage, shard)

    def done_marker(self, shard: int) -> AnyPath:
        return self.paths.refine_done_marker(shard)

    @property
    def state_path(self) -> AnyPath:
        return self.paths.refine_state

    @property
    def manifest_path(self) -> AnyPath:
        return self.paths.refine_manifest

    # -- state
    def read_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text())

    def write_state(self, state: dict) -> None:
        write_text_atomic(self.state_path, json.dumps(state, indent=2, sort_keys=True))

    def reset(self) -> None:
        """Remove every refine output (used when the config changed and the user asked to restart)."""
        for folder in (*map(self.dataset_dir, DATASETS), self.work):
            storage.rmtree(folder)
        self.manifest_path.unlink(missing_ok=True)

    def is_done(self, shard: int) -> bool:
        return self.done_marker(shard).exists()

    def done_info(self, shard: int) -> dict:
        return json.loads(self.done_marker(shard).read_text())

    def commit_shard(self, shard: int, tables: dict[str, pa.Table], info: dict) -> None:
        """Write each dataset's shard file atomically (fsynced), then the marker; a crash before the marker re-runs
        the shard. A failed write (e.g. a full disk) removes this shard's files again and raises StoreWriteError;
        other shards' files are never touched."""
        written: list[AnyPath] = []
        try:
            for name in DATASETS:
                path = self.paths.refine_shard_file(name, shard)
                write_parquet_atomic(path, tables[name])
                written.append(path)
            write_text_atomic(self.done_marker(shard), json.dumps(info, sort_keys=True))
        except StoreWriteError as e:
            # Not committed: leave no file a reader could take for data (the marker too: its rename may have
            # happened before the folder's fsync failed).
            for path in [*written, self.done_marker(shard)]:
                path.unlink(missing_ok=True)
            raise StoreWriteError(f"shard {shard} was not committed: {e}. Committed shards are kept; free space "
                                  "and rerun to resume from this shard.") from e

    # -- what a reader may use
    def committed_shards(self) -> tuple[list[int], int]:
        """(committed shard numbers, number of shards the input was cut into); ([], 0) before any ingest."""
        state = self.read_state() or {}
        shards = [s["shard"] for s in state.get("shards", [])]
        return [s for s in shards if self.is_done(s)], len(shards)

    def committed_files(self, name: str) -> list[AnyPath]:
        """The dataset's shard files whose commit marker exists; a file whose marker is missing may be half of an
        interrupted commit."""
        done, _ = self.committed_shards()
        files = [self.paths.refine_shard_file(name, s) for s in done]
        return [f for f in files if f.is_file()]


def refine_store_of(dataset_dir: str | AnyPath) -> RefineStore | None:
    """The RefineStore a folder such as <run_dir>/refine/sft belongs to, or None for any other folder."""
    dataset_dir = storage.as_path(dataset_dir)
    if dataset_dir.name not in DATASETS:
        return None
    store = RefineStore(dataset_dir.parent.parent)
    return store if store.root == dataset_dir.parent and store.state_path.is_file() else None


class StoreWriteError(RuntimeError):
    """A refine file could not be written (a full disk, a read-only or vanished folder). Committed shards stay."""


def _tmp_in(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the folder's entry is on disk.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: AnyPath, write, write_remote) -> None:
    """Write through `write(tmp_path)`, fsync the file, rename it into place and fsync the folder: a crash or power
    loss leaves the old file or the new one, never a torn one. On object storage `write_remote()` writes the object
    in place (a PUT is atomic). An OSError becomes a StoreWriteError naming the path (the temporary file is
    removed)."""
    if isinstance(path, storage.RemotePath):
        try:
            return write_remote()
        except OSError as e:
            raise StoreWriteError(f"could not write {path}: {e}") from e
    tmp = None
    try:
        tmp = _tmp_in(path)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise StoreWriteError(f"could not write {path}: {reason} ({type(e).__name__}: {e})") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet_atomic(path: str | AnyPath, table: pa.Table) -> None:
    path = storage.as_path(path)
    _write_atomic(path, lambda tmp: pq.write_table(table, tmp), lambda: storage.write_table(table, path))


def write_text_atomic(path: str | AnyPath, text: str) -> None:
    path = storage.as_path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _write_atomic(path, write, lambda: path.write_text(text))
