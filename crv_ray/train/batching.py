"""Batches for the workers: a deterministic plan of row indices per (step, accumulation, rank), and zero-copy
access to the tokenized rows.

Workers memory-map `tokenized.arrow` and take their rows by step index from `plan_epoch`, not from
`ray.train.get_dataset_shard`: every rank must run exactly the same number of micro-batches (FSDP collectives hang
otherwise), the global token count of a step must be known up front to normalise the loss, and resuming at step k
must give exactly the batches an uninterrupted run would have seen. A plan that is a pure function of
(lengths, seed, epoch, world size) gives all three.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crv_ray.train.config import _StageConfig
from crv_ray.train.data import REF_COLUMNS, Kind


def plan_epoch(lengths: np.ndarray, *, world_size: int, micro_batch_size: int, grad_accum: int, seed: int,
               epoch: int, group_by_length: bool, window_steps: int) -> list[list[list[np.ndarray]]]:
    """Row indices for every (step, accum, rank) micro-batch of one epoch: `plan[step][accum][rank]`.

    Deterministic in (lengths, seed, epoch, shape). Every row appears exactly once; a step has at most
    world_size * grad_accum * micro_batch_size rows, split as evenly as possible, so the steps per epoch are
    ceil(rows / step_rows) regardless of grouping. With grouping, rows are shuffled, sorted by length inside
    windows of `window_steps` steps, cut into steps and the steps of a window shuffled again; ranks at the
    same accumulation index get neighbouring lengths, so they wait little on each other.
    """
    n = len(lengths)
    step_rows = world_size * grad_accum * micro_batch_size
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    steps: list[np.ndarray] = []
    window = window_steps * step_rows if group_by_length else n
    for start in range(0, n, max(window, 1)):
        win = order[start: start + window]
        if group_by_length:
            win = win[np.argsort(-lengths[win], kind="stable")]
        chunks = np.array_split(win, math.ceil(len(win) / step_rows))
        if group_by_length:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        steps.extend(chunks)
    plan = []
    for step in steps:
        micro = np.array_split(step, world_size * grad_accum)
        plan.append([[micro[a * world_size + r] for r in range(world_size)] for a in range(grad_accum)])
    return plan


def steps_per_epoch(n_rows: int, world_size: int, micro_batch_size: int, grad_accum: int) -> int:
    return math.ceil(n_rows / (world_size * grad_accum * micro_batch_size))


def padding_fraction(plan: list[list[list[np.ndarray]]], seq_lengths: np.ndarray) -> float:
    """Share of padded positions over all micro-batches; `seq_lengths` is [rows, sequences per row]."""
    padded = real = 0
    for step in plan:
        for accum in step:
            for idx in accum:
                if len(idx) == 0:
                    continue
                lens = seq_lengths[idx].reshape(-1)
                padded += int(lens.max()) * lens.size
                real += int(lens.sum())
    return 0.0 if padded == 0 else 1.0 - real / padded


def split_by_tokens(rows: np.ndarray, row_tokens: np.ndarray, max_tokens: int | None) -> list[np.ndarray]:
    """Cut `rows` (in order) into consecutive micro-batches of at most `max_tokens` tokens each, where
    `row_tokens[i]` counts all sequences of row i (a pair's chosen + rejected travel together). A row over the
    budget goes alone; None = one micro-batch."""
    if max_tokens is None or len(rows) == 0:
        return [rows]
    out, start, used = [], 0, 0
    for j, row in enumerate(rows):
        tokens = int(row_tokens[row])
        if j > start and used + tokens > max_tokens:
            out.append(rows[start:j])
            start, used = j, 0
        used += tokens
    out.append(rows[start:])
    return out


def packed_micro_batches(step_plan: list[list[np.ndarray]], row_tokens: np.ndarray, max_tokens: int | None,
                         rank: int) -> list[np.ndarray]:
    """This rank's micro-batches of one optimizer step under packing: the rows the plan gives the rank for the
    step, re-cut by token budget. Every rank runs as many micro-batches as the busiest one (the FSDP collectives
    must match), so a rank with fewer gets empty ones; all ranks compute the same count from the plan alone.
    Without a budget the plan's micro-batches stay as they are."""
    if max_tokens is None:
        return [micro[rank] for micro in step_plan]
    world = len(step_plan[0])
    per_rank = [split_by_tokens(np.concatenate([micro[r] for micro in step_plan]), row_tokens, max_tokens)
                for r in range(world)]
    n_micro = max(len(m) for m in per_rank)
    mine = per_rank[rank]
    return mine + [np.array([], dtype=np.int64)] * (n_micro - len(mine))


def plan_padding_fraction(seq_lengths: np.ndarray, world_size: int, stage: _StageConfig) -> float:
    """Padding fraction of epoch 0's plan (what data_report.json shows): 0 under packing."""
    if stage.packing:
        return 0.0
    plan = plan_epoch(seq_lengths.max(axis=1), world_size=world_size, micro_batch_size=stage.per_device_batch_size,
                      grad_accum=stage.grad_accum_steps, seed=stage.seed, epoch=0,
                      group_by_length=stage.group_by_length, window_steps=stage.length_group_window)
    return padding_fraction(plan, seq_lengths)


class TokenizedRows:
    """Memory-mapped tokenized dataset (zero-copy: ranks on one node share the page cache)."""

    def __init__(self, path: str | Path):
        self._init(pa.ipc.open_file(pa.memory_map(str(path))).read_all())

    @classmethod
    def from_table(cls, table: pa.Table) -> "TokenizedRows":
        rows = cls.__new__(cls)
        rows._init(table)
        return rows

    def _init(self, table: pa.Table) -> None:
        self.table = table
        self.kind: Kind = "sft" if "input_ids" in self.table.column_names else "pairs"
        self.prompt_len = self.table.column("prompt_len").to_numpy()
        if self.kind == "sft":
            self.seq_lengths = pc.list_value_length(self.table.column("input_ids")).to_numpy()[:, None]
        else:
            self.seq_lengths = np.stack([pc.list_value_length(self.table.column(c)).to_numpy()
                                         for c in ("chosen_ids", "rejected_ids")], axis=1)
        # Response tokens per row, for normalising the loss by the global token count without a collective.
        self.loss_tokens = (self.seq_lengths[:, 0] - self.prompt_len).astype(np.int64)

    def __len__(self) -> int:
        return self.table.num_rows

    def add_columns(self, columns: dict[str, np.ndarray]) -> None:
        """Per-row values computed after tokenization (the workers' reference log-probs); `collate` hands them out
        like the file's own columns."""
        for name, values in columns.items():
            if len(values) != len(self):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(self)} rows")
            if name in self.table.column_names:
                self.table = self.table.drop_columns([name])
            self.table = self.table.append_column(name, pa.array(values))

    @property
    def lengths(self) -> np.ndarray:
        return self.seq_lengths.max(axis=1)

    def _ids(self, col: str, i: int) -> np.ndarray:
        return self.table.column(col)[int(i)].values.to_numpy()

    @property
    def row_tokens(self) -> np.ndarray:
        """Tokens of each row, all its sequences together (what a packed micro-batch holds)."""
        return self.seq_lengths.sum(axis=1)

    def collate(self, idx: np.ndarray, pad_id: int, packed: bool = False) -> dict:
        """SFT: one sequence per row; pairs: chosen sequences then rejected sequences.

        Padded (default): one right-padded row per sequence. Packed: all sequences in ONE row without padding,
        with `position_ids` restarting at 0 for each sequence (the model keeps them apart by those) and
        `seq_index` [1, T] saying which sequence each token belongs to; `attention_mask` is then all ones and
        only counts tokens."""
        import torch

        cols = ["input_ids"] if self.kind == "sft" else ["chosen_ids", "rejected_ids"]
        seqs, plens = [], []
        for col in cols:
            for i in idx:
                seqs.append(self._ids(col, i))
                plens.append(int(self.prompt_len[i]))
        if packed:
            batch = self._packed(seqs, plens)
        else:
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
            loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
            for j, (s, p) in enumerate(zip(seqs, plens)):
                input_ids[j, : len(s)] = torch.from_numpy(s.astype(np.int64))
                attention_mask[j, : len(s)] = 1
                loss_mask[j, p: len(s)] = True
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
        if self.kind == "pairs":
            batch["beta"] = torch.tensor(self.table.column("beta").take(pa.array(idx, pa.int64())).to_numpy(),
                                         dtype=torch.float32)
            batch["gap"] = self.table.column("gap").take(pa.array(idx, pa.int64())).to_pylist()
            for col in REF_COLUMNS:
                if col in self.table.column_names:
                    batch[col] = torch.tensor(
                        self.table.column(col).take(pa.array(idx, pa.int64())).to_numpy(), dtype=torch.float32)
        return batch

    @staticmethod
    def _packed(seqs: list[np.ndarray], plens: list[int]) -> dict:
        import torch

        if min(plens) < 1:  # a sequence's first label would otherwise be the previous sequence's last token
            raise ValueError("packing needs every sequence to start with at least one prompt token")
        lengths = [len(s) for s in seqs]
        input_ids = torch.from_numpy(np.concatenate(seqs).astype(np.int64))[None]
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        seq_index = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths))[None]
        loss_mask = position_ids >= torch.tensor(plens).repeat_interleave(torch.tensor(lengths))[None]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "loss_mask": loss_mask,
                "position_ids": position_ids, "seq_index": seq_index}


def sequence_sums(values, batch: dict):
    """Per-sequence sums [S] of a per-position tensor [rows, T] of a padded or packed batch (see `collate`); in
    the padded layout positions outside a sequence must hold 0 (token log-probs at ignored labels do)."""
    if "seq_index" not in batch:
        return values.sum(dim=-1)
    index = batch["seq_index"].reshape(-1)
    n_seqs = int(index[-1]) + 1
    return values.new_zeros(n_seqs).index_add(0, index, values.reshape(-1))
