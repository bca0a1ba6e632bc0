"""The autoscaling decision alone (need vs have vs can-grow), and the wait loop with scripted cluster readings."""

import math
import time

import pytest

from crv_ray import cluster_resources as cr
from crv_ray.cluster_resources import ClusterTooSmall, Growth, bundles_for, decide, ensure, max_from_cluster_config

NEED = {"CPU": 2.25, "GPU": 4.0}
WHAT = {"GPU": "the largest single stage (critic, refine.mode=staged)", "CPU": "all role pools together"}


def test_enough_is_ok_whatever_the_autoscaler():
    assert decide(NEED, {"CPU": 8, "GPU": 4}, Growth()).action == "ok"
    assert decide(NEED, {"CPU": 8, "GPU": 4}, Growth("v1")).action == "ok"


def test_short_without_autoscaler_fails_with_the_numbers():
    d = decide(NEED, {"CPU": 8}, Growth(), WHAT)
    assert d.action == "fail"
    assert d.short == {"GPU": 4.0}
    assert d.message == ("GPU: need 4 for the largest single stage (critic, refine.mode=staged), cluster has 0 "
                         "(no autoscaler: the cluster cannot grow)")


def test_short_with_autoscaler_waits():
    d = decide(NEED, {"CPU": 1}, Growth("v1", launching={"gpu": 2}), WHAT)
    assert d.action == "wait"
    assert d.short == {"CPU": 1.25, "GPU": 4.0}
    assert "GPU: need 4 for the largest" in d.message and "CPU: need 2.25 for all role pools together" in d.message


def test_autoscaler_that_has_no_node_type_for_the_shape_fails():
    d = decide(NEED, {"CPU": 8}, Growth("v2", infeasible=[{"GPU": 1.0}]), WHAT)
    assert d.action == "fail"
    assert 'reports that 1 x {"GPU": 1.0} cannot fit even with every node type at its max_workers' in d.message
    assert "GPU: need 4" in d.message


def test_published_node_types_that_cannot_reach_the_need_fail():
    d = decide(NEED, {"CPU": 8}, Growth("config", max_resources={"CPU": 64, "GPU": 2}), WHAT)
    assert d.action == "fail"
    assert d.message.endswith("(its node types allow at most 2 GPU)")
    assert decide(NEED, {"CPU": 8}, Growth("config", max_resources={"CPU": 64, "GPU": 8})).action == "wait"


def test_bundles_are_unit_shapes_of_the_need():
    assert bundles_for({"CPU": 2.25, "GPU": 2}) == [{"GPU": 1.0}] * 2 + [{"CPU": 1.0}] * 3
    assert bundles_for({"CPU": 1.0}) == [{"CPU": 1.0}]
    assert bundles_for({"CPU": 0.0, "GPU": 0.0}) == []


def test_cluster_config_maximum():
    groups = [{"resources": {"CPU": 8}, "min_count": 1, "max_count": 1},  # head, fixed
              {"resources": {"CPU": 4, "GPU": 1}, "min_count": 0, "max_count": 3}]
    assert max_from_cluster_config(groups) == ({"CPU": 20.0, "GPU": 3.0}, True)
    total, gpus = max_from_cluster_config([{"resources": {"CPU": 4}, "min_count": 0, "max_count": -1},
                                           {"resources": {"CPU": 4, "GPU": 1}, "min_count": 2, "max_count": 2}])
    assert total["CPU"] == math.inf and total["GPU"] == 2.0 and gpus is False  # the GPU group cannot grow


class FakeCluster:
    """Scripted readings: `have` after each poll, and what the autoscaler reports."""

    def __init__(self, haves: list[dict], growth: Growth):
        self.haves, self.growth_now, self.requests = list(haves), growth, []

    def have(self) -> dict:
        return self.haves.pop(0) if len(self.haves) > 1 else self.haves[0]

    def growth(self) -> Growth:
        return self.growth_now


@pytest.fixture
def fake(monkeypatch):
    def make(haves, growth):
        f = FakeCluster(haves, growth)
        monkeypatch.setattr(cr, "request", f.requests.append)
        return f
    return make


