"""Reference log-probs (Ray Data) and CogPO on Ray Train with 2 gloo workers and FSDP2 on a tiny model."""

from __future__ import annotations

import math
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crv_ray.models.builtin import resolve_model
from crv_ray.train.api import read_metrics, run_cogpo, run_ref_logps
from crv_ray.train.config import TrainConfig
from crv_ray.train.data import chat_tokenize, list_parquet_files, load_tokenizer

pytestmark = pytest.mark.slow

COGPO = {"epochs": 2, "lr": 5e-3, "warmup_ratio": 0.0, "scheduler": "constant", "per_device_batch_size": 2,
         "grad_accum_steps": 1, "max_length": 64, "max_prompt_length": 32, "checkpoint_every_steps": 100,
         "seed": 5}


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


@pytest.fixture(scope="module")
def with_ref(pairs):
    root, model = pairs
    cfg = TrainConfig.model_validate({"cogpo": COGPO})
    return run_ref_logps(cfg, model, root / "pairs.parquet", root / "pairs_ref"), cfg


def test_ref_logps_match_a_plain_forward(with_ref, pairs):
    from transformers import AutoModelForCausalLM

    out, cfg = with_ref
    root, model_dir = pairs
    table = pa.concat_tables([pq.read_table(f) for f in list_parquet_files(out)])
    assert table.num_rows == 24 and {"prompt", "gap", "ref_chosen_logp", "ref_rejected_logp"} <= set(table.column_names)
    tok = load_tokenizer(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    row = table.slice(3, 1).to_pylist()[0]
    for side in ("chosen", "rejected"):
        ids, plen = chat_tokenize(tok, row["prompt"], row[side])
        with torch.no_grad():
            logps = torch.log_softmax(lm(torch.tensor([ids])).logits[0, :-1].double(), -1)
        expected = float(logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][plen - 1:].sum())
        assert row[f"ref_{side}_logp"] == pytest.approx(expected, rel=1e-4)
    t = time.perf_counter()
    assert run_ref_logps(cfg, model_dir, root / "pairs.parquet", root / "pairs_ref") == out  # complete: skipped
    assert time.perf_counter() - t < 5


def test_cogpo_margin_grows(with_ref, pairs):
    from transformers import AutoModelForCausalLM

    out, cfg = with_ref
    root, model_dir = pairs
    exported = run_cogpo(cfg, model_dir, out, root / "cogpo")
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
