"""CogPO/DPO and SFT losses: TRL 1.16's DPOTrainer as the oracle, plus hand-computed per-pair-beta numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crv_ray.train.logprobs import sequence_logps, shift_labels, unchunked_token_logps
from crv_ray.train.losses import (
    CogPOOutput,
    betas_for_gaps,
    cogpo_loss,
    dpo_loss,
    finalize_metric_sums,
    ipo_loss,
    merge_metric_sums,
    preference_loss,
    preference_metric_sums,
    preference_metrics,
    sft_loss,
    simpo_loss,
    sft_loss_terms,
)

# --- TRL oracle --------------------------------------------------------------------------------------------------

TRL_BETA = 0.3


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """A DPOTrainer on a tiny random Llama, a separate random reference model and a word-level tokenizer."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )

    def tiny_llama(seed):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, eos_token_id=1, bos_token_id=1,
        )
        return LlamaForCausalLM(config).float()

    dataset = Dataset.from_dict({"prompt": ["w3 w4"], "chosen": [" w5"], "rejected": [" w6"]})
    args = DPOConfig(
        # bf16=False: TRL defaults to bf16 autocast, which it applies to the reference model's forward only.
        output_dir=str(tmp_path_factory.mktemp("dpo")), use_cpu=True, bf16=False, report_to=[], beta=TRL_BETA,
        loss_type=["sigmoid"], disable_dropout=True, precompute_ref_log_probs=False, max_length=None,
    )
    return DPOTrainer(
        model=tiny_llama(0), ref_model=tiny_llama(1), args=args, train_dataset=dataset, processing_class=tokenizer
    )


# Prompts and responses of different lengths, so the batch has right padding in both halves.
PAIRS = [
    {"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7, 1], "rejected_ids": [8, 1]},
    {"prompt_ids": [9, 10], "chosen_ids": [11, 1], "rejected_ids": [12, 13, 14, 15, 1]},
    {"prompt_ids": [16, 17, 18, 19], "chosen_ids": [20, 21, 22, 1], "rejected_ids": [23, 24, 1]},
]


def _trl_loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    mode = "train" if trainer.model.training else "eval"
    metrics = {name: values[-1] for name, values in trainer._metrics[mode].items()}
    return loss.detach(), grads, metrics


def _ours(trainer, batch, beta, label_smoothing=0.0):
    """(CogPOOutput, grads, chosen_logps, rejected_logps) from our sequence_logps + cogpo_loss on TRL's batch."""
    labels = shift_labels(batch["input_ids"], batch["completion_mask"])
    trainer.model.zero_grad()
    logps, _ = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], labels, chunk_size=5)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(trainer.ref_model, batch["input_ids"], batch["attention_mask"], labels)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    out = cogpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return out, grads, chosen.detach(), rejected.detach(), (chosen - ref_chosen - rejected + ref_rejected).detach()


def test_single_beta_equals_trl_dpo_sigmoid_loss(trl_trainer):
    trainer = trl_trainer
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = ["sigmoid"], [1.0], 0.0
    batch = trainer.data_collator(PAIRS)
    trl_loss, trl_grads, trl_metrics = _trl_loss_and_grads(trainer, batch)

    # A per-pair beta tensor that happens to be constant must give the same loss as TRL's scalar beta.
    out, grads, chosen, rejected, h = _ours(trainer, batch, torch.full((3,), TRL_BETA))
    assert h.abs().min() > 1e-3  # policy and reference differ: the test is not comparing log(2) with log(2)
    torch.testing.assert_close(out.loss, trl_loss, atol=1e-5, rtol=0)
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    ours = preference_metrics(out, None, chosen, rejected)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-5), name

    # dpo_loss is the same computation.
    torch.testing.assert_close(dpo_loss(chosen, rejected, chosen - h, rejected, TRL_BETA).loss, trl_loss,
                               atol=1e-5, rtol=0)


