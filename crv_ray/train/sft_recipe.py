"""SFT recipe: one Ray Train worker's loop (FSDP2), response tokens only in the loss.

Read top to bottom: setup (model, optimizer, schedule, data plan, resume), then the step loop, then export.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray.train

from crv_ray.train.batching import TokenizedRows, plan_epoch, steps_per_epoch
from crv_ray.train.checkpoint import load_latest_checkpoint, save_checkpoint
from crv_ray.train.config import TrainConfig
from crv_ray.train.distributed import (run_recipe, MetricsLogger, all_reduce_sum, clip_grad_norm, device, peak_memory_mb,
                                       rank_and_world, seed_all, setup_model, setup_optimizer, setup_scheduler,
                                       uses_cpu_offload, maybe_inject_failure)
from crv_ray.train.export import export_model
from crv_ray.train.logprobs import shift_labels
from crv_ray.train.losses import sft_loss_terms


class SFTRecipe:
    def __init__(self, run: dict):
        self.cfg = TrainConfig.model_validate(run["train_cfg"])
        self.stage = self.cfg.sft
        self.run = run
        self.out_dir = Path(run["out_dir"])
        self.rank, self.world = rank_and_world()
        self.device = device()

    def setup(self) -> None:
        stage = self.stage
        seed_all(stage.seed)
        self.rows = TokenizedRows(self.run["data_file"])
        self.steps_per_epoch = steps_per_epoch(len(self.rows), self.world, stage.per_device_batch_size,
                                               stage.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * stage.epochs
        self.model = setup_model(self.run["model_dir"], self.cfg.fsdp, self.cfg.lora, stage.logprob_chunk_size,
                                 stage.seed)
        self.optimizer = setup_optimizer(self.model, stage, uses_cpu_offload(self.cfg.fsdp, self.device))
        self.scheduler = setup_scheduler(self.optimizer, stage, self.total_steps)
        state = load_latest_checkpoint(self.model, self.optimizer, self.scheduler)
        self.global_step = 0 if state is None else int(state["global_step"])
        if state is None:
            seed_all(stage.seed + self.rank)  # per-rank stream (dropout); restored from the checkpoint on resume
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

    def train(self) -> bool:
        """Run to the end (True) or to `stop_after_steps` (False)."""
        stage, model = self.stage, self.model
        model.train()
        window = np.zeros(4)  # nll sum, loss tokens, real tokens, padded positions (global, since last log)
        t_last = time.perf_counter()
        while self.global_step < self.total_steps:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            step_plan = self._plan(epoch)[step_in_epoch]
            # Normalise by the step's response tokens over all micro-batches and ranks (known from the plan).
            global_tokens = sum(int(self.rows.loss_tokens[idx].sum()) for micro in step_plan for idx in micro)
            local = np.zeros(4)
            for micro in step_plan:
                idx, weight = micro[self.rank], 1.0
                if len(idx) == 0:  # fewer rows than micro-batches: run a zero-weight batch so collectives match
                    idx, weight = np.array([0]), 0.0
                batch = {k: v.to(self.device) for k, v in self.rows.collate(idx, self.pad_id).items()}
                labels = shift_labels(batch["input_ids"], batch["loss_mask"])
                token_logps = model(batch["input_ids"], batch["attention_mask"], labels)
                nll_sum, n_tokens = sft_loss_terms(token_logps, labels)
                # FSDP averages gradients over ranks, hence * world.
                (nll_sum * (weight * self.world / max(global_tokens, 1))).backward()
                real = int(batch["attention_mask"].sum())
                local += weight * np.array([nll_sum.item(), n_tokens.item(), real, batch["input_ids"].numel()])
            grad_norm = clip_grad_norm(model, stage.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            step_sums = np.array(all_reduce_sum(local.tolist()))
            maybe_inject_failure(self.out_dir, self.rank, self.global_step)
            window += step_sums

            metrics = None
            if self.global_step % stage.log_every_steps == 0 or self.global_step == self.total_steps:
                elapsed = time.perf_counter() - t_last
                metrics = {"loss": step_sums[0] / max(step_sums[1], 1), "lr": lr, "grad_norm": grad_norm,
                           "epoch": epoch, "tokens_per_s": window[2] / max(elapsed, 1e-9),
                           "padding_fraction": 1 - window[2] / max(window[3], 1), "peak_memory_mb": peak_memory_mb()}
                metrics = {k: float(v) for k, v in metrics.items()}
                self.logger.log(self.global_step, metrics)
                window[:] = 0
            stop = stage.stop_after_steps is not None and self.global_step >= stage.stop_after_steps
            if self.global_step % stage.checkpoint_every_steps == 0 or stop or self.global_step == self.total_steps:
                self._save(metrics or {"step": self.global_step})
            elif metrics is not None:
                ray.train.report({"step": self.global_step, **metrics})
            if metrics is not None:
                t_last = time.perf_counter()  # checkpoint time is not training throughput
            if stop and self.global_step < self.total_steps:
                return False
        return True

    def _save(self, metrics: dict) -> None:
        save_checkpoint(self.model, self.optimizer, self.scheduler,
                        {"global_step": self.global_step, "config_hash": self.run["config_hash"]},
                        {"step": self.global_step, **metrics})

    def export(self) -> None:
        export_model(self.model, self.run["model_dir"], self.out_dir / "model", self.cfg.lora)

    def cleanup(self) -> None:
        self.logger.close()


def sft_train_loop(run: dict) -> None:
    """Ray Train `train_loop_per_worker` for SFT."""
    run_recipe(SFTRecipe(run))

