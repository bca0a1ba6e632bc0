"""Benchmark: one CogPO training step of crv-ray's loop (FSDP2 + chunked log-probs + precomputed reference)
against TRL's DPOTrainer (sigmoid DPO, precomputed reference) on the same random-init model, pairs, batch size
and lengths. Each side runs in its own process; figures are tokens/s over the timed steps and peak memory
(GPU: max allocated; CPU: process peak RSS).

    python jobs/bench_train.py                                  # CPU: a small Qwen2-shaped model, 4 pairs x 256
    python jobs/bench_train.py --shape qwen2.5-0.5b --length 1024 --device cuda   # the GPU figure
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=768, vocab_size=32000),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936),
}


def build_model(shape: str, out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from crv_ray.models.builtin import resolve_model

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok_dir = resolve_model("builtin:tiny")  # any tokenizer will do: ids are drawn below its vocab size
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_dir / f).exists():
            (out / f).write_bytes((tok_dir / f).read_bytes())


def make_pairs(n: int, length: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    p = length // 8
    return [{"prompt_ids": [rng.randrange(3, 700) for _ in range(p)],
             "chosen_ids": [rng.randrange(3, 700) for _ in range(length - p)],
             "rejected_ids": [rng.randrange(3, 700) for _ in range(length - p)],
             "ref_chosen_logps": -float(length), "ref_rejected_logps": -float(length)} for _ in range(n)]


def _peak(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_crv(model_dir: Path, pairs: list[dict], steps: int, device: str) -> dict:
    import torch
    import torch.distributed as dist

    from crv_ray.train.config import CogPOConfig, FSDPConfig
    from crv_ray.train.distributed import clip_grad_norm, setup_model, setup_optimizer
    from crv_ray.train.logprobs import shift_labels
    from crv_ray.train.losses import cogpo_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(0)
    stage = CogPOConfig(lr=1e-6, max_length=8192, max_prompt_length=1024)
    model = setup_model(model_dir, FSDPConfig(), None, stage.logprob_chunk_size, 0)
    opt = setup_optimizer(model, stage)
    ids = [p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    mask = [[0] * len(p["prompt_ids"]) + [1] * len(p["chosen_ids"]) for p in pairs] * 2
    input_ids = torch.tensor(ids, device=device)
    loss_mask = torch.tensor(mask, device=device)
    attn = torch.ones_like(input_ids)
    ref = torch.tensor([p["ref_chosen_logps"] for p in pairs], device=device)
    beta = torch.full((len(pairs),), 0.5, device=device)

    def step() -> None:
        labels = shift_labels(input_ids, loss_mask)
        seq = model(input_ids, attn, labels).sum(-1)
        n = len(pairs)
        out = cogpo_loss(seq[:n], seq[n:], ref, ref, beta)
        out.loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, steps, device, input_ids.numel())


def run_trl(model_dir: Path, pairs: list[dict], steps: int, device: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=device == "cpu", bf16=device == "cuda", report_to=[],
                     beta=0.5, loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None,
                     per_device_train_batch_size=len(pairs), gradient_checkpointing=False, max_grad_norm=1.0)
    dummy = Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]})
    trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)
    trainer.current_gradient_accumulation_steps = 1  # normally set inside Trainer.train()
    batch = trainer.data_collator(pairs)
    batch = {k: v.to(trainer.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    n_tokens = batch["input_ids"].numel()

    def step() -> None:
        trainer.training_step(trainer.model, batch)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return _time(step, steps, device, n_tokens)


def _time(step, steps: int, device: str, n_tokens: int) -> dict:
    import torch

    step()  # warm-up: allocator, kernels, optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"step_s": dt, "tokens_per_s": n_tokens / dt, "peak_gib": _peak(device), "tokens_per_step": n_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    pairs = make_pairs(args.pairs, args.length)
    if args.child:
        side, model_dir = args.child
        fn = run_crv if side == "crv" else run_trl
        print("RESULT " + json.dumps(fn(Path(model_dir), pairs, args.steps, args.device)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(args.shape, model_dir)
        res = {}
        for side in ("crv", "trl"):
            cmd = [sys.executable, __file__, "--child", side, str(model_dir), "--shape", args.shape,
                   "--pairs", str(args.pairs), "--length", str(args.length), "--steps", str(args.steps),
                   "--device", args.device]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                sys.exit(f"{side} failed:\n{p.stderr[-4000:]}")
            res[side] = json.loads(line[-1][7:])
            print(f"{side}: {res[side]}", flush=True)
    c, t = res["crv"], res["trl"]
    print(f"\nCogPO step, {args.shape}, {args.pairs} pairs x {args.length} tokens, {args.device}")
    print(f"{'':>10} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9}")
    for name, r in (("crv-ray", c), ("TRL DPO", t)):
        print(f"{name:>10} {r['tokens_per_s']:>10.0f} {r['step_s']:>8.3f} {r['peak_gib']:>9.2f}")
    print(f"ratio crv/TRL: tokens/s {c['tokens_per_s'] / t['tokens_per_s']:.2f}x, peak memory "
          f"{c['peak_gib'] / t['peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
