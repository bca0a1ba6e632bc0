"""Activation checkpointing modes change what is kept for backward, never the numbers: log-probs, loss and
gradients under FSDP2 equal the run without checkpointing, and each mode recomputes what it says."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crv_ray.train.batching import TokenizedRows, sequence_sums
from crv_ray.train.config import FSDPConfig
from crv_ray.train.distributed import setup_model
from crv_ray.train.loop import batch_token_logps



def _rows() -> TokenizedRows:
    """Three SFT rows of different lengths (the padded path: attention mask and padding included)."""
    ids = [[5, 6, 7, 20, 21, 22, 23], [8, 9, 30, 31], [10, 11, 12, 40, 41, 42, 43, 44, 45]]
    return TokenizedRows.from_table(pa.table({"input_ids": ids, "prompt_len": [3, 2, 3]}))

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in MATMULS
        return func(*args, **(kwargs or {}))


def _run(model_dir, fsdp: dict):
    torch.manual_seed(0)
    model = setup_model(model_dir, FSDPConfig(**fsdp), None, chunk_size=8, seed=0)
    model.train()
    layers = list(model.lm.get_decoder().layers)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        # a pre-hook: the recompute may stop early, before a forward hook would run
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = _rows().collate(np.arange(3), pad_id=0)
    logps, _ = batch_token_logps(model, batch)
    loss = -sequence_sums(logps, batch).mean()
    counter = _CountMatmuls()
    with counter:
        loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    return logps.detach(), loss.detach(), grads, calls, counter.n


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, gloo_group):
    return _run(tiny_model_dir, {"activation_checkpointing": "off"})


@pytest.mark.parametrize("fsdp", [{"activation_checkpointing": "full"}, {"activation_checkpointing": True},
                                  {"activation_checkpointing": "selective", "activation_checkpointing_every": 2},
                                  {"activation_checkpointing": "selective", "activation_checkpointing_every": 1,
                                   "activation_checkpointing_save_matmuls": True}],
                         ids=["full", "true-means-full", "every-2nd-layer", "save-matmuls"])
def test_same_numbers_and_the_configured_recompute(fsdp, baseline, tiny_model_dir, gloo_group):
    logps0, loss0, grads0, calls0, mm0 = baseline
    logps, loss, grads, calls, mm = _run(tiny_model_dir, fsdp)
    torch.testing.assert_close(logps, logps0, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, loss0, atol=1e-5, rtol=0)
    assert grads.keys() == grads0.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads0[name], atol=1e-5, rtol=1e-5, msg=name)
    assert calls0 == [1] * len(calls0)  # no checkpointing: each layer runs once
    cfg = FSDPConfig(**fsdp)
    every = cfg.activation_checkpointing_every if cfg.activation_checkpointing == "selective" else 1
    # A checkpointed layer runs again in backward (recompute); the others run once.
    assert calls == [2 if i % every == 0 else 1 for i in range(len(calls))]
    if cfg.activation_checkpointing_save_matmuls:
        assert mm == mm0  # the matmul outputs were kept: backward does not recompute one
    else:
        assert mm > mm0


def test_ac_options_are_checked_at_load():
    with pytest.raises(ValueError, match="apply to activation_checkpointing: selective"):
        FSDPConfig(activation_checkpointing="full", activation_checkpointing_save_matmuls=True)
    assert FSDPConfig(activation_checkpointing=False).activation_checkpointing == "off"
