"""CogPO recipe: the preference loss `train.cogpo.loss` names (default: DPO's sigmoid loss with a per-pair beta set
by the pair's gap), averaged over the step's pairs, with TRL's preference metrics per gap.

The setup, step loop, checkpoints and export are the shared `TrainLoop` (loop.py); this file adds the optional
online reference model, the loss and the metrics. Chosen and rejected of a micro-batch go through the model as one
batch of 2B rows.
"""

from __future__ import annotations

import torch

from crv_ray.train.batching import sequence_sums
from crv_ray.train.distributed import setup_model
from crv_ray.train.loop import TrainLoop, batch_token_logps
from crv_ray.train.losses import (all_reduce_metric_sums, finalize_metric_sums, merge_metric_sums, preference_loss,
                                  preference_metric_sums)


class CogPORecipe(TrainLoop):
    stage_name = "cogpo"

    def setup_extra(self) -> None:
        stage = self.stage
        # Same names on every rank (the metric all-reduce needs them); "none" = pairs without a gap.
        self.gap_names = tuple(sorted(set(self.rows.table.column("gap").to_pylist())))
        self.ref_model = None
        if stage.reference == "online" and stage.uses_reference:
            self.ref_model = setup_model(self.model_dir, self.cfg.fsdp, None, stage.logprob_chunk_size,
                                         stage.seed, trainable=False)
        self._metric_sums: list[dict] = []

    def step_denominator(self, step_plan: list) -> float:
        return sum(len(idx) for micro in step_plan for idx in micro)  # the step's pairs on all ranks

    def _sequence_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response-token log-probs of chosen [B] and rejected [B]."""
        seq = sequence_sums(batch_token_logps(model, batch)[0], batch)
        n = seq.shape[0] // 2
        return seq[:n], seq[n:]

    @staticmethod
    def _response_tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Response tokens of chosen [B] and rejected [B] (the positions `_sequence_logps` sums)."""
        counts = sequence_sums(batch["loss_mask"].long(), batch)
        n = counts.shape[0] // 2
        return counts[:n], counts[n:]

    def micro_loss(self, batch: dict, weight: float) -> tuple[torch.Tensor, float]:
        stage = self.stage
        chosen_logps, rejected_logps = self._sequence_logps(self.model, batch)
        ref_chosen = ref_rejected = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected = self._sequence_logps(self.ref_model, batch)
        elif stage.uses_reference:
            ref_chosen, ref_rejected = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
        out = preference_loss(stage.loss, chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                              *self._response_tokens(batch), batch["beta"], stage.label_smoothing, stage.simpo_gamma)
        if weight > 0:
            self._metric_sums.append(preference_metric_sums(out, batch["gap"], chosen_logps.detach(),
                                                            rejected_logps.detach(), self.gap_names))
        return out.losses.sum(), len(out.losses)

    def window_metrics(self) -> dict[str, float]:
        sums = merge_metric_sums(self._metric_sums) if self._metric_sums else {}
        self._metric_sums = []
        return finalize_metric_sums(all_reduce_metric_sums(
            self._complete(sums), device=self.device if self.device.type == "cuda" else "cpu"))

    def _complete(self, sums: dict) -> dict:
        """Every rank must all-reduce the same metric names, even a rank that saw no real pair this window."""
        names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"]
        for gap in self.gap_names:
            names += [f"rewards/margins/{gap}", f"rewards/accuracies/{gap}", f"count/{gap}"]
        return {name: sums.get(name, (0.0, 0.0)) for name in names}


def cogpo_train_loop(run: dict) -> None:
    """Ray Train `train_loop_per_worker` for CogPO."""
    CogPORecipe(run).run_to_end()
