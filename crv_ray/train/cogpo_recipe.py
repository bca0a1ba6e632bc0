"""CogPO recipe: the preference loss `train.cogpo.loss` names (default: DPO's sigmoid loss with a per-pair beta set
by the pair's gap), averaged over the step's pairs, with TRL's preference metrics per gap.

The setup, step loop, checkpoints and export are the shared `TrainLoop` (loop.py); this file adds the reference
log-probs (computed by the workers with the starting model before step 1, or an online reference model), the loss
and the metrics. Chosen and rejected of a micro-batch go through the model as one batch of 2B rows.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from crv_ray import storage
from crv_ray.refine.store import write_parquet_atomic
from crv_ray.train.batching import sequence_sums
from crv_ray.train.data import REF_COLUMNS
from crv_ray.train.distributed import reshard, setup_model
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
        elif stage.uses_reference and not all(c in self.rows.table.column_names for c in REF_COLUMNS):
            self.rows.add_columns(self._reference_logps())
        self._metric_sums: list[dict] = []

    def _reference_logps(self) -> dict[str, np.ndarray]:
        """The starting model's summed response log-probs of every pair, from this run's file when an earlier
        attempt wrote it, else computed now. Called before any checkpoint is loaded, so the model is the starting
        (SFT) model whatever the attempt: the policy itself, with its sharding and precision, so the reference
        equals the policy's own log-probs at step 1 (a separate pass in another dtype would not)."""
        path = storage.as_path(self.run["ref_logps_file"])
        if path.is_file():
            table = storage.read_table(path)
            if table.num_rows == len(self.rows):
                return {c: table.column(c).to_numpy() for c in REF_COLUMNS}
        t0 = time.perf_counter()
        out = self._score_rows_with_model()
        if self.rank == 0:
            write_parquet_atomic(path, pa.table({c: out[:, i] for i, c in enumerate(REF_COLUMNS)}))
            print(f"[cogpo] reference log-probs of {len(self.rows)} pairs computed by {self.world} worker(s) in "
                  f"{time.perf_counter() - t0:.1f}s -> {path}", flush=True)
        return {c: out[:, i] for i, c in enumerate(REF_COLUMNS)}

    def _score_rows_with_model(self) -> np.ndarray:
        """[rows, 2] (chosen, rejected) log-probs, scored in the micro-batches of the first epoch's plan: the same
        shapes as training's first pass, so under bf16 the policy's step-1 log-probs equal these (other batch
        shapes round differently: ~0.5 nats per 100-token sequence on a CPU). Every rank runs as many forwards (FSDP
        gathers parameters collectively); a sum all-reduce joins the ranks' rows."""
        out = torch.zeros((len(self.rows), 2), dtype=torch.float64, device=self.device)
        self.model.eval()  # no dropout in the reference
        with torch.no_grad():
            for step_plan in self._plan(0):
                for idx, batch, weight in self.micro_batches(step_plan):
                    chosen, rejected = self._sequence_logps(self.model, batch)
                    if weight > 0:
                        rows = torch.as_tensor(idx, device=self.device)
                        out[rows, 0], out[rows, 1] = chosen.double(), rejected.double()
        self.model.train()
        reshard(self.model)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(out)
        return out.cpu().numpy()

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
