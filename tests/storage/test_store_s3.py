"""The refine store on S3 (a real S3 API server): data objects first, the marker last; a shard whose commit was cut
off between its data and its marker is not committed and is simply written again."""

import pyarrow as pa

from crv_ray import storage
from crv_ray.refine.store import DATASETS, RefineStore, refine_store_of


def tables(shard: int, n: int = 3) -> dict[str, pa.Table]:
    return {name: pa.table({"problem_id": [f"{name}-{shard}-{i}" for i in range(n)]}) for name in DATASETS}


def test_commit_and_resume_on_s3(s3_server):
    run = s3_server.uri("store/run")
    storage.rmtree(run)
    store = RefineStore(run)
    store.write_state({"shards": [{"shard": 0}, {"shard": 1}]})
    assert store.read_state() == {"shards": [{"shard": 0}, {"shard": 1}]}
    store.commit_shard(0, tables(0), {"shard": 0})
    assert store.is_done(0) and store.done_info(0) == {"shard": 0}
    # Killed between the data objects and the marker: the data is there, the shard is not committed.
    for name in DATASETS:
        storage.write_table(tables(1, n=1)[name], store.paths.refine_shard_file(name, 1))
    assert not store.is_done(1)
    assert store.committed_shards() == ([0], 2)
    assert [str(f) for f in store.committed_files("sft")] == [f"{run}/refine/sft/shard-00000.parquet"]
    assert refine_store_of(f"{run}/refine/sft").root == store.root
    # The rerun writes the shard again, over the half-written objects.
    store.commit_shard(1, tables(1), {"shard": 1})
    assert store.committed_shards() == ([0, 1], 2)
    assert storage.read_table(store.paths.refine_shard_file("sft", 1)).num_rows == 3
    # No temporary names on object storage: exactly the data objects and markers.
    keys = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert keys == ["_work/done/shard-00000.json", "_work/done/shard-00001.json", "_work/state.json",
                    *[f"{n}/shard-0000{s}.parquet" for n in ("errors", "pairs", "sft", "trace") for s in (0, 1)]]
    store.reset()
    assert store.read_state() is None and not [p for p in store.root.rglob("*") if p.is_file()]
