"""On-disk layout of a refine run and atomic commits, so a killed run loses no finished shard and a rerun resumes.

    <run_dir>/refine/
      trace/ sft/ pairs/ errors/    shard-NNNNN.parquet, one file per shard and dataset
      manifest.json
      _work/state.json              config hash, input fingerprint, shard list
      _work/input/                  ingested shards (working rows)
      _work/stages/<stage>/         per-stage outputs (staged mode)
      _work/done/shard-NNNNN.json   commit marker: written last, after the four datasets
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATASETS = ("trace", "sft", "pairs", "errors")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


class RefineStore:
    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / "refine"
        self.work = self.root / "_work"

    # -- paths
    def dataset_dir(self, name: str) -> Path:
        return self.root / name

    def input_file(self, shard: int) -> Path:
        return self.work / "input" / f"{shard_name(shard)}.parquet"

    def stage_file(self, stage: str, shard: int) -> Path:
        return self.work / "stages" / stage / f"{shard_name(shard)}.parquet"

    def done_marker(self, shard: int) -> Path:
        return self.work / "done" / f"{shard_name(shard)}.json"

    @property
    def state_path(self) -> Path:
        return self.work / "state.json"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # -- state
    def read_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text())

    def write_state(self, state: dict) -> None:
        write_text_atomic(self.state_path, json.dumps(state, indent=2, sort_keys=True))

    def reset(self) -> None:
        """Remove every refine output (used when the config changed and the user asked to restart)."""
        for name in (*DATASETS, "_work"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        self.manifest_path.unlink(missing_ok=True)

    def is_done(self, shard: int) -> bool:
        return self.done_marker(shard).exists()

    def done_info(self, shard: int) -> dict:
        return json.loads(self.done_marker(shard).read_text())

    def commit_shard(self, shard: int, tables: dict[str, pa.Table], info: dict) -> None:
        """Write each dataset's shard file atomically, then the marker; a crash before the marker re-runs the shard."""
        for name in DATASETS:
            write_parquet_atomic(self.dataset_dir(name) / f"{shard_name(shard)}.parquet", tables[name])
        write_text_atomic(self.done_marker(shard), json.dumps(info, sort_keys=True))


def _tmp_in(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    tmp = _tmp_in(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp_in(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
