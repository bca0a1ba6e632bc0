"""A scripted reply double: `function(role, row, messages) -> str`, for deterministic tests of the role logic.

It runs as a real Ray Data stage (map), so the pipeline's Ray glue is exercised; only the LLM is replaced.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

from crv_ray.config import ScriptedEngineConfig
from crv_ray.engines.columns import MESSAGES, OUT_ERROR, OUT_PROMPT_TOKENS, OUT_REPLY, OUT_TOKENS, SKIP


def load_function(path: str) -> Callable:
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scripted engine function {path!r} cannot be imported: {e}") from None
    return fn


def build_scripted_transform(cfg: ScriptedEngineConfig, stage_name: str, keep: list[str]) -> Callable:
    load_function(cfg.function)  # fail at build time, on the driver, with a clear message

    def call(row: dict) -> dict:
        out = {k: row.get(k) for k in keep}
        out.update({OUT_REPLY: None, OUT_TOKENS: 0, OUT_PROMPT_TOKENS: 0, OUT_ERROR: None})
        if row[SKIP]:
            return out
        messages = json.loads(row[MESSAGES])
        try:
            text = load_function(cfg.function)(stage_name, dict(out), messages)
        except Exception as e:  # a failing double is an engine error for that row, as with a real engine
            out[OUT_ERROR] = f"{type(e).__name__}: {e}"
            return out
        out[OUT_REPLY] = text
        out[OUT_PROMPT_TOKENS] = sum(len(m["content"].split()) for m in messages)
        out[OUT_TOKENS] = len((text or "").split())
        return out

    return lambda ds: ds.map(call)
