"""SFT and CogPO losses, and the preference metrics TRL logs (pure torch).

CogPO (method.md, "CogPO: preference pairs with gap-dependent beta") is DPO's sigmoid loss with one beta per pair:

    h_i = (log pi(c_i) - log pi_ref(c_i)) - (log pi(r_i) - log pi_ref(r_i))
    L   = mean_i  (1 - eps) * -log sigmoid(beta_i h_i) + eps * -log sigmoid(-beta_i h_i)

eps is conservative DPO's label smoothing (cDPO). With one beta for all pairs and eps = 0 this is TRL's
`loss_type="sigmoid"` loss exactly (tests/test_losses.py checks it against TRL's DPOTrainer).

`train.cogpo.loss` picks the functional form (`preference_loss`); the beta of each pair is resolved as for CogPO
(data.resolve_beta), except that `dpo` uses one beta for every pair:
  cogpo  the sigmoid loss above, per-pair beta
  dpo    the same with one beta (cogpo.default_beta) for all pairs
  ipo    (h_i / n - 1 / (2 beta_i))^2, h per response token as TRL's DPOTrainer `loss_type="ipo"` computes it
  simpo  reference-free, length-normalised: -log sigmoid(beta_i (avg log pi(c_i) - avg log pi(r_i)) - gamma)
         (TRL's CPOTrainer `loss_type="simpo"`), cDPO smoothing as above
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# Same names as the pairs dataset's `gap` column and the config's per-gap betas.
GAP_NAMES: tuple[str, ...] = ("small", "medium", "large")


# --- SFT -------------------------------------------------------------------------------------------------------


def sft_loss_terms(token_logps: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """(sum of response-token NLL, number of response tokens) of a micro-batch.

    Under gradient accumulation or data parallelism, divide the summed NLL by the token count of the whole
    optimizer step (all micro-batches, all ranks); averaging per-micro-batch means would weight short responses
    more than long ones.
    """
    if token_logps.shape != labels.shape:
        raise ValueError(f"token_logps shape {tuple(token_logps.shape)} must equal labels shape {tuple(labels.shape)}")
    mask = labels != ignore_index
    return -(token_logps * mask).sum(), mask.sum()


def sft_loss(token_logps: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean NLL over all response tokens of the batch (token-level mean, not a mean of per-row means).

    Prompt and padding positions (label == ignore_index) do not count. A batch without response tokens gives a
    differentiable 0.
    """
    nll_sum, n_tokens = sft_loss_terms(token_logps, labels, ignore_index)
    return nll_sum / n_tokens.clamp(min=1)


# --- CogPO / DPO -----------------------------------------------------------------------------------------------


@dataclass
class CogPOOutput:
    """Loss and (detached) implicit rewards of a batch of B preference pairs."""

    loss: Tensor  # scalar, mean of `losses`
    losses: Tensor  # [B]
    chosen_rewards: Tensor  # [B], beta_i * (log pi(c_i) - log pi_ref(c_i)); simpo: beta_i * average log pi(c_i)
    rejected_rewards: Tensor  # [B], the same for r_i
    margins: Tensor  # [B], chosen_rewards - rejected_rewards


def _check_beta(beta: Tensor | float, batch_size: int) -> None:
    if isinstance(beta, Tensor):
        if beta.dim() > 1 or (beta.dim() == 1 and beta.shape[0] != batch_size):
            raise ValueError(f"beta must be a scalar or have shape [{batch_size}], got {tuple(beta.shape)}")
        if beta.numel() and not bool((beta > 0).all()):
            raise ValueError(f"beta must be > 0 for every pair, got min {beta.min().item()}")
    elif not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_pair_tensors(**named: Tensor) -> int:
    """Every tensor must be [B] with the same B; returns B."""
    first = next(iter(named.values()))
    batch_size = first.shape[0] if first.dim() else -1
    for name, values in named.items():
        if values.dim() != 1 or values.shape[0] != batch_size:
            raise ValueError(f"{name} must have shape [B] = [{batch_size}], got {tuple(values.shape)}")
    return batch_size


def _beta_like(beta: Tensor | float, like: Tensor) -> Tensor | float:
    return beta.to(device=like.device, dtype=like.dtype) if isinstance(beta, Tensor) else beta


