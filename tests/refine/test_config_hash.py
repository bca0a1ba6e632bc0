"""The refine config hash covers what changes outputs, not where or how fast a run goes: changing a runtime knob
resumes a run, changing a model, prompt, sampling, input, answer handling or shard size refuses to mix."""

import pytest

from crv_ray.config import load_config_dict
from crv_ray.refine.runner import ConfigChanged, _check_config
from crv_ray.refine.store import RefineStore

BASE = {
    "run_dir": "runs/x",
    "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
    "input": {"source": "file", "path": "in.jsonl"},
    "engines": {
        "agent": {"kind": "vllm", "model": "builtin:smollm2-135m", "engine_kwargs": {"max_num_batched_tokens": 2048}},
        "student": {"kind": "vllm", "model": "builtin:tiny"},
        "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "m"},
    },
}

RESUMES = [
    # vLLM pools: size, batching, memory, placement
    "engines.agent.replicas=4", "engines.agent.batch_size=64", "engines.agent.max_num_seqs=8",
    "engines.agent.enforce_eager=true", "engines.agent.gpu_memory_utilization=0.5", "engines.agent.use_gpu=false",
    "engines.agent.accelerator_type=H100", "engines.agent.cpus_per_replica=2", "engines.agent.kv_cache_space_gb=4",
    "engines.agent.cpu_cores=all",
    "engines.agent.tensor_parallel_size=2", "engines.agent.pipeline_parallel_size=2",
    "engines.agent.engine_kwargs.max_num_batched_tokens=8192", "engines.agent.engine_kwargs.enable_prefix_caching=true",
    # an OpenAI-compatible endpoint: where and how fast it is called
    "engines.teacher.concurrency=8", "engines.teacher.batch_size=4", "engines.teacher.qps=2.5",
    "engines.teacher.timeout_s=30", "engines.teacher.max_retries=9", "engines.teacher.base_retry_wait_s=3",
    "engines.teacher.base_url=http://10.0.0.2:8000/v1", "engines.teacher.api_key_env=OTHER_KEY",
    # how a run goes
    "refine.mode=staged", "refine.watchdog_s=5", "refine.startup_timeout_s=60", "refine.max_shards_per_run=1",
    "refine.on_config_change=continue", "roles.critic.max_fallback_rate=0.9", "input.max_bad_fraction=0.9",
    # other stages and places
    "ray.num_cpus=3", "ray.address=auto", "train.sft.epochs=3", "eval.limit=5", "run_dir=elsewhere", "seed=7",
]

REFUSES = [
    # models and how they compute
    "engines.agent.model=builtin:tiny", "engines.agent.dtype=float32", "engines.agent.max_model_len=2048",
    "engines.agent.structured_output=false", "engines.agent.trust_remote_code=true",
    "engines.agent.engine_kwargs.quantization=fp8", "engines.agent.engine_kwargs.kv_cache_dtype=fp8",
    "engines.teacher.model=other", "engines.teacher.max_model_len=4096", "engines.teacher.structured_output=true",
    # prompts and sampling
    "roles.critic.prompt=my_critic.j2", "roles.rethinker.prompt_easy=easy.j2", "roles.critic.sampling.max_tokens=64",
    "roles.rethinker.sampling.temperature=0.7", "roles.verifier.max_rounds=3", "roles.verifier.require=[rule]",
    "roles.critic.max_parse_retries=3", "roles.critic.fallback_label=medium", "negatives.student.k=2",
    "negatives.sources=[injected]", "pairs.gaps=[large]", "refine.student_prompt=s.j2",
    "refine.response_format=strip_think", "student.name=Other", "student.model=builtin:smollm2-135m",
    # input and answer handling
    "input.path=other.jsonl", "input.columns.problem=question", "input.answer_format=gsm8k", "input.limit=10",
    "input.on_no_answer=drop", "input.max_cot_chars=100", "answers.patterns=['Answer: (.*)']",
    "answers.timeout_s=1",
    # the unit of commit
    "refine.shard_size=8",
]


def cfg(*overrides):
    return load_config_dict(BASE, overrides=list(overrides))


@pytest.mark.parametrize("override", RESUMES)
def test_runtime_knobs_keep_the_hash(override):
    assert cfg(override).refine_hash() == cfg().refine_hash()


@pytest.mark.parametrize("override", REFUSES)
def test_output_settings_change_the_hash(override):
    assert cfg(override).refine_hash() != cfg().refine_hash()


def test_changed_replicas_resume_and_a_changed_dtype_refuses(tmp_path):
    store = RefineStore(tmp_path)
    base = cfg(f"run_dir={tmp_path}")
    store.write_state({"config_hash": base.refine_hash(), "ingested": True, "shards": []})
    _check_config(cfg(f"run_dir={tmp_path}", "engines.agent.replicas=3", "refine.mode=staged"), store)
    assert store.read_state()["config_hash"] == base.refine_hash()
    with pytest.raises(ConfigChanged, match="different config"):
        _check_config(cfg(f"run_dir={tmp_path}", "engines.agent.dtype=bfloat16"), store)


def test_a_run_dir_hashed_by_the_older_rule_resumes_under_the_same_config(tmp_path):
    store = RefineStore(tmp_path)
    c = cfg(f"run_dir={tmp_path}")
    assert c.legacy_refine_hash() != c.refine_hash()
    store.write_state({"config_hash": c.legacy_refine_hash(), "ingested": True, "shards": []})
    _check_config(c, store)
    assert store.read_state()["config_hash"] == c.refine_hash()  # adopted: the next check is the plain one
    # an older run of another config still refuses
    store.write_state({"config_hash": cfg(f"run_dir={tmp_path}", "refine.shard_size=8").legacy_refine_hash(),
                       "ingested": True, "shards": []})
    with pytest.raises(ConfigChanged):
        _check_config(c, store)
