"""The training loop every recipe shares (run inside each Ray Train worker, FSDP2).

Read top to bottom: setup (model, optimizer, schedule, data plan, resume from the latest checkpoint), the step loop
(micro-batches, clip, optimizer step, log / checkpoint / stop cadence), then export and cleanup. A recipe
(sft_recipe.py, cogpo_recipe.py) subclasses `TrainLoop` and supplies only what differs: its config section, the
loss of one micro-batch, the step's loss denominator, and optionally extra models and metrics.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from crv_ray import storage
from crv_ray.run_paths import stage_model
from crv_ray.train.batching import TokenizedRows, packed_micro_batches, plan_epoch, steps_per_epoch
from crv_ray.train.checkpoint import load_latest_checkpoint, save_checkpoint
from crv_ray.train.config import TrainConfig
from crv_ray.train.distributed import (MetricsLogger, all_reduce_sum, check_sharded, clip_grad_norm, device,
                                       maybe_inject_failure, peak_memory_mb, rank_and_world, seed_all, setup_model, setup_optimizer,
                                       setup_scheduler, uses_cpu_offload, worker_node_count)
from crv_ray.train.export import export_model
from crv_ray.train.logprobs import shift_labels


def batch_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(token log-probs, labels), both [rows, T], of a padded or packed batch (batching.TokenizedRows.collate)."""
    labels = shift_labels(batch["input_ids"], batch["loss_mask"])
    if "position_ids" in batch:  # packed: the restarting positions, not a mask, keep the sequences apart
        return model(batch["input_ids"], None, labels, batch["position_ids"]), labels
    return model(batch["input_ids"], batch["attention_mask"], labels), labels


