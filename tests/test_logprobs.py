"""Chunked log-probs: equal to the full-logits computation in value and gradient, with bounded memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from crv_ray.train.logprobs import (
    chunked_token_logps,
    sequence_logps,
    shift_labels,
    unchunked_token_logps,
)

V, H = 37, 16


def _reference(hidden, weight, labels, bias=None, logit_scale=None, softcap=None):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return unchunked_token_logps(logits, labels)


def _inputs(seed=0, batch=3, seq=7):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, H, generator=gen, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=gen)).requires_grad_()
    labels = torch.randint(0, V, (batch, seq), generator=gen)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    upstream = torch.randn(batch, seq, generator=gen)  # arbitrary dL/dlogp
    return hidden, weight, labels, upstream


def _value_and_grads(fn, hidden, weight, labels, upstream, **kwargs):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    extra = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    logps = fn(hidden, weight, labels, **extra)
    (logps * upstream).sum().backward()
    grads = [hidden.grad, weight.grad] + [v.grad for v in extra.values() if isinstance(v, torch.Tensor)]
    return logps.detach(), grads


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 16, 1000])
def test_chunked_equals_unchunked_values_and_grads(chunk_size):
    hidden, weight, labels, upstream = _inputs()  # 17 labelled tokens: 4 and 5 do not divide them
    ref, ref_grads = _value_and_grads(_reference, hidden, weight, labels, upstream)
    got, got_grads = _value_and_grads(
        lambda h, w, y: chunked_token_logps(h, w, y, chunk_size=chunk_size), hidden, weight, labels, upstream
    )
    assert got.dtype == torch.float32 and got.shape == labels.shape
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    # Ignored positions: log-prob exactly 0 and no gradient reaches their hidden state.
    ignored = labels == -100
    assert torch.equal(got[ignored], torch.zeros(int(ignored.sum())))
    assert torch.equal(got_grads[0][ignored], torch.zeros(int(ignored.sum()), H))
    assert (got[~ignored] < 0).all()


def test_bias_scale_and_softcap_match_reference():
    hidden, weight, labels, upstream = _inputs(seed=1)
    bias = torch.randn(V)
    kwargs = dict(logit_scale=0.7, softcap=3.0)
    ref, ref_grads = _value_and_grads(_reference, hidden, weight, labels, upstream, bias=bias, **kwargs)
    got, got_grads = _value_and_grads(
        lambda h, w, y, bias, **kw: chunked_token_logps(h, w, y, chunk_size=3, lm_head_bias=bias, **kw),
        hidden, weight, labels, upstream, bias=bias, **kwargs,
    )
    torch.testing.assert_close(got, ref)
    assert len(got_grads) == 3  # hidden, weight, bias
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_all_ignored_gives_differentiable_zero():
    hidden, weight, labels, _ = _inputs()
    logps = chunked_token_logps(hidden, weight, torch.full_like(labels, -100), chunk_size=4)
    logps.sum().backward()
    assert float(logps.detach().abs().sum()) == 0.0
    assert float(hidden.grad.abs().sum()) == 0.0 and float(weight.grad.abs().sum()) == 0.0


def test_bad_arguments_raise():
    hidden, weight, labels, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels shape"):
        chunked_token_logps(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_token_logps(hidden, weight[:, :-1], labels)


def test_shift_labels():
    input_ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    assert shift_labels(input_ids, loss_mask).tolist() == [[-100, 7, 8, -100, -100], [10, 11, 12, 13, -100]]
    with pytest.raises(ValueError, match="loss_mask"):
        shift_labels(input_ids, loss_mask[:, :-1])


# --- HF models ---------------------------------------------------------------------------------------------------


def _tiny_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).float()


def _padded_batch():
    input_ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 0, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
    return input_ids, attention_mask, shift_labels(input_ids, loss_mask)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
def test_sequence_logps_matches_full_logits_on_llama(tie):
    model = _tiny_llama(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    input_ids, attention_mask, labels = _padded_batch()

    logps, n_tokens = sequence_logps(model, input_ids, attention_mask, labels, chunk_size=3)
    (logps * torch.tensor([1.0, -2.0])).sum().backward()
    grads = _grads(model)
    model.zero_grad()

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = unchunked_token_logps(logits, labels).sum(-1)
    (expected * torch.tensor([1.0, -2.0])).sum().backward()

    assert n_tokens.tolist() == [4, 2]  # the response tokens after the first position
    torch.testing.assert_close(logps, expected)
    expected_grads = _grads(model)
    assert grads.keys() == expected_grads.keys() and "model.embed_tokens.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], msg=name)


def test_sequence_logps_through_peft_lora():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny_llama(tie=False), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    input_ids, attention_mask, labels = _padded_batch()
    logps, _ = sequence_logps(model, input_ids, attention_mask, labels, chunk_size=4)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logps, unchunked_token_logps(logits, labels).sum(-1))


# --- memory ------------------------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_memory_stays_bounded_by_chunk():
    n_tokens, vocab, dim, chunk = 4096, 32000, 16, 256
    full_logits_numel = n_tokens * vocab  # 131M floats = 524 MB in fp32
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, n_tokens // 2, dim, generator=gen, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, dim, generator=gen)).requires_grad_()
    labels = torch.randint(0, vocab, (2, n_tokens // 2), generator=gen)

    saved_bytes = []

    def pack(t):
        saved_bytes.append(t.numel() * t.element_size())
        return t

    largest_fwd = _LargestTensor()
    with largest_fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = chunked_token_logps(hidden, weight, labels, chunk_size=chunk)
    largest_bwd = _LargestTensor()
    with largest_bwd:
        logps.sum().backward()

    # No op ever produces more than one chunk of logits, in forward or backward ...
    assert largest_fwd.max_numel == chunk * vocab
    assert largest_bwd.max_numel == chunk * vocab
    # ... and what autograd keeps for backward is inputs-sized (hidden, weight, labels, one float per token).
    assert sum(saved_bytes) < 0.01 * full_logits_numel * 4
    assert hidden.grad.shape == hidden.shape and torch.isfinite(weight.grad).all()
