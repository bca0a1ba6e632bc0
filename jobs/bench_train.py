"""Benchmark: one CogPO training step of crv-ray's loop (chunked log-probs, precomputed reference) in several
variants, against TRL's DPOTrainer (sigmoid DPO, precomputed reference) on the same random-init model, pairs and
lengths. Each variant runs in its own process; figures are real (non-padding) tokens/s over the timed steps, peak
memory (GPU: max allocated; CPU: process peak RSS), the padding fraction and, on GPU, MFU.

A variant is a preset name (see VARIANTS) or `crv:key=value,...` / `trl:key=value,...` with the keys of
CRV_DEFAULTS / TRL_DEFAULTS, e.g. `crv:packing=true,kernels=compile,ac=selective`.

    python jobs/bench_train.py                                  # CPU: small Qwen2-shaped model, 4 pairs x 256
    python jobs/bench_train.py --variants crv,crv-ac-full,crv-ac-sel --pairs 4 --length 1024
    python jobs/bench_train.py --shape qwen2.5-0.5b --pairs 16 --length 1024 --device cuda --variants all-gpu

MFU = tokens/s x (6 x matmul parameters, LM head included + 6 x layers x sequence length x hidden) / 989e12
(dense bf16 of an H100 SXM); the sequence length is the token-weighted mean of the step's sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
CRV_DEFAULTS = {"optimizer": "fused", "packing": False, "kernels": "none", "ac": "off", "ac_every": 2,
                "save_matmuls": False, "strategy": "fsdp2",
                "precision": "auto"}
TRL_DEFAULTS = {"padding_free": False, "liger": False, "gradient_checkpointing": False}
VARIANTS = {
    "crv": "crv:", "crv-foreach": "crv:optimizer=foreach", "crv-plain": "crv:optimizer=plain",
    "crv-packed": "crv:packing=true", "crv-compile": "crv:kernels=compile", "crv-liger": "crv:kernels=liger",
    "crv-ac-full": "crv:ac=full", "crv-ac-sel": "crv:ac=selective",
    "crv-ac-sel-mm": "crv:ac=selective,save_matmuls=true",
    "crv-deepspeed": "crv:strategy=deepspeed", "crv-best": "crv:packing=true,kernels=liger,ac=selective",
    "trl": "trl:", "trl-best": "trl:padding_free=true,liger=true",
}
GROUPS = {
    "default": ["crv", "trl"],
    "all-cpu": ["crv", "crv-foreach", "crv-plain", "crv-packed", "crv-compile", "crv-ac-full", "crv-ac-sel",
                "crv-ac-sel-mm", "crv-deepspeed", "trl", "trl-best"],
    "all-gpu": ["crv", "crv-foreach", "crv-packed", "crv-compile", "crv-liger", "crv-ac-sel", "crv-deepspeed",
                "crv-best", "trl", "trl-best"],
}
LENGTHS_FILE = Path(__file__).parent / "data" / "demo_pair_lengths.json"


def parse_variant(spec: str) -> tuple[str, dict]:
    """'crv:packing=true,kernels=compile' -> ('crv', {...defaults, packing: True, kernels: 'compile'})."""
    spec = VARIANTS.get(spec, spec)
    side, _, opts = spec.partition(":")
    defaults = {"crv": CRV_DEFAULTS, "trl": TRL_DEFAULTS}.get(side)
    if defaults is None:
        raise SystemExit(f"variant {spec!r}: unknown side {side!r} (crv or trl) or preset ({sorted(VARIANTS)})")
    out = dict(defaults)
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise SystemExit(f"variant {spec!r}: unknown option {key!r} (one of {sorted(defaults)})")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return side, out


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


def pair_lengths(n: int, length: int, mixed: bool, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts. Uniform: every sequence `length` long, prompt length/8. Mixed: the
    demo run's real pairs (jobs/data/demo_pair_lengths.json) drawn with replacement and scaled so that the mean
    sequence length is `length`."""
    if not mixed:
        p = length // 8
        return [(p, length - p, length - p)] * n
    real = json.loads(LENGTHS_FILE.read_text())["lengths"]
    rng = random.Random(seed)
    picked = [rng.choice(real) for _ in range(n)]
    mean = sum(2 * p + c + r for p, c, r in picked) / (2 * n)
    s = length / mean
    return [(max(1, round(p * s)), max(1, round(c * s)), max(1, round(r * s))) for p, c, r in picked]


def make_pairs(lengths: list[tuple[int, int, int]], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, 700) for _ in range(k)]

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r),
             "ref_chosen_logps": -float(p + c), "ref_rejected_logps": -float(p + r)} for p, c, r in lengths]


