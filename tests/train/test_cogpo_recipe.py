"""The CogPO recipe's micro-batch loss for each `train.cogpo.loss`, from the real tokenization (beta resolution
included) through the recipe's padded batch, against the formula computed from a plain unpadded forward of the
same model, pair by pair."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from crv_ray.train.batching import TokenizedRows
from crv_ray.train.cogpo_recipe import CogPORecipe
from crv_ray.train.config import TrainConfig
from crv_ray.train.data import load_tokenizer, tokenize_pairs_batch
from crv_ray.train.distributed import setup_model

# Responses of different lengths, so both halves of the batch are padded. Pair 0 brings its own beta.
PAIRS = pa.table({
    "prompt": ["What is 2 + 3?", "Name a prime.", "Is 9 odd or even? Think about it."],
    "chosen": ["5.", "2 is a prime, and so is 3.", "Odd, because 9 = 2 * 4 + 1."],
    "rejected": ["It is 6, I believe, or maybe 7.", "9.", "Even."],
    "gap": ["small", "medium", "large"],
    "beta": pa.array([0.8, None, None], pa.float64()),
    "ref_chosen_logp": [-30.0, -18.0, -40.0],
    "ref_rejected_logp": [-25.0, -41.0, -9.0],
})


def _plain_logp(lm, ids: list[int], prompt_len: int) -> float:
    t = torch.tensor([ids])
    with torch.no_grad():
        logps = torch.log_softmax(lm(t).logits[0, :-1].double(), -1)
    return float(logps[torch.arange(len(ids) - 1), t[0, 1:]][prompt_len - 1:].sum())


def _expected(loss: str, lm, table: pa.Table, cfg) -> float:
    softplus = lambda x: math.log1p(math.exp(-x))  # noqa: E731  (-log sigmoid(x))
    total = 0.0
    for i, row in enumerate(table.to_pylist()):
        p = row["prompt_len"]
        c, r = _plain_logp(lm, row["chosen_ids"], p), _plain_logp(lm, row["rejected_ids"], p)
        nc, nr = len(row["chosen_ids"]) - p, len(row["rejected_ids"]) - p
        # The beta each loss must use: the pair's own, else its gap's; one beta for all under dpo.
        beta = cfg.default_beta if loss == "dpo" else [0.8, cfg.gap_betas["medium"], cfg.gap_betas["large"]][i]
        hc, hr = c - PAIRS["ref_chosen_logp"][i].as_py(), r - PAIRS["ref_rejected_logp"][i].as_py()
        total += {"cogpo": lambda: softplus(beta * (hc - hr)),
                  "dpo": lambda: softplus(beta * (hc - hr)),
                  "ipo": lambda: (hc / nc - hr / nr - 1 / (2 * beta)) ** 2,
                  "simpo": lambda: softplus(beta * (c / nc - r / nr) - cfg.simpo_gamma)}[loss]()
    return total


@pytest.mark.parametrize("loss", ["cogpo", "dpo", "ipo", "simpo"])
def test_micro_loss_matches_plain_forward(loss, tiny_model_dir):
    cfg = TrainConfig.model_validate({"cogpo": {"loss": loss, "default_beta": 0.3, "simpo_gamma": 0.4,
                                                "max_length": 128, "max_prompt_length": 64},
                                      "fsdp": {"enabled": False}})
    # SimPO is reference-free: its pairs carry no reference columns at all.
    pairs = PAIRS.drop(["ref_chosen_logp", "ref_rejected_logp"]) if loss == "simpo" else PAIRS
    table = tokenize_pairs_batch(load_tokenizer(tiny_model_dir), pairs, cfg.cogpo)
    assert table.column("status").to_pylist() == ["ok"] * 3
    recipe = CogPORecipe({"train_cfg": cfg.model_dump(mode="json"), "model_dir": str(tiny_model_dir),
                          "out_dir": "unused", "pad_id": 0, "config_hash": "x", "data_file": "unused"})
    recipe.rows = TokenizedRows.from_table(table)
    recipe.model = setup_model(tiny_model_dir, cfg.fsdp, None, chunk_size=4, seed=0)
    recipe.setup_extra()
    batch = recipe.rows.collate(np.arange(3), pad_id=0)
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padding is present
    loss_sum, pairs_in_batch = recipe.micro_loss(batch, weight=1.0)
    assert pairs_in_batch == 3 and loss_sum.requires_grad
    expected = _expected(loss, recipe.model.lm, table, cfg.cogpo)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    metrics = recipe.window_metrics()
    assert metrics["count/small"] == metrics["count/medium"] == metrics["count/large"] == 1