def test_label_smoothing_is_cdpo_as_in_trl(trl_trainer):
    """TRL 1.16's "sigmoid" loss ignores label_smoothing and its "robust" loss is rDPO; method.md's formula is cDPO,
    which TRL computes in its "aot_unpaired" loss: on a single pair its sort is the identity, leaving
    -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)."""
    trainer, eps = trl_trainer, 0.2
    for pair in PAIRS:
        batch = trainer.data_collator([pair])
        trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = ["aot_unpaired"], [1.0], eps
        trl_loss, trl_grads, _ = _trl_loss_and_grads(trainer, batch)
        out, grads, *_ = _ours(trainer, batch, TRL_BETA, label_smoothing=eps)
        torch.testing.assert_close(out.loss, trl_loss, atol=1e-5, rtol=0)
        for name in grads:
            torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    # rDPO differs: robust = sigmoid - eps beta h / (1 - 2 eps), while cDPO = sigmoid + eps beta h.
    batch = trainer.data_collator(PAIRS)
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = ["robust"], [1.0], eps
    robust_loss, _, _ = _trl_loss_and_grads(trainer, batch)
    out, _, _, _, h = _ours(trainer, batch, TRL_BETA, label_smoothing=eps)
    sigmoid = -F.logsigmoid(TRL_BETA * h)
    torch.testing.assert_close(robust_loss, (sigmoid - eps * TRL_BETA * h / (1 - 2 * eps)).mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, (sigmoid + eps * TRL_BETA * h).mean(), atol=1e-5, rtol=0)
    trainer.loss_types, trainer.label_smoothing = ["sigmoid"], 0.0


def test_ipo_equals_trl_dpo_ipo_loss(trl_trainer):
    """TRL 1.16's DPOTrainer `loss_type="ipo"` divides each response's log-ratio by its completion tokens."""
    trainer = trl_trainer
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = ["ipo"], [1.0], 0.0
    batch = trainer.data_collator(PAIRS)
    trl_loss, trl_grads, _ = _trl_loss_and_grads(trainer, batch)
    trainer.loss_types = ["sigmoid"]

    labels = shift_labels(batch["input_ids"], batch["completion_mask"])
    trainer.model.zero_grad()
    logps, _ = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], labels, chunk_size=5)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(trainer.ref_model, batch["input_ids"], batch["attention_mask"], labels)
    chosen_tokens, rejected_tokens = (labels != -100).sum(dim=1).chunk(2)
    assert chosen_tokens.tolist() == [3, 2, 4] and rejected_tokens.tolist() == [2, 5, 3]  # lengths differ
    out = preference_loss("ipo", *logps.chunk(2), *ref_logps.chunk(2), chosen_tokens, rejected_tokens,
                          torch.full((3,), TRL_BETA))
    out.loss.backward()
    torch.testing.assert_close(out.loss, trl_loss, atol=1e-5, rtol=0)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _random_pairs(n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 200, (2, n), generator=g)
    logps = -torch.rand(4, n, generator=g, dtype=torch.float64) * tokens.repeat(2, 1)  # about -U(0,1) per token
    return {"chosen": logps[0], "rejected": logps[1], "ref_chosen": logps[2], "ref_rejected": logps[3],
            "chosen_tokens": tokens[0], "rejected_tokens": tokens[1]}


