"""`crv-ray train` reads only committed refine shards and refuses an unfinished refine unless --allow-partial."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crv_ray.cli import build_parser, main
from crv_ray.config import load_config_dict
from crv_ray.refine.store import DATASETS, RefineStore
from crv_ray.stages import check_refine_complete, stage_paths
from crv_ray.train.data import list_parquet_files, validate_files


def sft_table(shard: int) -> pa.Table:
    return pa.table({"prompt": [f"Solve {shard}-{i}" for i in range(3)],
                     "response": [f"Answer \\boxed{{{i}}}" for i in range(3)]})


@pytest.fixture
def partial_run(tmp_path):
    """3 shards: 0 and 1 committed; 2 has its sft file but no marker (killed mid-commit, or still running)."""
    raw = {"run_dir": str(tmp_path / "run"),
           "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
           "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"},
                       "student": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}}}
    cfg = load_config_dict(raw)
    store = RefineStore(cfg.run_dir)
    store.write_state({"shards": [{"shard": s, "rows": 3} for s in range(3)], "ingested": True})
    for shard in (0, 1):
        tables = {name: sft_table(shard) for name in DATASETS}
        store.commit_shard(shard, tables, {name: 3 for name in DATASETS} | {"shard": shard})
    pq.write_table(sft_table(2), store.dataset_dir("sft") / "shard-00002.parquet")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(raw))
    return cfg, store, cfg_path


def test_training_files_are_the_committed_shards(partial_run):
    cfg, store, _ = partial_run
    files = list_parquet_files(stage_paths(cfg)["sft_data"], "sft dataset")
    assert [f.name for f in files] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert validate_files(files, "sft") == 6  # 2 shards x 3 rows; shard 2's rows are not read


def test_an_incomplete_refine_is_refused_unless_allowed(partial_run, capsys):
    cfg, store, _ = partial_run
    with pytest.raises(ValueError, match=r"incomplete: 2 of 3 shards committed.*--allow-partial"):
        check_refine_complete(cfg)
    check_refine_complete(cfg, allow_partial=True)
    assert "training on the committed shards only" in capsys.readouterr().out
    store.commit_shard(2, {name: sft_table(2) for name in DATASETS}, {name: 3 for name in DATASETS} | {"shard": 2})
    check_refine_complete(cfg)  # complete now: no error, no warning
    assert capsys.readouterr().out == ""


def test_cli_train_refuses_with_a_clear_error(partial_run, capsys):
    _, _, cfg_path = partial_run
    assert main(["train", "sft", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "incomplete: 2 of 3 shards committed" in err and "--allow-partial" in err
    assert build_parser().parse_args(["train", "cogpo", "--allow-partial"]).allow_partial is True
    assert build_parser().parse_args(["train", "cogpo"]).allow_partial is False
