"""Shared, session-scoped fixtures: built-in models (built once into the default cache) and a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports transformers, vLLM or Ray: no hub, a small vLLM KV cache, quiet tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """`builtin:tiny` in the default cache (CRV_RAY_CACHE or ~/.cache/crv-ray), so reruns reuse it."""
    from crv_ray.models.builtin import resolve_model

    return resolve_model("builtin:tiny")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """`builtin:smollm2-135m` in the default cache; the first build takes about 30 s."""
    from crv_ray.models.builtin import resolve_model

    return resolve_model("builtin:smollm2-135m")


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray cluster for the session.

    address="local" never joins a cluster someone else started on this machine. num_cpus=6 oversubscribes the
    2 real cores on purpose: ray.data.llm pipelines need about 3 logical CPUs and hang silently with fewer.
    """
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_started():
    """A Ray cluster for one training test module, unless one is already up (then it is reused, not stopped)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()