def _trl_cpo_loss(loss_type: str, beta: float, gamma: float, eps: float, chosen_avg, rejected_avg):
    """TRL's own CPOTrainer.cpo_loss on average log-probs (what its concatenated_forward passes for simpo),
    called with only the attributes it reads instead of a whole trainer."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    fake = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, simpo_gamma=gamma, label_smoothing=eps,
                           accelerator=SimpleNamespace(device=chosen_avg.device))
    return CPOTrainer.cpo_loss(fake, chosen_avg, rejected_avg)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_equals_trl_cpo_simpo_loss(eps):
    p, beta, gamma = _random_pairs(), 2.0, 0.7
    chosen_avg, rejected_avg = p["chosen"] / p["chosen_tokens"], p["rejected"] / p["rejected_tokens"]
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = _trl_cpo_loss("simpo", beta, gamma, eps, chosen_avg,
                                                                         rejected_avg)
    out = simpo_loss(p["chosen"], p["rejected"], p["chosen_tokens"], p["rejected_tokens"], beta, gamma, eps)
    torch.testing.assert_close(out.losses, trl_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen_rewards, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected_rewards, atol=1e-6, rtol=0)
    # Reference-free: the dispatcher needs no reference log-probs.
    same = preference_loss("simpo", p["chosen"], p["rejected"], None, None, p["chosen_tokens"],
                           p["rejected_tokens"], beta, eps, simpo_gamma=gamma)
    torch.testing.assert_close(same.losses, out.losses, atol=0, rtol=0)


def test_simpo_and_ipo_per_pair_beta_equal_trl_pair_by_pair():
    """TRL takes one beta; with per-pair betas each pair's loss must be TRL's at that pair's beta."""
    p = _random_pairs(n=6, seed=1)
    betas = torch.tensor([0.1, 0.5, 1.0, 2.0, 2.5, 10.0], dtype=torch.float64)
    chosen_avg, rejected_avg = p["chosen"] / p["chosen_tokens"], p["rejected"] / p["rejected_tokens"]
    simpo = simpo_loss(p["chosen"], p["rejected"], p["chosen_tokens"], p["rejected_tokens"], betas, 0.5)
    ipo = ipo_loss(p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"], p["chosen_tokens"],
                   p["rejected_tokens"], betas)
    # TRL's CPOTrainer "ipo" is the same per-token IPO when its inputs are average log-ratios.
    chosen_ratio_avg = (p["chosen"] - p["ref_chosen"]) / p["chosen_tokens"]
    rejected_ratio_avg = (p["rejected"] - p["ref_rejected"]) / p["rejected_tokens"]
    for i, beta in enumerate(betas.tolist()):
        trl_simpo, *_ = _trl_cpo_loss("simpo", beta, 0.5, 0.0, chosen_avg[i:i + 1], rejected_avg[i:i + 1])
        trl_ipo, *_ = _trl_cpo_loss("ipo", beta, 0.0, 0.0, chosen_ratio_avg[i:i + 1], rejected_ratio_avg[i:i + 1])
        torch.testing.assert_close(simpo.losses[i:i + 1], trl_simpo, atol=1e-6, rtol=0)
        torch.testing.assert_close(ipo.losses[i:i + 1], trl_ipo, atol=1e-6, rtol=1e-9)
    assert len(set(simpo.losses.tolist())) == 6 and len(set(ipo.losses.tolist())) == 6


