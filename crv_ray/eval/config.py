"""The `eval:` section of a run config: which benchmarks, how many problems and samples, the prompt, the engine.

Used by `crv-ray eval` (the embedded default config's section unless `--config` names another) and by the eval
stage at the end of `crv-ray run`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from crv_ray.config import ColumnMap, InputConfig, Sampling, SyntheticConfig, _Strict

# Qwen2.5-Math's evaluation instruction: the checker reads `\boxed{}` first.
DEFAULT_PROMPT = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
PROBLEM_PLACEHOLDER = "{problem}"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The same gold-answer readings as refine input (one definition: InputConfig.answer_format).
AnswerFormat = InputConfig.model_fields["answer_format"].annotation


class EvalSampling(Sampling):
    """Sampling of the n samples. Its own class so that a partial YAML section (`sampling: {max_tokens: 256}`)
    keeps these defaults, not Sampling's greedy ones."""

    temperature: float = Field(0.6, ge=0.0, description="Temperature of the n samples (the greedy reply uses 0).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass of the n samples.")
    max_tokens: int = Field(1024, ge=1, description="Maximum tokens per reply, greedy and sampled.")


class BenchmarkSpec(_Strict):
    """A benchmark file read through the column mapping of refine input (`input.columns`, `input.answer_format`)."""

    name: str = Field(..., description="Benchmark name: the output folder and the table title.")
    source: Literal["file", "synthetic"] = Field(
        "file", description="file: `path`; synthetic: problems from the built-in generator (a held-out split: give it "
        "a seed the training input does not use).")
    path: str | None = Field(None, description="JSONL or Parquet file, or a folder of them (source: file).")
    synthetic: SyntheticConfig | None = Field(None, description="Generator settings (source: synthetic).")
    format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="File format (auto: from the suffix).")
    columns: ColumnMap = Field(
        default_factory=ColumnMap,
        description="Columns holding the problem, the gold answer and an optional id (the cot column is not read).",
    )
    answer_format: AnswerFormat = Field(  # type: ignore[valid-type]
        "auto", description="How to read the gold answer (gsm8k: the number after '####')."
    )
    group_by: list[str] = Field(
        default_factory=list, description="Columns whose values split the per-group tables (e.g. subject, level)."
    )

    @model_validator(mode="after")
    def _source_fields(self) -> "BenchmarkSpec":
        if self.source == "file" and not self.path:
            raise ValueError(f"benchmark {self.name}: path is required when source is 'file'")
        if self.source == "synthetic" and self.synthetic is None:
            self.synthetic = SyntheticConfig()
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"benchmark name {v!r} must be letters, digits, '_', '-' or '.' (it names a folder)")
        return v


class EvalConfig(_Strict):
    enabled: bool = Field(True, description="Run the eval stage at the end of `crv-ray run`.")
    benchmarks: list[str | BenchmarkSpec] = Field(
        default_factory=lambda: ["gsm8k"],
        description="Packaged benchmark names (math500, aime24, amc23, gsm8k) and/or user benchmark entries.",
    )
    limit: int | None = Field(None, ge=1, description="Evaluate the first N problems of each benchmark (None: all).")
    n: int = Field(1, ge=1, le=1024, description="Samples per problem for pass@1 and maj@k; 1: the greedy reply only.")
    greedy: bool = Field(True, description="Generate one greedy (temperature 0) reply per problem for greedy pass@1.")
    sampling: EvalSampling = Field(
        default_factory=EvalSampling,
        description="Sampling of the n samples; its max_tokens also bounds the greedy reply.",
    )
    prompt: str = Field(DEFAULT_PROMPT, description="User message; '{problem}' is replaced by the problem text.")
    system_prompt: str | None = Field(None, description="Optional system message before the prompt.")
    engine: str | None = Field(
        None,
        description="Name of a `kind: vllm` entry in `engines` whose settings eval uses, with its model replaced by "
        "each evaluated model. None: the student's engine (negatives.student.engine).",
    )
    models: list[str] = Field(
        default_factory=lambda: ["base", "sft", "cogpo"],
        description="Models the eval stage of `crv-ray run` evaluates (those that exist): base (the student), sft, "
        "cogpo, and names of train.cogpo_variants.",
    )
    watchdog_s: float = Field(900.0, gt=0, description="Fail if no generation finishes for this long once rows flow.")
    startup_timeout_s: float = Field(1800.0, gt=0, description="Fail if the first generation has not finished by then.")

    @field_validator("prompt")
    @classmethod
    def _has_problem(cls, v: str) -> str:
        if PROBLEM_PLACEHOLDER not in v:
            raise ValueError(f"prompt must contain {PROBLEM_PLACEHOLDER!r} (where the problem text goes)")
        return v

    @field_validator("benchmarks")
    @classmethod
    def _known_and_unique(cls, v: list[str | BenchmarkSpec]) -> list[str | BenchmarkSpec]:
        from crv_ray.eval.benchmarks import BUILTIN_BENCHMARKS

        names = []
        for b in v:
            if isinstance(b, str) and b not in BUILTIN_BENCHMARKS:
                raise ValueError(f"unknown benchmark {b!r}: packaged ones are {sorted(BUILTIN_BENCHMARKS)}; a user "
                                 "file needs an entry {name, path, columns, answer_format, group_by}")
            names.append(b if isinstance(b, str) else b.name)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"benchmark names repeat: {dup}")
        if not v:
            raise ValueError("benchmarks is empty")
        return v

    @model_validator(mode="after")
    def _samples_differ(self) -> "EvalConfig":
        if self.n > 1 and self.sampling.temperature == 0:
            raise ValueError("n > 1 needs sampling.temperature > 0 (greedy samples are all the same)")
        if self.n == 1 and not self.greedy and self.sampling.temperature == 0:
            raise ValueError("greedy is false and sampling.temperature is 0: set greedy true instead")
        return self

    @property
    def sampled(self) -> bool:
        """Whether the n samples are generated (with n=1 and greedy on, the greedy reply stands for them)."""
        return self.n > 1 or not self.greedy
