"""CogPO on Ray Train (reference log-probs computed by the workers) with 2 gloo workers and FSDP2 on a tiny model."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crv_ray.models.builtin import resolve_model
from crv_ray.train.api import read_metrics, run_cogpo
from crv_ray.train.config import TrainConfig
from crv_ray.train.data import chat_tokenize, load_tokenizer

pytestmark = pytest.mark.slow

COGPO = {"epochs": 2, "lr": 5e-3, "warmup_ratio": 0.0, "scheduler": "constant", "per_device_batch_size": 2,
         "grad_accum_steps": 1, "max_length": 64, "max_prompt_length": 32, "checkpoint_every_steps": 100,
         "seed": 5, "max_failures": 0}  # a retry would hide a failed first attempt


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, ray_started):
    root = tmp_path_factory.mktemp("cogpo")
    model = resolve_model("builtin:tiny", cache_dir=root / "cache")
    prompts = [f"What is {a} + {b}?" for a in range(0, 8, 2) for b in range(0, 30, 5)]
    sums = [eval(p[8:-1]) for p in prompts]
    gaps = [("small", "medium", "large")[i % 3] for i in range(len(prompts))]
    pq.write_table(pa.table({"prompt": prompts, "chosen": [f"The answer is {s}." for s in sums],
                             "rejected": [f"The answer is {s + 7}, I think." for s in sums], "gap": gaps}),
                   root / "pairs.parquet")
    return root, model


def _ref_file(stage_dir):
    files = list((stage_dir / "data").glob("*/ref_logps.parquet"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def cogpo_run(pairs):
    root, model = pairs
    cfg = TrainConfig.model_validate({"cogpo": COGPO, "fsdp": {"mixed_precision": "fp32"}})
    return run_cogpo(cfg, model, root / "pairs.parquet", root / "cogpo"), cfg


def test_workers_reference_log_probs_match_a_plain_forward(cogpo_run, pairs):
    """The workers score every pair with the starting model before step 1 (no separate inference pass); the
    scores are kept beside the tokenized rows, in their order."""
    from transformers import AutoModelForCausalLM

    root, model_dir = pairs
    ref = pq.read_table(_ref_file(root / "cogpo"))
    assert ref.num_rows == 24 and ref.column_names == ["ref_chosen_logp", "ref_rejected_logp"]
    row = pq.read_table(root / "pairs.parquet").slice(3, 1).to_pylist()[0]
    tok = load_tokenizer(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for side in ("chosen", "rejected"):
        ids, plen = chat_tokenize(tok, row["prompt"], row[side])
        with torch.no_grad():
            logps = torch.log_softmax(lm(torch.tensor([ids])).logits[0, :-1].double(), -1)
        expected = float(logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][plen - 1:].sum())
        assert ref.column(f"ref_{side}_logp")[3].as_py() == pytest.approx(expected, rel=1e-4)


def test_cogpo_margin_grows(cogpo_run, pairs):
    from transformers import AutoModelForCausalLM

    exported, cfg = cogpo_run
    root, model_dir = pairs
    metrics = read_metrics(root / "cogpo")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    # Step 1: the policy is the reference, so every pair's loss is log 2 and no reward moved (also proves the
    # precomputed reference used the training tokenization).
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"] + 0.5
    assert metrics[-1]["rewards/accuracies"] >= 0.75
    assert metrics[-1]["loss"] < 0.6
    assert sum(metrics[0][f"count/{gap}"] for gap in ("small", "medium", "large")) == 4
    assert any(f"rewards/margins/{gap}" in metrics[0] for gap in ("small", "medium", "large"))
    AutoModelForCausalLM.from_pretrained(exported)


def test_bf16_policy_starts_at_its_own_reference_and_a_resume_reads_it_back(pairs):
    """Under bf16 (auto on a CPU with native bf16, and on GPUs) the reference comes from the same bf16 policy, so
    step 1 sits at log 2 with zero margins; a separate fp32 pass would be off by whole nats per pair. A resumed run
    reads the stored scores instead of scoring again."""
    root, model_dir = pairs
    out = root / "cogpo_bf16"
    cfg = TrainConfig.model_validate({"cogpo": {**COGPO, "epochs": 1, "stop_after_steps": 2},
                                      "fsdp": {"mixed_precision": "bf16"}})
    run_cogpo(cfg, model_dir, root / "pairs.parquet", out)
    ref_file = _ref_file(out)
    first = ref_file.stat().st_mtime_ns
    metrics = read_metrics(out)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert abs(metrics[0]["rewards/margins"]) < 0.02 and abs(metrics[0]["rewards/chosen"]) < 0.02
    cfg = TrainConfig.model_validate({"cogpo": {**COGPO, "epochs": 1}, "fsdp": {"mixed_precision": "bf16"}})
    assert (run_cogpo(cfg, model_dir, root / "pairs.parquet", out) / "config.json").is_file()
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 7))
    assert ref_file.stat().st_mtime_ns == first  # read back, not recomputed