def test_preference_loss_dispatch():
    p = _random_pairs(n=4, seed=2)
    beta = torch.tensor([1.0, 0.5, 0.2, 0.5], dtype=torch.float64)
    args = (p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"])
    counts = (p["chosen_tokens"], p["rejected_tokens"])
    cogpo = cogpo_loss(*args, beta, 0.1)
    torch.testing.assert_close(preference_loss("cogpo", *args, *counts, beta, 0.1).losses, cogpo.losses)
    torch.testing.assert_close(preference_loss("dpo", *args, *counts, 0.5).losses, dpo_loss(*args, 0.5).losses)
    torch.testing.assert_close(preference_loss("ipo", *args, *counts, beta).losses,
                               ipo_loss(*args, *counts, beta).losses)
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        preference_loss("kto", *args, *counts, beta)
    with pytest.raises(ValueError, match="the ipo loss needs reference log-probs"):
        preference_loss("ipo", p["chosen"], p["rejected"], None, None, *counts, beta)
    with pytest.raises(ValueError, match="label_smoothing does not apply to the ipo loss"):
        preference_loss("ipo", *args, *counts, beta, 0.1)
    with pytest.raises(ValueError, match="chosen_tokens must be >= 1"):
        simpo_loss(p["chosen"], p["rejected"], torch.zeros(4), p["rejected_tokens"], beta, 0.5)
    with pytest.raises(ValueError, match=r"rejected_tokens must have shape \[B\] = \[4\]"):
        ipo_loss(*args, p["chosen_tokens"], p["rejected_tokens"][:3], beta)


# --- per-pair betas, by hand -------------------------------------------------------------------------------------

# Three pairs with h = 2, -2, 2 and betas 1.0, 0.5, 0.2.
POLICY_CHOSEN = torch.tensor([-10.0, -20.0, -5.0])
POLICY_REJECTED = torch.tensor([-12.0, -18.0, -7.0])
REF_CHOSEN = torch.tensor([-11.0, -19.0, -6.0])
REF_REJECTED = torch.tensor([-11.0, -19.0, -6.0])
BETAS = torch.tensor([1.0, 0.5, 0.2])


def _softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_per_pair_beta_hand_computed():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    out = cogpo_loss(chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETAS)
    # -log sigmoid(beta h) = softplus(-beta h), with beta h = 2, -1, 0.4
    expected = [_softplus(-2.0), _softplus(1.0), _softplus(-0.4)]
    torch.testing.assert_close(out.losses, torch.tensor(expected))
    assert out.loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([1.0, -0.5, 0.2]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.0, 0.5, -0.2]))
    torch.testing.assert_close(out.margins, torch.tensor([2.0, -1.0, 0.4]))
    assert not out.chosen_rewards.requires_grad

    # d loss / d policy_chosen_i = -(1/B) beta_i sigmoid(-beta_i h_i)
    out.loss.backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected_grad = [-b * sigmoid(-bh) / 3 for b, bh in ((1.0, 2.0), (0.5, -1.0), (0.2, 0.4))]
    torch.testing.assert_close(chosen.grad, torch.tensor(expected_grad))


def test_per_pair_beta_with_label_smoothing_hand_computed():
    eps = 0.1
    out = cogpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETAS, label_smoothing=eps)
    expected = [(1 - eps) * _softplus(-bh) + eps * _softplus(bh) for bh in (2.0, -1.0, 0.4)]
    torch.testing.assert_close(out.losses, torch.tensor(expected))


def test_dpo_loss_is_cogpo_with_one_beta():
    dpo = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    cogpo = cogpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, torch.full((3,), 0.5))
    torch.testing.assert_close(dpo.losses, cogpo.losses)
    torch.testing.assert_close(dpo.losses, torch.tensor([_softplus(-1.0), _softplus(1.0), _softplus(-1.0)]))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETAS)


def test_betas_for_gaps():
    betas = betas_for_gaps(["large", "small", "medium"], {"small": 1.0, "medium": 0.5, "large": 0.2})
    torch.testing.assert_close(betas, torch.tensor([0.2, 1.0, 0.5]))
    with pytest.raises(ValueError, match="gap_betas"):
        betas_for_gaps(["tiny"], {"small": 1.0})


@pytest.mark.parametrize(
    "beta", [0.0, -1.0, float("nan"), torch.tensor([1.0, 0.0, 0.5]), torch.tensor([1.0, 0.5]), torch.tensor(-0.1)]
)
def test_bad_beta_raises(beta):
    with pytest.raises(ValueError, match="beta"):
        cogpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
def test_bad_label_smoothing_raises(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        cogpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, 0.5, label_smoothing=eps)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        cogpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED[:2], 0.5)


# --- metrics -----------------------------------------------------------------------------------------------------