def _response_tokens(counts: Tensor, like: Tensor, name: str) -> Tensor:
    if bool((counts < 1).any()):
        raise ValueError(f"{name} must be >= 1 for every response, got min {counts.min().item()}")
    return counts.to(device=like.device, dtype=like.dtype)


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _logratios(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """log pi - log pi_ref of chosen and rejected; the reference is a constant."""
    dtype = policy_chosen_logps.dtype
    return (policy_chosen_logps - ref_chosen_logps.to(dtype).detach(),
            policy_rejected_logps - ref_rejected_logps.to(dtype).detach())


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-log sigmoid(logits), with cDPO label smoothing eps."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _output(losses: Tensor, beta: Tensor | float, chosen_scores: Tensor, rejected_scores: Tensor) -> CogPOOutput:
    """Loss and implicit rewards beta * score (detached) of chosen and rejected."""
    chosen_rewards = (beta * chosen_scores).detach()
    rejected_rewards = (beta * rejected_scores).detach()
    return CogPOOutput(loss=losses.mean(), losses=losses, chosen_rewards=chosen_rewards,
                       rejected_rewards=rejected_rewards, margins=chosen_rewards - rejected_rewards)


def cogpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: Tensor | float,
    label_smoothing: float = 0.0,
) -> CogPOOutput:
    """CogPO loss: DPO's sigmoid loss with a per-pair beta [B] (or one float for all pairs).

    All log-probs are [B] sequence sums over response tokens. Reference log-probs are treated as constants.
    """
    batch_size = _check_pair_tensors(policy_chosen_logps=policy_chosen_logps,
                                     policy_rejected_logps=policy_rejected_logps, ref_chosen_logps=ref_chosen_logps,
                                     ref_rejected_logps=ref_rejected_logps)
    _check_beta(beta, batch_size)
    _check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                      ref_rejected_logps)
    beta = _beta_like(beta, policy_chosen_logps)
    losses = _smoothed_sigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    return _output(losses, beta, chosen_logratios, rejected_logratios)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> CogPOOutput:
    """Plain DPO (sigmoid loss, cDPO label smoothing): CogPO with one beta for every pair."""
    if isinstance(beta, Tensor):
        raise ValueError("beta must be a float for dpo_loss; use cogpo_loss for per-pair betas")
    return cogpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, float(beta), label_smoothing
    )


PREFERENCE_LOSSES: tuple[str, ...] = ("cogpo", "dpo", "ipo", "simpo")


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: Tensor | float,
) -> CogPOOutput:
    """IPO (Azar et al. 2023, eq. 17) with per-pair beta (tau in the paper), on log-ratios per response token.

    Summed log-ratios make the squared loss grow with response length; like TRL's DPOTrainer, each response's
    log-ratio is divided by its token count first. Rewards are logged as for DPO (beta * summed log-ratio).
    """
    batch_size = _check_pair_tensors(policy_chosen_logps=policy_chosen_logps,
                                     policy_rejected_logps=policy_rejected_logps, ref_chosen_logps=ref_chosen_logps,
                                     ref_rejected_logps=ref_rejected_logps, chosen_tokens=chosen_tokens,
                                     rejected_tokens=rejected_tokens)
    _check_beta(beta, batch_size)
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                      ref_rejected_logps)
    beta = _beta_like(beta, policy_chosen_logps)
    per_token = (chosen_logratios / _response_tokens(chosen_tokens, policy_chosen_logps, "chosen_tokens")
                 - rejected_logratios / _response_tokens(rejected_tokens, policy_chosen_logps, "rejected_tokens"))
    return _output((per_token - 1 / (2 * beta)) ** 2, beta, chosen_logratios, rejected_logratios)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: Tensor | float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> CogPOOutput:
    """SimPO (Meng et al. 2024): reference-free, on the average log-prob per response token, with target margin
    gamma; per-pair beta. Rewards are beta * average log-prob (as TRL's CPOTrainer logs them)."""
    batch_size = _check_pair_tensors(policy_chosen_logps=policy_chosen_logps,
                                     policy_rejected_logps=policy_rejected_logps, chosen_tokens=chosen_tokens,
                                     rejected_tokens=rejected_tokens)
    _check_beta(beta, batch_size)
    _check_label_smoothing(label_smoothing)
    beta = _beta_like(beta, policy_chosen_logps)
    chosen_avg = policy_chosen_logps / _response_tokens(chosen_tokens, policy_chosen_logps, "chosen_tokens")
    rejected_avg = policy_rejected_logps / _response_tokens(rejected_tokens, policy_chosen_logps, "rejected_tokens")
    losses = _smoothed_sigmoid_loss(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return _output(losses, beta, chosen_avg, rejected_avg)


def preference_loss(
    kind: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: Tensor | float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> CogPOOutput:
    """The loss `train.cogpo.loss` names, on [B] summed log-probs and [B] response-token counts. `beta` is
    already resolved per pair (for `dpo` it is one value for all pairs); simpo needs no reference log-probs."""
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {kind!r} (one of {PREFERENCE_LOSSES})")
    if kind == "simpo":
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens, beta,
                          simpo_gamma, label_smoothing)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"the {kind} loss needs reference log-probs")
    if kind == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing does not apply to the ipo loss")
        return ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        chosen_tokens, rejected_tokens, beta)
    return cogpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                      label_smoothing)


