"""Which model folders a running engine can take by reloading weights: fine-tuned copies yes, other architectures,
tokenizers or eos ids no (pure file checks, no engine)."""

import json
import shutil

import pytest

from crv_ray.engines.weight_swap import architecture_config, swap_blocker


@pytest.fixture
def pair(tmp_path, tiny_model_dir):
    """The tiny model and a copy of it as a trainer would write it (other metadata, same network and tokenizer)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(tiny_model_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((b / "config.json").read_text())
    cfg.update(_name_or_path="/tmp/ckpt", transformers_version="0.0.1", dtype="bfloat16", use_cache=False,
               temperature=0.7, max_length=99)  # metadata and generation-only keys
    (b / "config.json").write_text(json.dumps(cfg, indent=4))
    tok = json.loads((b / "tokenizer_config.json").read_text())
    tok["local_files_only"] = not tok.get("local_files_only", False)  # a loader argument, written by transformers
    (b / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
    return a, b


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_fine_tuned_copy_is_swappable(pair):
    a, b = pair
    assert swap_blocker(a, b) is None and swap_blocker(b, a) is None
    cfg = json.loads((a / "config.json").read_text())
    arch = architecture_config({**cfg, "_name_or_path": "x", "torch_dtype": "float16", "top_k": 5})
    assert arch == {k: v for k, v in cfg.items() if k not in ("transformers_version", "dtype", "use_cache")}
    assert arch["hidden_size"] == 64 and arch["num_hidden_layers"] == 2


@pytest.mark.parametrize("change, reason", [
    (lambda b: _edit_json(b / "config.json", num_hidden_layers=3), "config.json differs in num_hidden_layers"),
    (lambda b: _edit_json(b / "config.json", tie_word_embeddings=True, vocab_size=789),
     "config.json differs in tie_word_embeddings, vocab_size"),
    (lambda b: (b / "chat_template.jinja").write_text("{{ messages }}"), "chat_template.jinja differs"),
    (lambda b: (b / "chat_template.jinja").unlink(), "chat_template.jinja is in only one of the two folders"),
    (lambda b: (b / "special_tokens_map.json").write_text("{}"),
     "special_tokens_map.json is in only one of the two folders"),
    (lambda b: _edit_json(b / "tokenizer_config.json", eos_token="<x>"), "tokenizer_config.json differs"),
    (lambda b: (b / "tokenizer.json").write_bytes((b / "tokenizer.json").read_bytes().replace(b'"', b"'", 1)),
     "tokenizer.json differs"),
    (lambda b: _edit_json(b / "generation_config.json", eos_token_id=[2, 5]),
     "generation_config.json eos_token_id differs"),
])
def test_what_needs_a_new_engine(pair, change, reason):
    a, b = pair
    change(b)
    assert swap_blocker(a, b).startswith(reason)


def test_not_a_local_folder(pair, tmp_path):
    a, _ = pair
    assert swap_blocker(a, "HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct is not a local model folder with a config.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad/config.json: not readable as JSON"):
        swap_blocker(a, tmp_path / "bad")
