"""Each stage's pre-check on a cluster that cannot grow (the session's local Ray has no autoscaler): the training
workers and the eval engine fail at once with the numbers, before any work starts (Ray Train would otherwise wait
for its placement group without end)."""

import time

import pytest

from crv_ray.config import load_config_dict


def cfg_for(tmp_path, **over):
    raw = {"run_dir": str(tmp_path / "run"),
           "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
           "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"},
                       "student": {"kind": "vllm", "model": "builtin:tiny"}}}
    raw.update(over)
    return load_config_dict(raw)


def test_training_workers_that_cannot_fit_fail_at_once(ray_local, tmp_path):
    from crv_ray.cluster_resources import ClusterTooSmall
    from crv_ray.stages import run_train_stage

    cfg = cfg_for(tmp_path, train={"scaling": {"num_workers": 2, "use_gpu": True}})
    t0 = time.time()
    with pytest.raises(ClusterTooSmall, match=r"^the training workers do not fit the Ray cluster: GPU: need 2 for 2 "
                       r"worker\(s\) \(train.scaling\), cluster has 0 \(no autoscaler: the cluster cannot grow\); "
                       r"lower train.scaling.num_workers"):
        run_train_stage(cfg, "sft")
    assert time.time() - t0 < 10
    assert not (tmp_path / "run" / "sft").exists()


def test_eval_engine_that_cannot_fit_fails_at_once(ray_local, tmp_path):
    from crv_ray.eval.runner import EvalError, _ensure_ray

    cfg = cfg_for(tmp_path, engines={"agent": {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"},
                                     "student": {"kind": "vllm", "model": "builtin:tiny", "use_gpu": True}})
    with pytest.raises(EvalError, match=r"the eval engine's replicas do not fit the Ray cluster: GPU: need 1 for "
                       r"engine 'student', cluster has 0 \(no autoscaler"):
        _ensure_ray(cfg, "student")
