"""Whether a running vLLM engine can take another model's weights in place (`VLLMPool.reload`) instead of a new load.

An engine is built for one architecture and tokenizer: vLLM sizes its layers and KV cache from config.json, and its
front end keeps the tokenizer (detokenizing replies) and the eos ids of generation_config.json from the first load.
Only the weights can change. So two model folders are swappable when their config.json files describe the same
architecture, their tokenizer files are the same and their eos ids are the same; a fine-tuned copy of a model (SFT,
CogPO) is, another model family is not.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

# config.json keys that say how the file was written or how the model was loaded, not what the network is.
_CONFIG_IGNORED = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"})
# Loader arguments that transformers writes into tokenizer_config.json (`local_files_only` differs between a
# builtin model and its fine-tuned copy); they do not change tokenization.
_TOKENIZER_CONFIG_IGNORED = frozenset({"name_or_path", "_name_or_path", "local_files_only", "_commit_hash",
                                       "cache_dir", "revision", "subfolder", "force_download"})
# What the tokenizer and chat template are made of; a file present in one folder and not the other is a difference.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


@functools.lru_cache(maxsize=1)
def _generation_keys() -> frozenset[str]:
    """Generation settings that old checkpoints keep in config.json (transformers moves them to GenerationConfig);
    they do not change the network, and the engine takes its sampling from each request."""
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return frozenset(defaults()) if defaults else frozenset()  # unknown: compare them too (stricter, still right)


def architecture_config(config: dict) -> dict:
    """config.json without the keys that do not change the architecture (pure)."""
    drop = _CONFIG_IGNORED | _generation_keys()
    return {k: v for k, v in config.items() if k not in drop}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e})") from None


def swap_blocker(loaded: str | Path, new: str | Path) -> str | None:
    """None when an engine that loaded the model folder `loaded` can reload the weights of the folder `new` in
    place; else why not (for the console)."""
    a, b = Path(loaded), Path(new)
    for p in (a, b):
        if not (p / "config.json").is_file():
            return f"{p} is not a local model folder with a config.json"
    ca, cb = (architecture_config(_read_json(p / "config.json")) for p in (a, b))
    if ca != cb:
        keys = sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))
        return f"config.json differs in {', '.join(keys[:5])}"
    for name in TOKENIZER_FILES:
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file():
            return f"{name} is in only one of the two folders"
        if not fa.is_file() or fa.read_bytes() == fb.read_bytes():
            continue
        if name == "tokenizer_config.json":
            ta, tb = ({k: v for k, v in _read_json(f).items() if k not in _TOKENIZER_CONFIG_IGNORED} for f in (fa, fb))
            if ta == tb:
                continue
        return f"{name} differs"
    ea, eb = (_read_json(p / "generation_config.json").get("eos_token_id")
              if (p / "generation_config.json").is_file() else None for p in (a, b))
    if ea != eb:
        return f"generation_config.json eos_token_id differs ({ea} vs {eb})"
    return None
