"""Padding-free packing: a micro-batch's sequences in one row with restarting position ids give the padded path's
log-probs, losses and gradients; token-budget micro-batches keep every rank on the same count."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from crv_ray.train.batching import TokenizedRows, packed_micro_batches, sequence_sums, split_by_tokens
from crv_ray.train.cogpo_recipe import CogPORecipe
from crv_ray.train.config import CogPOConfig, TrainConfig
from crv_ray.train.distributed import setup_model
from crv_ray.train.loop import batch_token_logps
from crv_ray.train.sft_recipe import SFTRecipe

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
CHOSEN = [[20, 21, 22], [23, 24], [25, 26, 27, 28, 29, 30, 31], [32, 33]]
REJECTED = [[40, 41], [42, 43, 44, 45, 46], [47], [48, 49, 50]]


def _pairs() -> TokenizedRows:
    return TokenizedRows.from_table(pa.table({
        "chosen_ids": [p + c for p, c in zip(PROMPTS, CHOSEN)], "rejected_ids": [p + r for p, r in zip(PROMPTS, REJECTED)],
        "prompt_len": [len(p) for p in PROMPTS], "beta": pa.array([1.0, 0.5, 0.2, 0.5], pa.float32()),
        "gap": ["small", "medium", "large", "medium"],
        "ref_chosen_logp": pa.array([-30.0, -18.0, -40.0, -12.0], pa.float32()),
        "ref_rejected_logp": pa.array([-25.0, -41.0, -9.0, -20.0], pa.float32())}))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return setup_model(tiny_model_dir, TrainConfig(fsdp={"enabled": False}).fsdp, None, chunk_size=8, seed=0)


def test_packed_collate_layout():
    rows = _pairs()
    batch = rows.collate(np.array([1, 3]), pad_id=0, packed=True)
    # chosen 1, chosen 3, rejected 1, rejected 3 in one row
    assert batch["input_ids"].tolist() == [[8, 9, 23, 24, 14, 32, 33, 8, 9, 42, 43, 44, 45, 46, 14, 48, 49, 50]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]]
    assert batch["seq_index"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3]]
    assert batch["loss_mask"].long().tolist() == [[0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1]]
    assert batch["attention_mask"].sum() == batch["input_ids"].numel()  # no padding at all
    assert sequence_sums(batch["loss_mask"].long(), batch).tolist() == [2, 2, 5, 3]
    padded = rows.collate(np.array([1, 3]), pad_id=0)
    assert sequence_sums(padded["loss_mask"].long(), padded).tolist() == [2, 2, 5, 3]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_log_probs_equal_padded(attn, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from crv_ray.train.distributed import TokenLogps

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    assert lm.config._attn_implementation == attn
    model = TokenLogps(lm, chunk_size=8)
    rows = _pairs()
    idx = np.arange(4)
    padded, packed = rows.collate(idx, pad_id=0), rows.collate(idx, pad_id=0, packed=True)
    with torch.no_grad():
        lp_pad, labels_pad = batch_token_logps(model, padded)
        lp_pack, labels_pack = batch_token_logps(model, packed)
    # Token by token: the packed row's valid labels in order are the padded rows' valid labels in order.
    torch.testing.assert_close(lp_pack[labels_pack != -100], lp_pad[labels_pad != -100], atol=1e-5, rtol=0)
    torch.testing.assert_close(sequence_sums(lp_pack, packed), sequence_sums(lp_pad, padded), atol=1e-5, rtol=0)
    # The restarting positions are what keeps the sequences apart: one running position attends across them.
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    with torch.no_grad():
        lp_leaky, _ = batch_token_logps(model, leaky)
    assert (sequence_sums(lp_leaky, packed) - sequence_sums(lp_pad, padded)).abs().max() > 1e-2


def _loss_and_grads(recipe, batch):
    recipe.model.zero_grad()
    loss_sum, units = recipe.micro_loss(batch, weight=1.0)
    loss_sum.backward()
    return loss_sum.detach(), units, {n: p.grad.clone() for n, p in recipe.model.named_parameters()}


@pytest.mark.parametrize("loss", ["cogpo", "ipo", "simpo"])
def test_cogpo_recipe_packed_equals_padded(loss, model, tiny_model_dir):
    cfg = TrainConfig.model_validate({"cogpo": {"loss": loss, "packing": True}, "fsdp": {"enabled": False}})
    recipe = CogPORecipe({"train_cfg": cfg.model_dump(mode="json"), "model_dir": str(tiny_model_dir),
                          "out_dir": "unused", "pad_id": 0, "config_hash": "x", "data_file": "unused"})
    recipe.rows, recipe.model = _pairs(), model
    recipe.setup_extra()
    idx = np.arange(4)
    padded = _loss_and_grads(recipe, recipe.rows.collate(idx, 0))
    packed = _loss_and_grads(recipe, recipe.rows.collate(idx, 0, packed=True))
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    assert packed[1] == padded[1] == 4
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sft_recipe_packed_equals_padded(model, tiny_model_dir):
    cfg = TrainConfig.model_validate({"sft": {"packing": True}, "fsdp": {"enabled": False}})
    recipe = SFTRecipe({"train_cfg": cfg.model_dump(mode="json"), "model_dir": str(tiny_model_dir),
                        "out_dir": "unused", "pad_id": 0, "config_hash": "x", "data_file": "unused"})
    recipe.rows = TokenizedRows.from_table(pa.table({"input_ids": [p + c for p, c in zip(PROMPTS, CHOSEN)],
                                                     "prompt_len": [len(p) for p in PROMPTS]}))
    recipe.model = model
    idx = np.arange(4)
    padded = _loss_and_grads(recipe, recipe.rows.collate(idx, 0))
    packed = _loss_and_grads(recipe, recipe.rows.collate(idx, 0, packed=True))
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    assert packed[1] == padded[1] == sum(len(c) for c in CHOSEN)
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_split_by_tokens():
    tokens = np.array([5, 3, 9, 2, 2, 20])
    rows = np.array([0, 1, 2, 3, 4, 5])
    assert [m.tolist() for m in split_by_tokens(rows, tokens, 10)] == [[0, 1], [2], [3, 4], [5]]  # 20 goes alone
    assert [m.tolist() for m in split_by_tokens(rows, tokens, None)] == [rows.tolist()]
    assert [m.tolist() for m in split_by_tokens(rows[:0], tokens, 10)] == [[]]


def test_packed_micro_batches_match_across_ranks():
    tokens = np.array([5, 3, 9, 2, 2, 7, 1, 1])
    # plan[accum][rank] for 2 accumulation steps x 2 ranks
    step_plan = [[np.array([0, 1]), np.array([4, 5])], [np.array([2, 3]), np.array([6, 7])]]
    r0 = packed_micro_batches(step_plan, tokens, 10, rank=0)
    r1 = packed_micro_batches(step_plan, tokens, 10, rank=1)
    assert [m.tolist() for m in r0] == [[0, 1], [2], [3]]
    assert [m.tolist() for m in r1] == [[4, 5, 6], [7], []]  # padded to rank 0's count with an empty micro-batch
    assert sorted(np.concatenate(r0 + r1).tolist()) == list(range(8))
    # No budget: the plan's own micro-batches.
    assert [m.tolist() for m in packed_micro_batches(step_plan, tokens, None, rank=1)] == [[4, 5], [6, 7]]


def test_token_budget_needs_packing():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch sizes packed micro-batches: set packing: true"):
        CogPOConfig(max_tokens_per_micro_batch=4096)
    assert CogPOConfig(packing=True, max_tokens_per_micro_batch=4096).max_tokens_per_micro_batch == 4096
