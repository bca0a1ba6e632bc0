"""The run directory layout lives in crv_ray.run_paths; every stage's paths come from it, unchanged."""

from pathlib import Path

from crv_ray.config import load_config
from crv_ray.refine.store import RefineStore
from crv_ray.run_paths import RunPaths, stage_checkpoints, stage_data_dir, stage_metrics, stage_model
from crv_ray.stages import model_dir, stage_paths

ROOT = Path(__file__).resolve().parents[1]


def test_layout_is_the_documented_one(tmp_path):
    p = RunPaths(tmp_path)
    assert p.refine == tmp_path / "refine"
    assert p.refine_dataset("pairs") == tmp_path / "refine" / "pairs"
    assert p.refine_shard_file("sft", 3) == tmp_path / "refine" / "sft" / "shard-00003.parquet"
    assert p.refine_manifest == tmp_path / "refine" / "manifest.json"
    assert p.refine_state == tmp_path / "refine" / "_work" / "state.json"
    assert p.refine_done_marker(12) == tmp_path / "refine" / "_work" / "done" / "shard-00012.json"
    assert p.refine_input_file(0) == tmp_path / "refine" / "_work" / "input" / "shard-00000.parquet"
    assert p.refine_stage_file("critic", 1) == tmp_path / "refine" / "_work" / "stages" / "critic" / "shard-00001.parquet"
    assert p.model("sft") == tmp_path / "sft" / "model"
    assert p.model("cogpo") == tmp_path / "cogpo" / "model"
    assert p.model("dpo") == tmp_path / "variants" / "dpo" / "model"
    assert stage_data_dir(p.stage_dir("dpo"), "ab12") == tmp_path / "variants" / "dpo" / "data" / "ab12"
    assert p.eval == tmp_path / "eval" and p.report == tmp_path / "report.html"
    assert (stage_model(p.sft), stage_metrics(p.sft), stage_checkpoints(p.sft)) == (
        tmp_path / "sft" / "model", tmp_path / "sft" / "metrics.jsonl", tmp_path / "sft" / "checkpoints")


def test_old_entry_points_read_the_same_layout(tmp_path):
    cfg = load_config(ROOT / "jobs" / "configs" / "tiny_scripted.yaml", [f"run_dir={tmp_path}"])
    p = RunPaths(tmp_path)
    assert stage_paths(cfg) == stage_paths(tmp_path) == {
        "refine": p.refine, "sft_data": p.refine_dataset("sft"), "pairs": p.refine_dataset("pairs"), "sft": p.sft,
        "cogpo": p.cogpo, "variants": p.variants, "eval": p.eval}
    assert model_dir(cfg, "dpo") == p.model("dpo")
    store = RefineStore(tmp_path)
    assert (store.root, store.work, store.manifest_path, store.state_path) == (
        p.refine, p.refine_work, p.refine_manifest, p.refine_state)
    assert store.done_marker(4) == p.refine_done_marker(4) and store.dataset_dir("errors") == p.refine_dataset("errors")