def betas_for_gaps(gaps: Sequence[str], gap_betas: Mapping[str, float], device: torch.device | str = "cpu") -> Tensor:
    """Per-pair beta [B] from each pair's gap name, e.g. gap_betas = {"small": 1.0, "medium": 0.5, "large": 0.2}."""
    unknown = sorted(set(gaps) - set(gap_betas))
    if unknown:
        raise ValueError(f"gaps {unknown} have no entry in gap_betas (known: {sorted(gap_betas)})")
    return torch.tensor([float(gap_betas[gap]) for gap in gaps], dtype=torch.float32, device=device)


# --- Metrics ---------------------------------------------------------------------------------------------------

MetricSums = dict[str, tuple[float, float]]


def preference_metric_sums(
    out: CogPOOutput,
    gaps: Sequence[str] | None,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    gap_names: Sequence[str] = GAP_NAMES,
) -> MetricSums:
    """TRL's preference metrics as (sum, count) per name, so micro-batches and ranks can be reduced exactly.

    Names: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}, and with `gaps` also
    rewards/margins/{gap}, rewards/accuracies/{gap} and count/{gap} for every gap in `gap_names` (count 0 when
    absent, so every rank reports the same keys). `finalize_metric_sums` turns them into values: sum / count, except
    count/{gap}, which is the number of pairs of that gap.
    """
    batch_size = out.losses.shape[0]
    if chosen_logps.shape != (batch_size,) or rejected_logps.shape != (batch_size,):
        raise ValueError(
            f"chosen_logps and rejected_logps must have shape [{batch_size}], "
            f"got {tuple(chosen_logps.shape)} and {tuple(rejected_logps.shape)}"
        )
    correct = (out.chosen_rewards > out.rejected_rewards).float()
    # Stack once so the whole dict costs one device sync.
    per_pair = {
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/margins": out.margins,
        "rewards/accuracies": correct,
        "logps/chosen": chosen_logps.detach().float(),
        "logps/rejected": rejected_logps.detach().float(),
    }
    names = list(per_pair)
    sums = [values.float().sum() for values in per_pair.values()]
    counts = [float(batch_size)] * len(names)
    if gaps is not None:
        if len(gaps) != batch_size:
            raise ValueError(f"gaps must have one entry per pair ({batch_size}), got {len(gaps)}")
        unknown = sorted(set(gaps) - set(gap_names))
        if unknown:
            raise ValueError(f"gaps {unknown} are not in gap_names {list(gap_names)}")
        for gap in gap_names:
            in_gap = [i for i, pair_gap in enumerate(gaps) if pair_gap == gap]
            index = torch.tensor(in_gap, dtype=torch.long, device=out.margins.device)
            names += [f"rewards/margins/{gap}", f"rewards/accuracies/{gap}", f"count/{gap}"]
            sums += [out.margins.float()[index].sum(), correct[index].sum(), torch.tensor(float(len(in_gap)))]
            counts += [float(len(in_gap))] * 2 + [1.0]
    values = torch.stack([s.to(out.margins.device) for s in sums]).tolist()
    return {name: (value, count) for name, value, count in zip(names, values, counts, strict=True)}


def merge_metric_sums(parts: Iterable[MetricSums]) -> MetricSums:
    """Add up (sum, count) dicts, e.g. from the micro-batches of one optimizer step."""
    merged: dict[str, list[float]] = {}
    for part in parts:
        for name, (value, count) in part.items():
            total = merged.setdefault(name, [0.0, 0.0])
            total[0] += value
            total[1] += count
    return {name: (value, count) for name, (value, count) in merged.items()}


def all_reduce_metric_sums(sums: MetricSums, device: torch.device | str = "cpu", group=None) -> MetricSums:
    """Sum (sum, count) pairs across data-parallel ranks; every rank must hold the same names. No-op without a
    process group. `device` must suit the backend (cuda for nccl, cpu for gloo)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(sums)
    names = sorted(sums)
    packed = torch.tensor([list(sums[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return {name: (value, count) for name, (value, count) in zip(names, packed.tolist(), strict=True)}


def finalize_metric_sums(sums: MetricSums) -> dict[str, float]:
    """Metric values from (sum, count): the mean, except count/* which is the count itself. Names with no
    samples (a gap absent from the step) are left out rather than reported as 0 or NaN."""
    values: dict[str, float] = {}
    for name, (value, count) in sums.items():
        if name.startswith("count/"):
            values[name] = value
        elif count > 0:
            values[name] = value / count
    return values


def preference_metrics(
    out: CogPOOutput,
    gaps: Sequence[str] | None,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    gap_names: Sequence[str] = GAP_NAMES,
) -> dict[str, float]:
    """TRL-named preference metrics of one batch (see `preference_metric_sums` for the names)."""
    return finalize_metric_sums(preference_metric_sums(out, gaps, chosen_logps, rejected_logps, gap_names))