def real_tokens(pairs: list[dict]) -> int:
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def flops_per_token(shape: str, pairs: list[dict]) -> float:
    """6 x matmul parameters (LM head included) + 6 x layers x sequence length x hidden."""
    s = SHAPES[shape]
    h, n_layers = s["hidden_size"], s["num_hidden_layers"]
    heads, kv = s["num_attention_heads"], s["num_key_value_heads"]
    hd = h // heads
    per_layer = h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * s["intermediate_size"]
    matmul_params = n_layers * per_layer + s["vocab_size"] * h
    seqs = [len(p["prompt_ids"]) + len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    seq = sum(n * n for n in seqs) / sum(seqs)  # the mean length a token attends over
    return 6 * matmul_params + 6 * n_layers * seq * h


def saved_for_backward_gib(forward) -> float:
    """GiB that autograd keeps for backward after one forward (distinct storages, weights included): the
    activation memory that checkpointing trades for recompute, measured exactly on CPU as on GPU. Tensors saved
    inside a checkpointed region never reach this hook (the checkpoint's own hook is innermost)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(seen.values()) / 2**30


def _peak(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _pairs_table(pairs: list[dict]):
    import pyarrow as pa

    return pa.table({
        "chosen_ids": [p["prompt_ids"] + p["chosen_ids"] for p in pairs],
        "rejected_ids": [p["prompt_ids"] + p["rejected_ids"] for p in pairs],
        "prompt_len": [len(p["prompt_ids"]) for p in pairs], "beta": pa.array([0.5] * len(pairs), pa.float32()),
        "gap": ["medium"] * len(pairs),
        "ref_chosen_logp": pa.array([p["ref_chosen_logps"] for p in pairs], pa.float32()),
        "ref_rejected_logp": pa.array([p["ref_rejected_logps"] for p in pairs], pa.float32())})


def run_crv(model_dir: Path, pairs: list[dict], steps: int, device: str, opts: dict) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist

    from crv_ray.train.batching import TokenizedRows, sequence_sums
    from crv_ray.train.config import CogPOConfig, FSDPConfig, TrainConfig
    from crv_ray.train.distributed import clip_grad_norm, setup_model
    from crv_ray.train.loop import batch_token_logps
    from crv_ray.train.losses import cogpo_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(0)
    stage = CogPOConfig(lr=1e-6, max_length=32768, max_prompt_length=8192, kernels=opts["kernels"])
    ac = {"activation_checkpointing": opts["ac"]}
    if opts["ac"] == "selective":
        ac.update(activation_checkpointing_every=opts["ac_every"],
                  activation_checkpointing_save_matmuls=opts["save_matmuls"])
    fsdp = FSDPConfig(**ac, mixed_precision=opts["precision"])
    rows = TokenizedRows.from_table(_pairs_table(pairs))
    raw = rows.collate(np.arange(len(pairs)), pad_id=0, packed=opts["packing"])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in raw.items()}
    if opts["strategy"] == "deepspeed":
        from crv_ray.train.deepspeed_strategy import init_deepspeed_distributed, setup_deepspeed_engine

        init_deepspeed_distributed()
        engine, _ = setup_deepspeed_engine(model_dir, TrainConfig(strategy="deepspeed", fsdp=fsdp, cogpo=stage),
                                           stage)
        model = engine

        def finish(loss) -> None:
            engine.backward(loss)
            engine.step()
    else:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        model = setup_model(model_dir, fsdp, None, stage.logprob_chunk_size, 0, kernels=opts["kernels"])
        params = [p for p in model.parameters() if p.requires_grad]
        impl = {"fused": {"fused": True}, "foreach": {"foreach": True},
                "plain": {"foreach": False, "fused": False}}[opts["optimizer"]]
        opt = torch.optim.AdamW(params, lr=stage.lr, betas=stage.adam_betas, **impl)

        def finish(loss) -> None:
            loss.backward()
            clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def forward():
        seq = sequence_sums(batch_token_logps(model, batch)[0], batch)
        n = len(pairs)
        return cogpo_loss(seq[:n], seq[n:], batch["ref_chosen_logp"], batch["ref_rejected_logp"], batch["beta"]).loss

    def step() -> None:
        finish(forward())

    saved = saved_for_backward_gib(forward)
    res = _time(step, steps, device, real_tokens(pairs))
    res["saved_gib"] = saved
    res["padding_fraction"] = 1 - real_tokens(pairs) / batch["input_ids"].numel()
    return res


def run_trl(model_dir: Path, pairs: list[dict], steps: int, device: str, opts: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    liger = opts["liger"] and device == "cuda"  # Liger's Triton kernels need CUDA: "best" on CPU is without
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=device == "cpu", bf16=device == "cuda", report_to=[],
                     beta=0.5, loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None,
                     per_device_train_batch_size=len(pairs), gradient_checkpointing=opts["gradient_checkpointing"],
                     max_grad_norm=1.0, padding_free=opts["padding_free"], use_liger_kernel=liger)
    dummy = Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]})
    trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)
    trainer.current_gradient_accumulation_steps = 1  # normally set inside Trainer.train()
    batch = trainer.data_collator(pairs)
    batch = {k: v.to(trainer.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step() -> None:
        trainer.training_step(trainer.model, batch)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    res = _time(step, steps, device, real_tokens(pairs))
    res["padding_fraction"] = 1 - real_tokens(pairs) / batch["input_ids"].numel()
    res["liger"] = liger
    return res


def _time(step, steps: int, device: str, n_tokens: int) -> dict:
    import torch

    step()  # warm-up: allocator, kernels, compilation, optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = sum(times) / steps
    # best_tokens_per_s: from the fastest step, the figure that survives other load on a shared CPU machine
    return {"step_s": dt, "tokens_per_s": n_tokens / dt, "best_tokens_per_s": n_tokens / min(times),
            "peak_gib": _peak(device), "tokens_per_step": n_tokens}


def _variant_names(arg: str) -> list[str]:
    names = []
    for item in arg.split(";") if ";" in arg else arg.split("+"):
        names += GROUPS.get(item, [item])
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--lengths", choices=["uniform", "mixed"], default="uniform",
                    help="mixed: the demo run's real pair lengths, scaled to a mean of --length")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--variants", default="default",
                    help="'+'-separated presets/groups (" + ", ".join(sorted(GROUPS)) + ") or ';'-separated specs "
                    "like 'crv:packing=true;trl:padding_free=true'")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--model-dir", type=Path, help="reuse (or build once into) this model directory")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    pairs = make_pairs(pair_lengths(args.pairs, args.length, args.lengths == "mixed"))
    if args.child:
        spec, model_dir = args.child
        side, opts = parse_variant(spec)
        fn = run_crv if side == "crv" else run_trl
        print("RESULT " + json.dumps(fn(Path(model_dir), pairs, args.steps, args.device, opts)), flush=True)
        return
    names = _variant_names(args.variants)
    for name in names:
        parse_variant(name)  # a typo fails before any model is built
    fpt = flops_per_token(args.shape, pairs)
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / "model"
        if not (model_dir / "config.json").is_file():
            build_model(args.shape, model_dir)
        for name in names:
            cmd = [sys.executable, __file__, "--child", name, str(model_dir), "--shape", args.shape,
                   "--pairs", str(args.pairs), "--length", str(args.length), "--lengths", args.lengths,
                   "--steps", str(args.steps), "--device", args.device]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                ok = p.returncode == 0 and line
                err = p.stderr.strip().splitlines()[-1:] if not ok else []
            except subprocess.TimeoutExpired:
                ok, err = False, [f"timed out after {args.timeout:.0f}s"]
            if not ok:
                res[name] = {"error": (err or ["no result"])[0][:200]}
                print(f"{name}: FAILED: {res[name]['error']}", flush=True)
                continue
            r = json.loads(line[-1][7:])
            r["mfu"] = r["tokens_per_s"] * fpt / PEAK_FLOPS if args.device == "cuda" else None
            res[name] = r
            print(f"{name}: {r}", flush=True)
    print(f"\nCogPO step, {args.shape}, {args.pairs} pairs x {args.length} tokens ({args.lengths}), {args.device}")
    print(f"{'variant':>14} {'tokens/s':>10} {'best':>8} {'step s':>8} {'peak GiB':>9} {'saved GiB':>9} "
          f"{'padding':>8} {'MFU':>6}")
    for name, r in res.items():
        if "error" in r:
            print(f"{name:>14} failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        saved = f"{r['saved_gib']:.3f}" if "saved_gib" in r else "-"
        print(f"{name:>14} {r['tokens_per_s']:>10.0f} {r['best_tokens_per_s']:>8.0f} {r['step_s']:>8.3f} "
              f"{r['peak_gib']:>9.2f} {saved:>9} "
              f"{r['padding_fraction']:>8.3f} {mfu:>6}")
    trl = [r for name, r in res.items() if name.startswith("trl") and "error" not in r]
    base = max(trl, key=lambda r: r["tokens_per_s"]) if trl else None  # TRL at its best setting of this run
    if base:
        for name, r in res.items():
            if name.startswith("crv") and "error" not in r:
                print(f"ratio {name}/TRL: tokens/s {r['tokens_per_s'] / base['tokens_per_s']:.2f}x (best step "
                      f"{r['best_tokens_per_s'] / base['best_tokens_per_s']:.2f}x), peak memory "
                      f"{r['peak_gib'] / base['peak_gib']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": res},
                                        indent=2))


if __name__ == "__main__":
    main()
