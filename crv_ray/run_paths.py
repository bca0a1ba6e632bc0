"""The run directory's layout, in one place: every stage, `crv-ray report` and `crv-ray status` take their paths
from here. The run directory is a local folder or a URI such as s3://bucket/run (crv_ray.storage).

    <run_dir>/
      refine/                       crv_ray.refine.store (atomic shard commits)
        trace/ sft/ pairs/ errors/  shard-NNNNN.parquet, one file per shard and dataset
        manifest.json
        _work/state.json            config hash, input fingerprint, shard list
        _work/input/                ingested shards (working rows)
        _work/stages/<stage>/       per-stage outputs (staged mode)
        _work/done/shard-NNNNN.json commit marker, written last
        _work/spill/shard-NNNNN/    finished rows of a shard still running (Ray workers write, the driver reads back)
      sft/ cogpo/ variants/<name>/  training stages (crv_ray.train.api), each:
        model/                      exported Hugging Face model (+ crv_ray_train.json, the completion marker)
        checkpoints/ metrics.jsonl tb/ data_report.json
        data/<hash>/                tokenized.arrow; ref_logps.parquet (preference stages: the starting model's
                                    log-probs of every kept pair, computed by the workers before step 1)
      eval/                         <model>/<benchmark>/done.json, summary.json
      report.html
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crv_ray.storage import AnyPath, as_path

REFINE_DATASETS = ("trace", "sft", "pairs", "errors")
TRAIN_STAGES = ("sft", "cogpo")  # the training stages with their own folder; variants live under variants/

# Inside a training stage's folder.
MODEL = "model"
TRAIN_MARKER = "crv_ray_train.json"  # in model/: written last, after the export
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
DATA_REPORT = "data_report.json"
TOKENIZED = "tokenized.arrow"  # in data/<hash>/: the stage's rows after tokenization and the length policy
REF_LOGPS = "ref_logps.parquet"  # in data/<hash>/ of a preference stage: one row per tokenized row, in its order
# Inside an eval output folder (<run_dir>/eval or `crv-ray eval --out`).
EVAL_SUMMARY = "summary.json"
EVAL_DONE = "done.json"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run directory; nothing is created or read here. A local run_dir gives `Path`s, a URI
    (`s3://bucket/run`) `crv_ray.storage.RemotePath`s with the same methods."""

    root: AnyPath

    def __init__(self, run_dir: str | Path | AnyPath):
        object.__setattr__(self, "root", as_path(run_dir))

    # -- refine
    @property
    def refine(self) -> AnyPath:
        return self.root / "refine"

    def refine_dataset(self, name: str) -> AnyPath:
        return self.refine / name

    def refine_shard_file(self, name: str, shard: int) -> AnyPath:
        return self.refine_dataset(name) / f"{shard_name(shard)}.parquet"

    @property
    def refine_manifest(self) -> AnyPath:
        return self.refine / "manifest.json"

    @property
    def refine_work(self) -> AnyPath:
        return self.refine / "_work"

    @property
    def refine_state(self) -> AnyPath:
        return self.refine_work / "state.json"

    def refine_input_file(self, shard: int) -> AnyPath:
        return self.refine_work / "input" / f"{shard_name(shard)}.parquet"

    def refine_stage_file(self, stage: str, shard: int) -> AnyPath:
        return self.refine_work / "stages" / stage / f"{shard_name(shard)}.parquet"

    @property
    def refine_spill(self) -> AnyPath:
        return self.refine_work / "spill"

    def refine_done_marker(self, shard: int) -> AnyPath:
        return self.refine_work / "done" / f"{shard_name(shard)}.json"

    # -- training
    @property
    def sft(self) -> AnyPath:
        return self.root / "sft"

    @property
    def cogpo(self) -> AnyPath:
        return self.root / "cogpo"

    @property
    def variants(self) -> AnyPath:
        return self.root / "variants"

    def stage_dir(self, name: str) -> AnyPath:
        """sft, cogpo or a cogpo variant's name."""
        return self.root / name if name in TRAIN_STAGES else self.variants / name

    def model(self, name: str) -> AnyPath:
        """Where a trained model of the run is exported: sft, cogpo or a cogpo variant's name."""
        return stage_model(self.stage_dir(name))

    # -- eval and report
    @property
    def eval(self) -> AnyPath:
        return self.root / "eval"

    @property
    def report(self) -> AnyPath:
        return self.root / "report.html"


# A training stage's folder (`out_dir` of crv_ray.train.api): also used for folders outside a run directory.
def stage_model(stage_dir: str | AnyPath) -> AnyPath:
    return as_path(stage_dir) / MODEL


def stage_metrics(stage_dir: str | AnyPath) -> AnyPath:
    return as_path(stage_dir) / METRICS


def stage_checkpoints(stage_dir: str | AnyPath) -> AnyPath:
    return as_path(stage_dir) / CHECKPOINTS


def stage_data_report(stage_dir: str | AnyPath) -> AnyPath:
    return as_path(stage_dir) / DATA_REPORT


def stage_data_dir(stage_dir: str | AnyPath, config_hash: str) -> AnyPath:
    """The tokenized rows (and a preference stage's reference log-probs) of one stage config."""
    return as_path(stage_dir) / "data" / config_hash
