"""`kernels` options: compile gives the eager log-probs and trains the same on CPU; liger is refused without CUDA,
at load time and at run time, with the reason."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from crv_ray.train.batching import TokenizedRows
from crv_ray.train.config import FSDPConfig, SFTConfig, TrainConfig
from crv_ray.train.distributed import apply_kernels, setup_model, setup_optimizer
from crv_ray.train.loop import batch_token_logps
from crv_ray.train.losses import sft_loss_terms


def _batch() -> dict:
    ids = [[5, 6, 7, 20, 21, 22, 23, 24], [8, 9, 30, 31, 32], [10, 11, 12, 40, 41, 42, 43, 44, 45, 46]]
    rows = TokenizedRows.from_table(pa.table({"input_ids": ids, "prompt_len": [3, 2, 3]}))
    return rows.collate(np.arange(3), pad_id=0)


def _trajectory(model_dir, kernels: str, steps: int = 4):
    """Log-probs before training, then the SFT loss of `steps` AdamW steps on one batch (FSDP2, one rank)."""
    torch.manual_seed(0)
    model = setup_model(model_dir, FSDPConfig(mixed_precision="fp32"), None, chunk_size=8, seed=0, kernels=kernels)
    opt = setup_optimizer(model, SFTConfig(lr=1e-2, max_length=64, max_prompt_length=32))
    batch = _batch()
    losses, first = [], None
    for _ in range(steps):
        logps, labels = batch_token_logps(model, batch)
        first = logps.detach() if first is None else first
        nll, n = sft_loss_terms(logps, labels)
        loss = nll / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return first, losses


def test_compiled_layers_give_eager_log_probs_and_train_the_same(tiny_model_dir, gloo_group):
    torch._dynamo.reset()
    eager_logps, eager_losses = _trajectory(tiny_model_dir, "none")
    logps, losses = _trajectory(tiny_model_dir, "compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really ran compiled
    torch.testing.assert_close(logps, eager_logps, atol=1e-4, rtol=0)
    np.testing.assert_allclose(losses, eager_losses, atol=1e-4)
    assert losses[-1] < losses[0] - 0.5  # it trains


def test_liger_needs_cuda(tiny_model_dir):
    with pytest.raises(ValueError, match="sft.kernels: liger runs Triton kernels, which need CUDA"):
        TrainConfig(sft={"kernels": "liger"})
    TrainConfig(sft={"kernels": "liger"}, scaling={"use_gpu": True})  # fine for a GPU run
    with pytest.raises(RuntimeError, match="kernels: liger needs a CUDA device"):
        apply_kernels(torch.nn.Module(), "liger", torch.device("cpu"))
