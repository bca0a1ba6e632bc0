"""SFT recipe: response tokens only in the loss, averaged over every response token of the optimizer step.

The setup, step loop, checkpoints and export are the shared `TrainLoop` (loop.py); this file is the loss.
"""

from __future__ import annotations

import torch

from crv_ray.train.loop import TrainLoop, batch_token_logps
from crv_ray.train.losses import sft_loss_terms


class SFTRecipe(TrainLoop):
    stage_name = "sft"

    def step_denominator(self, step_plan: list) -> float:
        # The step's response tokens over all micro-batches and ranks: short responses do not weigh more.
        return sum(int(self.rows.loss_tokens[idx].sum()) for micro in step_plan for idx in micro)

    def micro_loss(self, batch: dict, weight: float) -> tuple[torch.Tensor, float]:
        token_logps, labels = batch_token_logps(self.model, batch)
        nll_sum, n_tokens = sft_loss_terms(token_logps, labels)
        return nll_sum, n_tokens.item()


def sft_train_loop(run: dict) -> None:
    """Ray Train `train_loop_per_worker` for SFT."""
    SFTRecipe(run).run_to_end()
