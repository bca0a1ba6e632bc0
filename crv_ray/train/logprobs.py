"""Per-token and per-sequence log-probabilities without materialising the full logits.

A long CoT batch (B * T = 32k tokens) times a 150k vocabulary is a 19 GB fp32 logits tensor, and autograd would
keep it for backward. `chunked_token_logps` projects the hidden states through the LM head a few rows at a time,
keeps only one log-normaliser per token, and recomputes each chunk's logits in backward, so memory stays at
O(chunk_size * V) in both passes.

Labels follow the "already shifted" convention: `labels[b, t]` is the token predicted from `hidden[b, t]`, and
`ignore_index` marks positions outside the loss (prompt, padding, the last position). `shift_labels` builds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def shift_labels(input_ids: Tensor, loss_mask: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Labels aligned with the hidden states: `labels[:, t] = input_ids[:, t + 1]` where that token is in the loss.

    `loss_mask` is 1 on response tokens and 0 on prompt and padding (TRL's `completion_mask`). The last position
    predicts nothing and is always `ignore_index`.

    Example: input_ids [[5, 6, 7, 8, 0]], loss_mask [[0, 0, 1, 1, 0]] -> labels [[-100, 7, 8, -100, -100]].
    """
    if input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )
    labels = torch.full_like(input_ids, ignore_index)
    labels[..., :-1] = input_ids[..., 1:].masked_fill(loss_mask[..., 1:] == 0, ignore_index)
    return labels


def unchunked_token_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Reference implementation on full logits [..., V]: fp32 log-prob of each label, 0 where ignored."""
    mask = labels != ignore_index
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def _chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, logit_scale: float, softcap: float | None
) -> tuple[Tensor, Tensor | None]:
    """fp32 logits of one chunk, plus tanh(.) of the softcap (reused by backward)."""
    # The matmul runs in the model dtype (as HF's lm_head does); the softmax runs in fp32.
    logits = F.linear(hidden, weight, bias).float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, tanh


def _addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b into an fp32 accumulator; rounding every chunk's product to bf16 first would bias the sum."""
    if acc.device.type == "cuda" and b.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a.to(b.dtype), b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[label] for rows of `hidden` [N, H], chunk_size rows at a time.

    Saves only its inputs and one fp32 log-normaliser per row; backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        chunk_size: int,
        logit_scale: float,
        softcap: float | None,
    ) -> Tensor:
        n_rows = hidden.shape[0]
        logps = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        log_z = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            logits, _ = _chunk_logits(hidden[start:end], weight, bias, logit_scale, softcap)
            chunk_log_z = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(1, labels[start:end, None]).squeeze(1) - chunk_log_z
            log_z[start:end] = chunk_log_z
        ctx.save_for_backward(hidden, weight, bias, labels, log_z)
        ctx.chunk_size, ctx.logit_scale, ctx.softcap = chunk_size, logit_scale, softcap
        return logps

    @staticmethod
    def backward(ctx, grad_logps: Tensor):
        hidden, weight, bias, labels, log_z = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        grad_logps = grad_logps.float()
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:end]
            logits, tanh = _chunk_logits(hidden_chunk, weight, bias, ctx.logit_scale, ctx.softcap)
            # d logp_label / d z_j = 1[j = label] - softmax(z)_j, in place to keep one [chunk, V] buffer alive.
            grad_z = logits.sub_(log_z[start:end, None]).exp_().mul_(-grad_logps[start:end, None])
            grad_z.scatter_add_(1, labels[start:end, None], grad_logps[start:end, None])
            if tanh is not None:
                grad_z.mul_(1.0 - tanh * tanh)
            if ctx.logit_scale != 1.0:
                grad_z.mul_(ctx.logit_scale)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_z.to(weight.dtype) @ weight
            if grad_weight is not None:
                _addmm_fp32(grad_weight, grad_z.t(), hidden_chunk)
            if grad_bias is not None:
                grad_bias += grad_z.sum(dim=0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def chunked_token_logps(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    lm_head_bias: Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """fp32 log-prob of `labels` under logits `softcap(logit_scale * (hidden @ W.T + b))`, 0 where ignored.

    hidden [..., H] (e.g. [B, T, H]), lm_head_weight [V, H], labels [...] already shifted. Only positions with a
    label are projected, `chunk_size` of them at a time, so the largest logits buffer is [chunk_size, V] in forward
    and in backward. Differentiable with respect to hidden, weight and bias.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, {hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}"
        )
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    mask = labels != ignore_index
    # Prompt and padding rows never reach the LM head: with long prompts this skips most of the work.
    flat_mask = mask.reshape(-1)
    rows = hidden.reshape(-1, hidden.shape[-1])[flat_mask]
    logps = _ChunkedTokenLogps.apply(
        rows,
        lm_head_weight,
        lm_head_bias,
        labels.reshape(-1)[flat_mask].long(),
        chunk_size,
        1.0 if logit_scale is None else float(logit_scale),
        softcap,
    )
    # masked_scatter keeps the graph connected when no position has a label (a zero, differentiable loss).
    return torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, logps)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM (or PEFT model) inside DDP / DeepSpeed-style wrappers, which keep it under `.module`."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def _logit_transform(config) -> tuple[float | None, float | None]:
    """(logit_scale, softcap) that the model's own forward applies to its lm_head output."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    logit_scale = getattr(text_config, "logit_scale", None)  # Cohere multiplies
    logits_scaling = getattr(text_config, "logits_scaling", None)  # Granite divides
    if logit_scale is None and logits_scaling is not None:
        logit_scale = 1.0 / logits_scaling
    for unsupported in ("lm_head_multiplier", "output_multiplier"):
        if getattr(text_config, unsupported, None) not in (None, 1.0):
            raise ValueError(f"model config sets {unsupported}, which sequence_logps does not apply")
    return logit_scale, getattr(text_config, "final_logit_softcapping", None)


def last_hidden_state(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final (post-norm) hidden states [B, T, H] of a HF causal LM, without computing its full logits.

    The whole model is called, not just its decoder, so that wrappers see a normal forward (DDP arms its gradient
    reduction there, FSDP2 unshards its root parameters); a hook on the decoder captures its output and
    `logits_to_keep=1` shrinks the lm_head's own work to one position per row.
    """
    decoder = _unwrap(model).get_decoder()
    captured: list[Tensor] = []

    def _capture(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(_capture)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"expected the decoder to run once per forward, it ran {len(captured)} times")
    return captured[0]


def _full_tensor(tensor: Tensor | None) -> Tensor | None:
    # FSDP2 may leave the head sharded as a DTensor; gather it (differentiably) for the plain matmul.
    if tensor is not None and hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    return tensor


def sequence_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the labelled (response) tokens of each row and their count: ([B] fp32, [B] int64).

    Works for HF causal LMs (Llama, Qwen2, tied embeddings or not), PEFT-wrapped ones and DDP/FSDP2 wrappers, on
    right-padded batches. `labels` are shifted (see `shift_labels`).
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
    lm = _unwrap(model)
    hidden = last_hidden_state(model, input_ids, attention_mask)
    head = lm.get_output_embeddings()
    logit_scale, softcap = _logit_transform(lm.config)
    token_logps = chunked_token_logps(
        hidden,
        _full_tensor(head.weight),
        labels,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        lm_head_bias=_full_tensor(getattr(head, "bias", None)),
        logit_scale=logit_scale,
        softcap=softcap,
    )
    return token_logps.sum(dim=-1), (labels != ignore_index).sum(dim=-1)
