"""Export to one Hugging Face directory: full weights round-trip; LoRA adapters merged (no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from crv_ray.models.builtin import resolve_model
from crv_ray.train.config import LoRAConfig
from crv_ray.train.distributed import load_hf_model
from crv_ray.train.export import save_hf_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return resolve_model("builtin:tiny", cache_dir=tmp_path_factory.getbasetemp() / "cache")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_export_round_trips(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_hf_model(tiny_model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    out = save_hf_model(model.state_dict(), tiny_model, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert not list(tmp_path.glob(".export-*"))  # temp dir renamed into place


def test_lora_export_is_merged(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    lora = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = load_hf_model(tiny_model, lora, seed=0).eval()
    with torch.no_grad():  # lora_B starts at zero: give the adapters an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = save_hf_model(model.state_dict(), tiny_model, tmp_path / "model", lora)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    torch.testing.assert_close(_logits(merged, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert not torch.allclose(_logits(base, ids), _logits(merged, ids), atol=1e-3)