class TrainLoop:
    """One worker's run of a stage. Subclasses set `stage_name` and implement `step_denominator` and
    `micro_loss`; `setup_extra` and `window_metrics` are optional hooks."""

    stage_name: str  # the TrainConfig section: "sft" or "cogpo"

    def __init__(self, run: dict):
        self.cfg = TrainConfig.model_validate(run["train_cfg"])
        self.stage = getattr(self.cfg, self.stage_name)
        self.run = run
        self.out_dir = storage.as_path(run["out_dir"])
        # Local files for what is read as files (a run_dir on object storage: copied once per node).
        self.model_dir = str(storage.local_copy(run["model_dir"]))
        self.data_file = str(storage.local_copy(run["data_file"]))
        self.rank, self.world = rank_and_world()
        self.device = device()
        self.pad_id = int(run["pad_id"])
        self._plans: dict[int, list] = {}

    # --- what a recipe supplies ---------------------------------------------------------------------------------

    def setup_extra(self) -> None:
        """Called after the trained model is built and before the optimizer (e.g. a frozen reference model)."""

    def step_denominator(self, step_plan: list) -> float:
        """What the step's loss is averaged over, on all ranks and micro-batches (known from the plan alone)."""
        raise NotImplementedError

    def micro_loss(self, batch: dict, weight: float) -> tuple[torch.Tensor, float]:
        """(summed loss of the micro-batch, how many units of `step_denominator` it holds). `weight` is 0 for a
        padding micro-batch that only keeps collectives matched: keep it out of any metric."""
        raise NotImplementedError

    def window_metrics(self) -> dict[str, float]:
        """Extra metrics since the last log, reduced over ranks (a collective: every rank calls it)."""
        return {}

    # --- the shared skeleton ------------------------------------------------------------------------------------

    def setup(self) -> None:
        stage = self.stage
        seed_all(stage.seed)
        self.rows = TokenizedRows(self.data_file)
        self.steps_per_epoch = steps_per_epoch(len(self.rows), self.world, stage.per_device_batch_size,
                                               stage.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * stage.epochs
        self.engine = None  # the DeepSpeed engine under strategy: deepspeed (it is then also self.model)
        if self.cfg.strategy == "deepspeed":
            from crv_ray.train.deepspeed_strategy import load_latest_deepspeed_checkpoint, setup_deepspeed_engine

            self.engine, self.optimizer = setup_deepspeed_engine(self.model_dir, self.cfg, stage)
            self.model = self.engine
            self.setup_extra()
            self.scheduler = setup_scheduler(self.optimizer, stage, self.total_steps)
            state = load_latest_deepspeed_checkpoint(self.engine, self.scheduler)
        else:
            self.model = setup_model(self.model_dir, self.cfg.fsdp, self.cfg.lora, stage.logprob_chunk_size,
                                     stage.seed, kernels=stage.kernels)
            self.setup_extra()
            if self.cfg.fsdp.enabled and torch.distributed.is_initialized():  # setup_model sharded it
                check_sharded(self.model)
            self.optimizer = setup_optimizer(self.model, stage, uses_cpu_offload(self.cfg.fsdp, self.device))
            self.scheduler = setup_scheduler(self.optimizer, stage, self.total_steps)
            state = load_latest_checkpoint(self.model, self.optimizer, self.scheduler)
        self.global_step = 0 if state is None else int(state["global_step"])
        if state is None:
            seed_all(stage.seed + self.rank)  # per-rank stream (dropout); restored from the checkpoint on resume
        self.nodes = worker_node_count()
        self.logger = MetricsLogger(self.out_dir, enabled=self.rank == 0, resumed=state is not None)

    def _plan(self, epoch: int) -> list:
        if epoch not in self._plans:
            s = self.stage
            self._plans = {epoch: plan_epoch(self.rows.lengths, world_size=self.world,
                                             micro_batch_size=s.per_device_batch_size, grad_accum=s.grad_accum_steps,
                                             seed=s.seed, epoch=epoch, group_by_length=s.group_by_length,
                                             window_steps=s.length_group_window)}
        return self._plans[epoch]

    def micro_batches(self, step_plan: list) -> list[tuple[np.ndarray, dict, float]]:
        """This rank's micro-batches of one step as (rows, batch on the device, weight). Every rank gets as many:
        where the plan has no rows for this rank, one row with weight 0 keeps the collectives matched."""
        stage = self.stage
        if stage.packing:
            parts = packed_micro_batches(step_plan, self.rows.row_tokens, stage.max_tokens_per_micro_batch, self.rank)
        else:
            parts = [micro[self.rank] for micro in step_plan]
        out = []
        for idx in parts:
            rows, weight = (idx, 1.0) if len(idx) else (np.array([0]), 0.0)
            raw = self.rows.collate(rows, self.pad_id, packed=stage.packing)
            out.append((idx, {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in raw.items()}, weight))
        return out

    def train(self) -> bool:
        """Run to the end (True) or to `stop_after_steps` (False)."""
        stage, model = self.stage, self.model
        model.train()
        window = np.zeros(2)  # real tokens, padded positions (global, since last log)
        t_last = time.perf_counter()
        while self.global_step < self.total_steps:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            step_plan = self._plan(epoch)[step_in_epoch]
            denominator = max(self.step_denominator(step_plan), 1)
            local = np.zeros(4)  # loss sum, loss units, real tokens, padded positions
            micro_batches = self.micro_batches(step_plan)
            for i_micro, (_, batch, weight) in enumerate(micro_batches):
                loss_sum, units = self.micro_loss(batch, weight)
                # Mean over the step on all ranks; FSDP and ZeRO average gradients over ranks, hence * world.
                scaled = loss_sum * (weight * self.world / denominator)
                if self.engine is not None:
                    self.engine.set_gradient_accumulation_boundary(i_micro == len(micro_batches) - 1)
                    self.engine.backward(scaled)
                else:
                    scaled.backward()
                local += weight * np.array([loss_sum.item(), units, int(batch["attention_mask"].sum()),
                                            batch["input_ids"].numel()])
            lr = self.scheduler.get_last_lr()[0]
            if self.engine is not None:
                self.engine.step()  # clips to gradient_clipping, steps the optimizer, zeroes the gradients
                grad_norm = float(self.engine.get_global_grad_norm())
            else:
                grad_norm = clip_grad_norm(model, stage.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.global_step += 1
            step_sums = np.array(all_reduce_sum(local.tolist()))
            maybe_inject_failure(self.out_dir, self.rank, self.global_step)
            window += step_sums[2:]

            metrics = None
            if self.global_step % stage.log_every_steps == 0 or self.global_step == self.total_steps:
                elapsed = time.perf_counter() - t_last
                metrics = {"loss": step_sums[0] / max(step_sums[1], 1), "lr": lr, "grad_norm": grad_norm,
                           "epoch": epoch, "tokens_per_s": window[0] / max(elapsed, 1e-9),
                           "padding_fraction": 1 - window[0] / max(window[1], 1), "peak_memory_mb": peak_memory_mb(),
                           "nodes": self.nodes,
                           **self.window_metrics()}
                metrics = {k: float(v) for k, v in metrics.items()}
                self.logger.log(self.global_step, metrics)
                window[:] = 0
            stop = stage.stop_after_steps is not None and self.global_step >= stage.stop_after_steps
            # Only checkpoints are reported to Ray Train; metrics go to metrics.jsonl (rank 0). Ray Train 2.60 takes
            # one report per controller poll (2 s; its result queue holds one): a report every step capped training
            # at 0.5 steps/s.
            if self.global_step % stage.checkpoint_every_steps == 0 or stop or self.global_step == self.total_steps:
                self._save(metrics or {})
            if metrics is not None:
                t_last = time.perf_counter()  # checkpoint time is not training throughput
            if stop and self.global_step < self.total_steps:
                return False
        return True

    def _save(self, metrics: dict) -> None:
        if self.engine is not None:
            from crv_ray.train.deepspeed_strategy import save_deepspeed_checkpoint

            save_deepspeed_checkpoint(self.engine, self.scheduler,
                                      {"global_step": self.global_step, "config_hash": self.run["config_hash"]},
                                      {"step": self.global_step, **metrics})
            return
        save_checkpoint(self.model, self.optimizer, self.scheduler,
                        {"global_step": self.global_step, "config_hash": self.run["config_hash"]},
                        {"step": self.global_step, **metrics})

    def export(self) -> None:
        state_dict = None
        if self.engine is not None:
            from crv_ray.train.deepspeed_strategy import deepspeed_full_state_dict

            state_dict = deepspeed_full_state_dict(self.engine)
        export_model(self.model, self.model_dir, stage_model(self.out_dir), self.cfg.lora, state_dict)

    def cleanup(self) -> None:
        self.logger.close()

    def run_to_end(self) -> None:
        """A worker's whole life: setup, train, export when training ran to the end, cleanup."""
        self.setup()
        if self.train():
            self.export()
        self.cleanup()