def test_preference_metrics_overall_and_per_gap():
    out = cogpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETAS)
    gaps = ["small", "large", "small"]
    metrics = preference_metrics(out, gaps, POLICY_CHOSEN, POLICY_REJECTED)
    expected = {
        "rewards/chosen": (1.0 - 0.5 + 0.2) / 3,
        "rewards/rejected": (-1.0 + 0.5 - 0.2) / 3,
        "rewards/margins": (2.0 - 1.0 + 0.4) / 3,
        "rewards/accuracies": 2 / 3,
        "logps/chosen": -35.0 / 3,
        "logps/rejected": -37.0 / 3,
        "rewards/margins/small": 1.2,
        "rewards/accuracies/small": 1.0,
        "count/small": 2.0,
        "rewards/margins/large": -1.0,
        "rewards/accuracies/large": 0.0,
        "count/large": 1.0,
        "count/medium": 0.0,  # absent gap: a count, but no mean margin / accuracy
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name


def test_metric_sums_reduce_like_one_batch():
    """Two micro-batches (or ranks) merged give the metrics of the whole batch, per gap too."""
    gaps = ["small", "large", "small"]
    full = preference_metrics(
        cogpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETAS), gaps,
        POLICY_CHOSEN, POLICY_REJECTED,
    )
    parts = []
    for idx in ([0], [1, 2]):
        out = cogpo_loss(POLICY_CHOSEN[idx], POLICY_REJECTED[idx], REF_CHOSEN[idx], REF_REJECTED[idx], BETAS[idx])
        parts.append(preference_metric_sums(out, [gaps[i] for i in idx], POLICY_CHOSEN[idx], POLICY_REJECTED[idx]))
    assert parts[0].keys() == parts[1].keys()  # same names on every rank, even with different gaps present
    merged = finalize_metric_sums(merge_metric_sums(parts))
    assert merged.keys() == full.keys()
    for name in full:
        assert merged[name] == pytest.approx(full[name], abs=1e-6), name


def test_metrics_reject_bad_gaps():
    out = cogpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETAS)
    with pytest.raises(ValueError, match="gaps"):
        preference_metrics(out, ["small", "huge", "small"], POLICY_CHOSEN, POLICY_REJECTED)
    with pytest.raises(ValueError, match="gaps"):
        preference_metrics(out, ["small"], POLICY_CHOSEN, POLICY_REJECTED)
    assert isinstance(out, CogPOOutput)


# --- SFT -------------------------------------------------------------------------------------------------------


def test_sft_loss_equals_cross_entropy_on_response_tokens():
    gen = torch.Generator().manual_seed(0)
    vocab = 11
    logits = torch.randn(2, 6, vocab, generator=gen)
    input_ids = torch.randint(0, vocab, (2, 6), generator=gen)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    labels = shift_labels(input_ids, loss_mask)
    loss = sft_loss(unchunked_token_logps(logits, labels), labels)
    expected = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)

    # Token mean over the batch: 3 + 2 response tokens, not a mean of the two row means.
    nll_sum, n_tokens = sft_loss_terms(unchunked_token_logps(logits, labels), labels)
    assert n_tokens.item() == 5
    torch.testing.assert_close(nll_sum / 5, expected)

    # Prompt and padding positions do not matter: change their logits and the prompt tokens themselves.
    ignored = labels == -100
    noisy_logits = logits.clone()
    noisy_logits[ignored] = 100 * torch.randn(int(ignored.sum()), vocab, generator=gen)
    noisy_ids = input_ids.clone()
    noisy_ids[loss_mask == 0] = (noisy_ids[loss_mask == 0] + 1) % vocab
    noisy_labels = shift_labels(noisy_ids, loss_mask)
    assert torch.equal(noisy_labels, labels)
    torch.testing.assert_close(sft_loss(unchunked_token_logps(noisy_logits, noisy_labels), noisy_labels), expected)


def test_sft_loss_without_response_tokens_is_a_differentiable_zero():
    token_logps = torch.randn(2, 4, requires_grad=True)
    loss = sft_loss(token_logps, torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and token_logps.grad.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="token_logps"):
        sft_loss(token_logps, torch.full((2, 3), -100))
