"""CogPO recipe: one Ray Train worker's loop (FSDP2). DPO's sigmoid loss with a per-pair beta set by the pair's gap.

Read top to bottom: setup (policy, optional online reference, optimizer, schedule, data plan, resume), then the
step loop, then export. Chosen and rejected of a micro-batch go through the model as one batch of 2B rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray.train
import torch

from crv_ray.train.batching import TokenizedRows, plan_epoch, steps_per_epoch
from crv_ray.train.checkpoint import load_latest_checkpoint, save_checkpoint
from crv_ray.train.config import TrainConfig
from crv_ray.train.distributed import (run_recipe, MetricsLogger, all_reduce_sum, clip_grad_norm, device, peak_memory_mb,
                                       rank_and_world, seed_all, setup_model, setup_optimizer, setup_scheduler,
                                       uses_cpu_offload, maybe_inject_failure)
from crv_ray.train.export import export_model
from crv_ray.train.logprobs import shift_labels
from crv_ray.train.losses import (all_reduce_metric_sums, finalize_metric_sums, merge_metric_sums,
                                  preference_loss, preference_metric_sums)


class CogPORecipe:
    def __init__(self, run: dict):
        self.cfg = TrainConfig.model_validate(run["train_cfg"])
        self.stage = self.cfg.cogpo
        self.run = run
        self.out_dir = Path(run["out_dir"])
        self.rank, self.world = rank_and_world()
        self.device = device()

    def setup(self) -> None:
        stage = self.stage
        seed_all(stage.seed)
        self.rows = TokenizedRows(self.run["data_file"])
        # Same names on every rank (the metric all-reduce needs them); "none" = pairs without a gap.
        self.gap_names = tuple(sorted(set(self.rows.table.column("gap").to_pylist())))
        self.steps_per_epoch = steps_per_epoch(len(self.rows), self.world, stage.per_device_batch_size,
                                               stage.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * stage.epochs
        self.model = setup_model(self.run["model_dir"], self.cfg.fsdp, self.cfg.lora, stage.logprob_chunk_size,
                                 stage.seed)
        self.ref_model = None
        if stage.reference == "online" and stage.uses_reference:
            self.ref_model = setup_model(self.run["model_dir"], self.cfg.fsdp, None, stage.logprob_chunk_size,
                                         stage.seed, trainable=False)
        self.optimizer = setup_optimizer(self.model, stage, uses_cpu_offload(self.cfg.fsdp, self.device))
        self.scheduler = setup_scheduler(self.optimizer, stage, self.total_steps)
        state = load_latest_checkpoint(self.model, self.optimizer, self.scheduler)
        self.global_step = 0 if state is None else int(state["global_step"])
        if state is None:
            seed_all(stage.seed + self.rank)
        self.pad_id = int(self.run["pad_id"])
        self.logger = MetricsLogger(self.out_dir, enabled=self.rank == 0, resumed=state is not None)
        self._plans: dict[int, list] = {}

    def _plan(self, epoch: int) -> list:
        if epoch not in self._plans:
            s = self.stage
            self._plans = {epoch: plan_epoch(self.rows.lengths, world_size=self.world,
                                             micro_batch_size=s.per_device_batch_size, grad_accum=s.grad_accum_steps,
                                             seed=s.seed, epoch=epoch, group_by_length=s.group_by_length,
                                             window_steps=s.length_group_window)}
        return self._plans[epoch]

    def _sequence_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response-token log-probs of chosen [B] and rejected [B]."""
        labels = shift_labels(batch["input_ids"], batch["loss_mask"])
        seq = model(batch["input_ids"], batch["attention_mask"], labels).sum(dim=-1)
        n = seq.shape[0] // 2
        return seq[:n], seq[n:]

    @staticmethod
    def _response_tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Response tokens of chosen [B] and rejected [B] (the positions `_sequence_logps` sums)."""
        counts = batch["loss_mask"].sum(dim=-1)
        n = counts.shape[0] // 2
        return counts[:n], counts[n:]

    def train(self) -> bool:
        """Run to the end (True) or to `stop_after_steps` (False)."""
        stage, model = self.stage, self.model
        model.train()
        window = np.zeros(2)  # real tokens, padded positions (global, since last log)
        window_metrics: list[dict] = []
        t_last = time.perf_counter()
        while self.global_step < self.total_steps:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            step_plan = self._plan(epoch)[step_in_epoch]
            global_pairs = sum(len(idx) for micro in step_plan for idx in micro)
            local = np.zeros(3)  # loss sum, real tokens, padded positions
            for micro in step_plan:
                idx, weight = micro[self.rank], 1.0
                if len(idx) == 0:  # fewer pairs than micro-batches: a zero-weight batch keeps collectives matched
                    idx, weight = np.array([0]), 0.0
                raw = self.rows.collate(idx, self.pad_id)
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in raw.items()}
                chosen_logps, rejected_logps = self._sequence_logps(model, batch)
                ref_chosen = ref_rejected = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_chosen, ref_rejected = self._sequence_logps(self.ref_model, batch)
                elif stage.uses_reference:
                    ref_chosen, ref_rejected = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
                out = preference_loss(stage.loss, chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                                      *self._response_tokens(batch), batch["beta"], stage.label_smoothing,
                                      stage.simpo_gamma)
                # Mean over the step's pairs on all ranks; FSDP averages gradients over ranks, hence * world.
                (out.losses.sum() * (weight * self.world / max(global_pairs, 1))).backward()
                local += weight * np.array([out.losses.sum().item(), int(batch["attention_mask"].sum()),
                                            batch["input_ids"].numel()])
                if weight > 0:
                    window_metrics.append(preference_metric_sums(out, batch["gap"], chosen_logps.detach(),
                                                                 rejected_logps.detach(), self.gap_names))
            grad_norm = clip_grad_norm(model, stage.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            step_sums = np.array(all_reduce_sum(local.tolist()))
            maybe_inject_failure(self.out_dir, self.rank, self.global_step)
            window += step_sums[1:]

            metrics = None
            if self.global_step % stage.log_every_steps == 0 or self.global_step == self.total_steps:
                elapsed = time.perf_counter() - t_last
                pref = merge_metric_sums(window_metrics) if window_metrics else {}
                pref = finalize_metric_sums(all_reduce_metric_sums(
                    self._complete(pref), device=self.device if self.device.type == "cuda" else "cpu"))
                metrics = {"loss": step_sums[0] / max(global_pairs, 1), "lr": lr, "grad_norm": grad_norm,
                           "epoch": epoch, "tokens_per_s": window[0] / max(elapsed, 1e-9),
                           "padding_fraction": 1 - window[0] / max(window[1], 1), "peak_memory_mb": peak_memory_mb(),
                           **pref}
                metrics = {k: float(v) for k, v in metrics.items()}
                self.logger.log(self.global_step, metrics)
                window[:], window_metrics = 0, []
            stop = stage.stop_after_steps is not None and self.global_step >= stage.stop_after_steps
            if self.global_step % stage.checkpoint_every_steps == 0 or stop or self.global_step == self.total_steps:
                self._save(metrics or {})
            elif metrics is not None:
                ray.train.report({"step": self.global_step, **metrics})
            if metrics is not None:
                t_last = time.perf_counter()  # checkpoint time is not training throughput
            if stop and self.global_step < self.total_steps:
                return False
        return True

    def _complete(self, sums: dict) -> dict:
        """Every rank must all-reduce the same metric names, even a rank that saw no real pair this window."""
        names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"]
        for gap in self.gap_names:
            names += [f"rewards/margins/{gap}", f"rewards/accuracies/{gap}", f"count/{gap}"]
        return {name: sums.get(name, (0.0, 0.0)) for name in names}

    def _save(self, metrics: dict) -> None:
        save_checkpoint(self.model, self.optimizer, self.scheduler,
                        {"global_step": self.global_step, "config_hash": self.run["config_hash"]},
                        {"step": self.global_step, **metrics})

    def export(self) -> None:
        export_model(self.model, self.run["model_dir"], self.out_dir / "model", self.cfg.lora)

    def cleanup(self) -> None:
        self.logger.close()


def cogpo_train_loop(run: dict) -> None:
    """Ray Train `train_loop_per_worker` for CogPO."""
    run_recipe(CogPORecipe(run))
