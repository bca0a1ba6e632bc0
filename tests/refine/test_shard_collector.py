"""The driver side of refine's result collection: workers spill rows per shard and return keys; the collector
commits a shard once every problem has every copy, each copy once, and holds no rows itself."""

from __future__ import annotations

import pyarrow as pa

from crv_ray.refine.pipeline import ShardCollector, spill_rows
from crv_ray.refine.state import state_schema
from crv_ray.run_paths import shard_name

SCHEMA = state_schema(1)


def rows(shard: int, pid: str, copies: int, indexes=None) -> list[dict]:
    idx = list(range(copies)) if indexes is None else indexes
    return [{"shard": shard, "problem_id": pid, "sample_index": i if copies > 1 else None, "sample_copies": copies,
             "cot": f"{pid}-{i}"} for i in idx]


def batch(items: list[dict]) -> pa.Table:
    # Like Ray Data's blocks: only some columns, the rest missing.
    return pa.Table.from_pylist(items)


def test_a_shard_commits_once_when_every_copy_arrived_and_duplicates_count_once(tmp_path):
    committed: dict[int, dict] = {}
    collector = ShardCollector({0: 2, 1: 1}, lambda s, by: committed.setdefault(s, by), tmp_path / "spill")

    def send(items):
        collector.add_keys(spill_rows(batch(items), SCHEMA, str(tmp_path / "spill")))

    send(rows(0, "a", 2, [0]) + rows(1, "c", 1))  # two shards in one block; shard 1 completes
    assert list(committed) == [1] and [r["cot"] for r in committed[1]["c"]] == ["c-0"]
    assert not (tmp_path / "spill" / shard_name(1)).exists()  # read back and removed
    send(rows(0, "a", 2, [0]))  # a retried task wrote copy 0 again
    send(rows(0, "b", 1))
    assert 0 not in committed and collector.incomplete() == [0]
    send(rows(0, "a", 2, [1]))
    assert sorted(r["cot"] for r in committed[0]["a"]) == ["a-0", "a-1"]  # the duplicate is read once
    assert [r["cot"] for r in committed[0]["b"]] == ["b-0"]
    assert set(committed[0]["a"][0]) == set(SCHEMA.names)  # missing columns come back as nulls of the schema
    assert collector.incomplete() == []


def test_stale_spill_of_a_killed_run_is_cleared(tmp_path):
    spill = tmp_path / "spill"
    spill_rows(batch(rows(0, "a", 1)), SCHEMA, str(spill))  # a killed run's part of shard 0
    committed: dict[int, dict] = {}
    collector = ShardCollector({0: 1}, lambda s, by: committed.setdefault(s, by), spill)
    assert not (spill / shard_name(0)).exists()
    collector.add_keys(spill_rows(batch(rows(0, "a", 1)), SCHEMA, str(spill)))
    assert len(committed[0]["a"]) == 1
