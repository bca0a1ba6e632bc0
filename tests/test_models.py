"""Built-in offline models: tiny random Llama and the SmolLM2-135M GGUF conversion."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crv_ray.models.builtin import BUILTIN_MODELS, is_builtin, resolve_model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_is_builtin_and_names():
    assert is_builtin("builtin:tiny") and not is_builtin("/models/tiny")
    assert set(BUILTIN_MODELS) == {"tiny", "smollm2-135m"}


def test_unknown_builtin_and_bad_dir_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="builtin:nope"):
        resolve_model("builtin:nope", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path)):
        resolve_model(str(tmp_path))


def test_local_dir_resolves_to_itself(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_tiny_model_shape_and_chat_template(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert not any(name.endswith(".bin") for name in files)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (64, 2, 2, 2)
    assert cfg.head_dim == 32 and cfg.intermediate_size == 128 and cfg.max_position_embeddings == 2048

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert 512 <= len(tok) <= 1024 and cfg.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.eos_token_id == tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    # Byte-level BPE round-trips any text, digits included.
    assert tok.decode(tok(prompt)["input_ids"]) == prompt


def test_tiny_build_is_deterministic_and_cached(tmp_path, tiny_model_dir, caplog):
    a = resolve_model("builtin:tiny", cache_dir=tmp_path / "a")
    b = resolve_model("builtin:tiny", cache_dir=tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(a / name) == _sha256(b / name) == _sha256(tiny_model_dir / name)
    # A second resolve reuses the directory and leaves no temp dirs behind.
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="crv_ray.models.builtin"):
        assert resolve_model("builtin:tiny", cache_dir=tmp_path / "a") == a
    assert "building" not in caplog.text
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in a.parent.iterdir()] == [a.name]


def test_losing_a_build_race_uses_the_winners_copy(tmp_path, monkeypatch):
    from crv_ray.models import builtin

    final = tmp_path / "models" / f"tiny-v{builtin._RECIPE_VERSION['tiny']}"

    def build_while_another_process_wins(out: Path) -> None:
        (out / "config.json").write_text("{\"mine\": true}")
        final.mkdir(parents=True)
        (final / "config.json").write_text("{\"winner\": true}")
        (final / "extra").write_text("non-empty, so os.replace cannot overwrite it")

    monkeypatch.setitem(builtin._BUILDERS, "tiny", build_while_another_process_wins)
    assert resolve_model("builtin:tiny", cache_dir=tmp_path) == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # the loser's temp dir is gone


def test_cache_dir_from_env(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("CRV_RAY_CACHE", str(tmp_path))
    path = resolve_model("builtin:tiny")
    assert path.parent == tmp_path / "models"
    assert _sha256(path / "model.safetensors") == _sha256(tiny_model_dir / "model.safetensors")


def test_smollm2_conversion_answers_arithmetic(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_dir / "model.safetensors").is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert config["head_dim"] == 64 and config["num_hidden_layers"] == 30

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer


_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys

    def main():
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
        out = llm.chat([[{"role": "user", "content": "What is 2+3?"}]], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8))
        print("RESULT " + json.dumps({"text": out[0].outputs[0].text, "n": len(out[0].outputs[0].token_ids)}))

    if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
        main()
    """
)


@pytest.mark.slow
def test_vllm_cpu_generates_with_tiny(tiny_model_dir, tmp_path):
    script = tmp_path / "run_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["n"] == 8 and isinstance(result["text"], str)
