"""crv_ray.storage against a real S3 API server (moto, the `s3_server` fixture): paths, reads and writes, local
copies, clear errors, and inputs read from a URI."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from crv_ray import storage
from crv_ray.config import load_config_dict
from crv_ray.storage import RemotePath, StorageError, as_path


def test_local_paths_stay_pathlib(tmp_path):
    assert as_path(str(tmp_path)) == tmp_path and isinstance(as_path(str(tmp_path)), Path)
    assert as_path(f"file://{tmp_path}/x") == tmp_path / "x"
    p = as_path("s3://bucket//run/")
    assert isinstance(p, RemotePath) and str(p) == "s3://bucket/run" and p.bucket == "bucket"
    assert str(p / "refine" / "trace") == "s3://bucket/run/refine/trace"
    assert (p / "a.parquet").stem == "a" and (p / "a.parquet").suffix == ".parquet"
    assert str((p / "a").parent) == "s3://bucket/run" and (p / "a" / "b").relative_to(p).as_posix() == "a/b"
    fs, key = storage.resolve(tmp_path / "f")
    assert key == str(tmp_path / "f") and type(fs).__name__ == "LocalFileSystem"
    # pyarrow's own file systems for the other stores, and their paths inside them (no request is made here).
    fs, key = storage.resolve("gs://bucket/run/x")
    assert type(fs).__name__ == "GcsFileSystem" and key == "bucket/run/x"
    azure = as_path("abfs://container@account.dfs.core.windows.net/run")
    fs, key = storage.resolve(azure / "x")
    assert type(fs).__name__ == "AzureFileSystem" and key == "container/run/x"
    assert azure._from_fs("container/run/y") == azure / "y"


def test_config_keeps_a_run_dir_uri(tmp_path):
    raw = {"run_dir": "s3://bucket/runs/a", "student": {"name": "T", "size": "1M", "model": "builtin:tiny"},
           "engines": {e: {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}
                       for e in ("agent", "student")}}
    cfg = load_config_dict(raw)
    assert isinstance(cfg.run_dir, RemotePath) and str(cfg.run_dir) == "s3://bucket/runs/a"
    assert cfg.model_dump(mode="json")["run_dir"] == "s3://bucket/runs/a"
    local = load_config_dict({**raw, "run_dir": str(tmp_path / "run")})
    assert local.run_dir == tmp_path / "run" and local.model_dump(mode="json")["run_dir"] == str(tmp_path / "run")


def test_cli_validate_and_status_take_uris(s3_server, tmp_path, capsys):
    from crv_ray.cli import main

    uri = s3_server.uri("cli/run")
    assert main(["validate", "--set", f"run_dir={uri}"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["run_dir"] == uri
    assert f"# run_dir: {uri}: pyarrow, Ray Data and Ray Train read AWS_ENDPOINT_URL" in out.err
    assert "all set here" in out.err and s3_server.env["AWS_SECRET_ACCESS_KEY"] not in out.err + out.out
    # The config itself may be read from the bucket too.
    engine = "{kind: scripted, function: 'crv_ray.testing:tagged_replies'}"
    as_path(f"{uri}/run.yaml").write_text(f"run_dir: {uri}\nstudent: {{name: t, size: 1M, model: builtin:tiny}}\n"
                                          f"engines: {{agent: {engine}, student: {engine}}}\n")
    assert main(["validate", f"{uri}/run.yaml"]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == uri
    assert main(["status", "s3://no-such-bucket/run"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    as_path(uri + "/refine/_work/state.json").write_text('{"shards": [{"shard": 0}], "ingested": true}')
    assert main(["status", uri]) == 0
    assert "0 of 1 shards committed" in capsys.readouterr().out


def test_files_folders_and_parquet_on_s3(s3_server):
    root = as_path(s3_server.uri("unit/files"))
    storage.rmtree(root)
    assert not root.exists()
    (root / "a" / "one.txt").write_text("hello\nworld\n")
    (root / "a" / "deep" / "two.json").write_text("{}")
    storage.write_table(pa.table({"x": [1, 2, 3]}), root / "t.parquet")
    assert root.is_dir() and (root / "a" / "one.txt").is_file() and not (root / "a").is_file()
    assert [p.name for p in root.iterdir()] == ["a", "t.parquet"]
    assert [p.name for p in root.glob("*.parquet")] == ["t.parquet"]
    assert [p.name for p in root.rglob("*.json")] == ["two.json"]
    assert [p.name for p in root.glob("*/*/two.json")] == ["two.json"]
    assert (root / "a" / "one.txt").stat().st_size == 12
    with (root / "a" / "one.txt").open("rb") as f:
        assert list(f) == [b"hello\n", b"world\n"]
    assert storage.read_table(root / "t.parquet").column("x").to_pylist() == [1, 2, 3]
    assert storage.parquet_file(root / "t.parquet").metadata.num_rows == 3
    # A local copy for readers that need files (models, memory-mapped data), reused while unchanged.
    local = storage.local_copy(root / "a")
    assert (local / "one.txt").read_text() == "hello\nworld\n" and (local / "deep" / "two.json").is_file()
    (local / "marker").write_text("still the same copy")
    assert storage.local_copy(root / "a") == local and (local / "marker").exists()
    (root / "a" / "one.txt").write_text("changed")
    assert (storage.local_copy(root / "a") / "one.txt").read_text() == "changed"
    assert not (local / "marker").exists()
    storage.upload_dir(local, root / "copy")
    assert sorted(p.relative_to(root / "copy").as_posix() for p in (root / "copy").rglob("*") if p.is_file()) == \
        ["deep/two.json", "one.txt"]
    storage.rmtree(root)
    assert not root.exists() and not (root / "a" / "one.txt").exists()


def test_missing_bucket_and_unreachable_endpoint_name_the_uri_and_env(s3_server, monkeypatch):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/run: .*does not exist.*AWS_ENDPOINT_URL"):
        storage.check_access("s3://no-such-bucket/run")
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x\.txt: the bucket 'no-such-bucket' does not exist"):
        as_path("s3://no-such-bucket/x.txt").write_text("x")
    # Another endpoint (nothing listens on port 9): a fresh file system reads the changed environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    storage._filesystem.cache_clear()
    try:
        with pytest.raises(StorageError, match=r"s3://crv-ray-test/x: the storage endpoint cannot be reached; set "
                                               r"AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID"):
            as_path(s3_server.uri("x")).exists()
    finally:
        storage._filesystem.cache_clear()


def test_input_and_fingerprint_read_from_s3(s3_server, tmp_path):
    from crv_ray.config import InputConfig
    from crv_ray.data.fingerprint import fingerprint_changes, input_fingerprint
    from crv_ray.data.input import read_problems

    folder = as_path(s3_server.uri("unit/input"))
    storage.rmtree(folder)
    rows = [{"id": f"q{i}", "problem": f"What is {i}+1?", "answer": str(i + 1), "cot": f"{i}+1={i + 1}"}
            for i in range(3)]
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + "{broken\n")
    storage.write_table(pa.Table.from_pylist(rows[2:]), folder / "b.parquet")
    jsonl = InputConfig(source="file", path=str(folder / "a.jsonl"), columns={"id": "id"})
    got = list(read_problems(jsonl))
    assert [r["problem_id"] for r in got if r["error"] is None] == ["q0", "q1"]
    assert [r["error"] for r in got if r["error"] is not None] == \
        [f"line 3 of {folder / 'a.jsonl'}: malformed JSON (Expecting property name enclosed in double quotes "
         "at column 2)"]
    parquet = InputConfig(source="file", path=str(folder), format="parquet", columns={"id": "id"})
    assert [r["problem_id"] for r in read_problems(parquet)] == ["q2"]
    fp = input_fingerprint(jsonl)
    assert [f["name"] for f in fp["files"]] == ["a.jsonl"] and fp["files"][0]["size"] > 0
    assert fingerprint_changes(fp, input_fingerprint(jsonl, previous=fp)) == []
    (folder / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert fingerprint_changes(fp, input_fingerprint(jsonl, previous=fp))[0].startswith("a.jsonl: content changed")