def test_ensure_asks_waits_prints_and_withdraws(fake, capsys):
    f = fake([{"CPU": 1}, {"CPU": 1}, {"CPU": 1}, {"CPU": 3, "GPU": 1}], Growth("v1", launching={"gpu": 1}))
    have = ensure({"CPU": 1.25, "GPU": 1}, subject="the engine pools", timeout_s=60, read_have=f.have,
                  read_growth=f.growth, poll_s=0.01, progress_every_s=0.0)
    assert have == {"CPU": 3, "GPU": 1}
    assert f.requests == [[{"GPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], []]  # asked, then withdrew
    out = capsys.readouterr().out
    assert "[cluster] waiting for the autoscaler: need 1.25 CPU, have 1, need 1 GPU, have 0; adding 1 x gpu" in out
    assert "added what was needed" in out


def test_ensure_times_out_with_the_numbers_and_withdraws(fake):
    f = fake([{"CPU": 1}], Growth("v1"))
    t0 = time.time()
    with pytest.raises(ClusterTooSmall, match=r"the training workers do not fit the Ray cluster: the autoscaler did "
                       r"not add the resources within 0s \(ray.autoscale_timeout_s\): GPU: need 2, cluster has 0"):
        ensure({"CPU": 1, "GPU": 2}, subject="the training workers", timeout_s=0.05, read_have=f.have,
               read_growth=f.growth, poll_s=0.01)
    assert time.time() - t0 < 2
    assert f.requests[-1] == []


def test_ensure_fails_at_once_when_the_cluster_cannot_grow(fake):
    f = fake([{"CPU": 2}], Growth())
    with pytest.raises(ValueError, match=r"^the eval engine's replicas do not fit the Ray cluster: GPU: need 1 for "
                       r"engine 'x', cluster has 0 \(no autoscaler.*; raise ray.num_cpus$"):
        ensure({"CPU": 1, "GPU": 1}, subject="the eval engine's replicas", what={"GPU": "engine 'x'"}, timeout_s=60,
               hint="raise ray.num_cpus", error=ValueError, read_have=f.have, read_growth=f.growth)
    assert f.requests == []  # nothing asked of an autoscaler that is not there


def test_ensure_stops_waiting_when_the_autoscaler_says_no_node_type_fits(fake):
    f = fake([{"CPU": 2}], Growth("v2", infeasible=[{"GPU": 1.0}, {"TPU": 1.0}]))
    with pytest.raises(ClusterTooSmall, match=r'cannot grow enough: GPU: need 1, cluster has 0 \(the autoscaler '
                       r'reports that 1 x \{"GPU": 1.0\} cannot fit'):  # only this request's shapes are named
        ensure({"CPU": 1, "GPU": 1}, subject="the engine pools", timeout_s=60, read_have=f.have,
               read_growth=f.growth, poll_s=0.01)
    assert f.requests == [[{"GPU": 1.0}, {"CPU": 1.0}], []]


def test_a_worker_that_fits_no_single_node_fails_at_once(fake):
    """Two 3-CPU nodes have 6 CPUs, but no 4-CPU training worker fits on either: Ray would wait forever."""
    nodes = [{"CPU": 3.0, "memory": 1e9}, {"CPU": 3.0}]
    f = fake([{"CPU": 6}], Growth())
    with pytest.raises(ClusterTooSmall, match=r"^the training workers do not fit the Ray cluster: each needs CPU 4 on "
                       r"one node, and no node of the 2 has that \(at most CPU 3\) \(no autoscaler"):
        ensure({"CPU": 4}, subject="the training workers", timeout_s=60, read_have=f.have, read_growth=f.growth,
               shape={"CPU": 4, "GPU": 0}, read_nodes=lambda: nodes)
    # One per node fits (the totals decide the rest); an autoscaler may add a bigger node type.
    assert ensure({"CPU": 6}, subject="w", timeout_s=60, read_have=f.have, read_growth=f.growth,
                  shape={"CPU": 3}, read_nodes=lambda: nodes) == {"CPU": 6}
    f = fake([{"CPU": 6}], Growth("v1"))
    assert ensure({"CPU": 4}, subject="w", timeout_s=60, read_have=f.have, read_growth=f.growth,
                  shape={"CPU": 4}, read_nodes=lambda: nodes) == {"CPU": 6}


def test_gpu_pool_resolution(monkeypatch):
    """use_gpu null asks for GPUs when the cluster has them now or an autoscaler may add them."""
    from crv_ray.config import VLLMEngineConfig
    from crv_ray.engines import vllm_pool

    engine = VLLMEngineConfig(kind="vllm", model="builtin:tiny")
    monkeypatch.setattr(vllm_pool.ray, "is_initialized", lambda: True)
    cases = [({"GPU": 2}, Growth(), True), ({}, Growth(), False), ({}, Growth("v1"), True),
             ({}, Growth("config", gpu_node_types=True), True), ({}, Growth("config", gpu_node_types=False), False)]
    for have, growth, expected in cases:
        monkeypatch.setattr(vllm_pool.ray, "cluster_resources", lambda h=have: h)
        monkeypatch.setattr(cr, "growth", lambda g=growth: g)
        assert vllm_pool.uses_gpu(engine) is expected, (have, growth)
        assert vllm_pool.pool_resources(engine)["GPU"] == (1 if expected else 0)
        for explicit in (True, False):  # an explicit setting is never second-guessed
            assert vllm_pool.uses_gpu(engine.model_copy(update={"use_gpu": explicit})) is explicit


def test_a_local_clusters_readonly_monitor_is_not_an_autoscaler():
    """Seen on a `ray.init()` cluster after Ray Data asked for resources: the v1 monitor reports with the read-only
    provider, whose node types are the nodes themselves. Taken for an autoscaler, a pool that cannot fit would wait
    for a node that never comes."""
    from crv_ray.cluster_resources import _readonly

    nid = "400ad45786c23e6fa8523fa15f6e510389cf91732619296868cb9757"
    assert _readonly({"active_nodes": {f"node_{nid}": 1}, "node_type_mapping": {nid: f"node_{nid}"}, "legacy": True})
    assert not _readonly({"active_nodes": {"cpu_node": 1}, "node_type_mapping": {nid: "cpu_node"}, "legacy": True})
