"""What the Ray cluster has, whether it can grow, and waiting for it to grow.

A resource pre-check that only reads `ray.cluster_resources()` fails a run on an autoscaling cluster whose GPU group
is at zero. Here a shortfall is only fatal when nothing can add nodes; otherwise the run asks the autoscaler for what
it needs (`ray.autoscaler.sdk.request_resources`), waits with a progress line, and fails with the numbers when
`ray.autoscale_timeout_s` runs out.

How "can grow" is known in Ray 2.60 (no public API says it):
- the cluster config the autoscaler publishes in the GCS (`ray._private.state.state.get_cluster_config()`, node
  groups with min/max counts and resources; Ray Data reads the same). The open-source autoscalers of 2.60 do not
  publish it yet, so it is read when present and not relied on;
- autoscaler v1 (the default, also KubeRay's in-tree autoscaler) writes its report to the GCS key
  `__autoscaling_status` each update; the report has `autoscaler_report` only when a node provider is configured
  (a plain local cluster's monitor writes load metrics only);
- autoscaler v2 reports its state to the GCS (`GetClusterStatus`); it also says which resource requests no node type
  can ever satisfy (`infeasible_cluster_resource_constraints`), which turns a hopeless wait into a fast failure.

The decision (`decide`) is a pure function of need, have and `Growth`, tested alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

log = logging.getLogger("crv_ray.cluster")

RESOURCES = ("CPU", "GPU")
EPS = 1e-9
PROGRESS_EVERY_S = 15.0


class ClusterTooSmall(RuntimeError):
    """The run needs more than the cluster has and can grow to (or grew to within the timeout)."""


@dataclass(frozen=True)
class Growth:
    """What is known about adding nodes to the cluster."""

    autoscaler: Literal["v1", "v2", "config"] | None = None  # None: no autoscaler, the cluster is what it is
    max_resources: dict[str, float] | None = None  # the most the node types allow in all; None: not published
    gpu_node_types: bool | None = None  # some node type that can be added has GPUs; None: not published
    launching: dict[str, int] = field(default_factory=dict)  # node type -> nodes being added now
    infeasible: list[dict] = field(default_factory=list)  # requested bundles the autoscaler says no node type fits

    @property
    def can_grow(self) -> bool:
        return self.autoscaler is not None


@dataclass(frozen=True)
class Decision:
    action: Literal["ok", "wait", "fail"]
    short: dict[str, float]  # resource -> need minus have, for resources that are short
    message: str


# ------------------------------------------------------------------ pure
def shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {k: need[k] - have.get(k, 0.0) for k in need if need[k] > have.get(k, 0.0) + EPS}


def describe(need: dict[str, float], have: dict[str, float], what: dict[str, str] | None = None) -> str:
    """'GPU: need 4 for <what>, cluster has 0' for each short resource."""
    what = what or {}
    return "; ".join(f"{k}: need {need[k]:g}" + (f" for {what[k]}" if what.get(k) else "")
                     + f", cluster has {have.get(k, 0.0):g}" for k in shortfall(need, have))


def decide(need: dict[str, float], have: dict[str, float], growth: Growth,
           what: dict[str, str] | None = None) -> Decision:
    """ok: the cluster has what is needed; wait: it does not, but an autoscaler may add it; fail: it cannot."""
    short = shortfall(need, have)
    if not short:
        return Decision("ok", {}, "")
    numbers = describe(need, have, what)
    if not growth.can_grow:
        return Decision("fail", short, f"{numbers} (no autoscaler: the cluster cannot grow)")
    if growth.infeasible:
        counts: dict[str, int] = {}
        for b in growth.infeasible:
            key = json.dumps(b, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
        shapes = ", ".join(f"{n} x {k}" for k, n in counts.items())
        return Decision("fail", short, f"{numbers} (the autoscaler reports that {shapes} cannot fit even with every "
                                       "node type at its max_workers)")
    if growth.max_resources is not None:
        over = {k: growth.max_resources.get(k, 0.0) for k in short if need[k] > growth.max_resources.get(k, 0.0) + EPS}
        if over:
            at_most = ", ".join(f"{v:g} {k}" for k, v in over.items())
            return Decision("fail", short, f"{numbers} (its node types allow at most {at_most})")
    return Decision("wait", short, numbers)


def fits_one_node(shape: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    """Whether some node has every resource of `shape` (one actor's resources, which Ray places on one node)."""
    return any(all(node.get(k, 0.0) + EPS >= v for k, v in shape.items() if v > 0) for node in nodes)


def describe_shape(shape: dict[str, float], nodes: list[dict[str, float]]) -> str:
    """'CPU 4' needed together vs 'CPU 3' at most on one node: what a cluster's totals do not show."""
    wanted = ", ".join(f"{k} {v:g}" for k, v in shape.items() if v > 0)
    largest = ", ".join(f"{k} {max((n.get(k, 0.0) for n in nodes), default=0.0):g}" for k, v in shape.items() if v > 0)
    return f"each needs {wanted} on one node, and no node of the {len(nodes)} has that (at most {largest})"


def bundles_for(need: dict[str, float]) -> list[dict[str, float]]:
    """Shapes to ask the autoscaler for: one {"GPU": 1} per GPU and one {"CPU": 1} per (started) CPU.

    Unit shapes leave the autoscaler free to pick node types; the engines' own placement then adds what their
    actual shapes still lack, as pending actors are demand the autoscaler serves too."""
    gpus = math.ceil(need.get("GPU", 0.0) - EPS)
    cpus = math.ceil(need.get("CPU", 0.0) - EPS)
    return [{"GPU": 1.0}] * max(gpus, 0) + [{"CPU": 1.0}] * max(cpus, 0)


def progress_line(need: dict[str, float], have: dict[str, float], growth: Growth, waited_s: float,
                  timeout_s: float) -> str:
    short = ", ".join(f"need {need[k]:g} {k}, have {have.get(k, 0.0):g}" for k in shortfall(need, have))
    adding = ", ".join(f"{n} x {t}" for t, n in sorted(growth.launching.items())) or "nothing yet"
    return (f"[cluster] waiting for the autoscaler: {short}; adding {adding}; {waited_s:.0f}s of "
            f"{timeout_s:.0f}s (ray.autoscale_timeout_s)")


def max_from_cluster_config(groups: list[dict]) -> tuple[dict[str, float], bool]:
    """(most of each resource the node groups allow, whether a group that can still grow has GPUs).
    `groups`: [{"resources": {...}, "min_count": int, "max_count": int (-1: unbounded)}]."""
    total: dict[str, float] = {}
    gpu_group = False
    for g in groups:
        count = g.get("max_count", 0)
        for k, v in (g.get("resources") or {}).items():
            total[k] = math.inf if count == -1 else total.get(k, 0.0) + count * float(v)
        if (g.get("resources") or {}).get("GPU", 0) > 0 and (count == -1 or count > g.get("min_count", 0)):
            gpu_group = True
    return total, gpu_group


# ------------------------------------------------------------------ reading the cluster
def current_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def node_resources() -> list[dict[str, float]]:
    """Each alive node's logical resources (totals, not what is free now)."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def _v1_report() -> dict | None:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else None


def _readonly(autoscaler_report: dict) -> bool:
    """A cluster without an autoscaling config (`ray.init()`, `ray start` without one) still runs the v1 monitor with
    Ray's read-only provider, which reports once anything asked for resources (Ray Data does) but cannot add a
    node. Its node types are the nodes themselves (`format_readonly_node_type`)."""
    from ray.autoscaler._private.util import format_readonly_node_type

    mapping = autoscaler_report.get("node_type_mapping") or {}
    return bool(mapping) and all(t == format_readonly_node_type(n) for n, t in mapping.items())


def _v2_state():
    """The v2 autoscaler's last reported state, or None when v2 is off or has not reported."""
    import ray
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    if not is_autoscaler_v2(fetch_from_server=True):
        return None
    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(address=ray.get_runtime_context().gcs_address).get_cluster_status())
    state = reply.autoscaling_state
    return state if state.autoscaler_state_version > 0 else None


def growth() -> Growth:
    """What the connected cluster's autoscaler could add; `Growth()` (cannot grow) when none is running."""
    import ray._private.state

    max_resources, gpu_types, kind = None, None, None
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - an older GCS without the key: fall back to the reports below
        log.debug("no cluster config from the GCS: %s", e)
        config = None
    if config is not None and config.node_group_configs:
        groups = [{"resources": dict(g.resources), "min_count": g.min_count, "max_count": g.max_count}
                  for g in config.node_group_configs]
        max_resources, gpu_types = max_from_cluster_config(groups)
        if any(g["max_count"] == -1 or g["max_count"] > g["min_count"] for g in groups):
            kind = "config"
    try:
        state = _v2_state()
    except Exception as e:  # noqa: BLE001
        log.debug("autoscaler v2 state unavailable: %s", e)
        state = None
    if state is not None:
        launching: dict[str, int] = {}
        for r in state.pending_instance_requests:
            launching[r.ray_node_type_name] = launching.get(r.ray_node_type_name, 0) + r.count
        for p in state.pending_instances:
            launching[p.ray_node_type_name] = launching.get(p.ray_node_type_name, 0) + 1
        infeasible = [dict(r.request.resources_bundle) for c in state.infeasible_cluster_resource_constraints
                      for r in c.resource_requests]
        return Growth("v2", max_resources, gpu_types, launching, infeasible)
    report = _v1_report()
    if report is not None and "autoscaler_report" in report and not _readonly(report["autoscaler_report"]):
        ar = report["autoscaler_report"]
        launching = dict(ar.get("pending_launches") or {})
        for _ip, node_type, _status in ar.get("pending_nodes") or []:
            launching[node_type] = launching.get(node_type, 0) + 1
        return Growth("v1", max_resources, gpu_types, launching)
    return Growth(kind, max_resources, gpu_types)


def can_add_gpus() -> bool:
    """Whether GPU nodes can be added: a published node type with GPUs, or an autoscaler whose node types Ray does
    not publish (2.60's autoscalers): a GPU pool then asks for GPUs rather than quietly running on CPUs."""
    g = growth()
    return g.can_grow and g.gpu_node_types is not False


def request(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler to make room for `bundles` (replaces any earlier request; [] withdraws it)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def ensure(need: dict[str, float], *, subject: str, what: dict[str, str] | None = None, timeout_s: float,
           hint: str = "", error: type[Exception] = ClusterTooSmall,
           read_have: Callable[[], dict[str, float]] = current_resources,
           read_growth: Callable[[], Growth] = growth, poll_s: float = 1.0,
           progress_every_s: float = PROGRESS_EVERY_S, shape: dict[str, float] | None = None,
           read_nodes: Callable[[], list[dict[str, float]]] = node_resources) -> dict[str, float]:
    """Return once the cluster has `need` (logical CPU/GPU totals) for `subject` (plural: "the engine pools").

    `shape`: what one of them (a training worker) holds, all on one node. On a multi-node cluster the totals can
    suffice while no single node has the shape; without an autoscaler that fails at once too (Ray would wait for it
    forever). With one, a bigger node type may be added: the pending actors ask for it.

    Short of it: fail at once when the cluster cannot grow, else ask the autoscaler for room for all of `need` (a
    request is about the cluster's size, not its free part) and wait up to `timeout_s`, printing a progress line
    every `progress_every_s`. The request is withdrawn when this returns or fails: the nodes are up by then, and the
    run's actors reach them well inside any idle timeout (later stages that need other nodes get them as
    pending-actor demand, which the autoscaler serves too)."""
    have = read_have()
    # Infeasible shapes reported before this request are someone else's.
    g = replace(read_growth(), infeasible=[]) if shortfall(need, have) else Growth()
    d = decide(need, have, g, what)
    if d.action == "ok":
        if shape is not None:  # the totals are there; a node for one of them may not be
            nodes = read_nodes()
            if nodes and not fits_one_node(shape, nodes) and not read_growth().can_grow:
                raise error(f"{subject} do not fit the Ray cluster: {describe_shape(shape, nodes)} (no autoscaler: "
                            "the cluster cannot grow)" + (f"; {hint}" if hint else ""))
        return have
    if d.action == "fail":
        raise error(f"{subject} do not fit the Ray cluster: {d.message}" + (f"; {hint}" if hint else ""))
    bundles = bundles_for(need)
    request(bundles)
    print(f"[cluster] asked the autoscaler ({g.autoscaler}) for {d.message}", flush=True)
    t0 = last = time.time()
    try:
        while True:
            time.sleep(poll_s)
            have, g = read_have(), read_growth()
            # Only this request's shapes: a v2 report may still list an earlier request's.
            g = replace(g, infeasible=[b for b in g.infeasible if b in bundles])
            d = decide(need, have, g, what)
            waited = time.time() - t0
            if d.action == "ok":
                print(f"[cluster] the autoscaler added what was needed in {waited:.0f}s", flush=True)
                return have
            if d.action == "fail":
                raise error(f"{subject} do not fit the Ray cluster, which cannot grow enough: {d.message}"
                            + (f"; {hint}" if hint else ""))
            if waited >= timeout_s:
                raise error(f"{subject} do not fit the Ray cluster: the autoscaler did not add the resources "
                            f"within {timeout_s:.0f}s (ray.autoscale_timeout_s): {d.message}"
                            + (f"; {hint}" if hint else ""))
            if time.time() - last >= progress_every_s:
                last = time.time()
                print(progress_line(need, have, g, waited, timeout_s), flush=True)
    finally:
        request([])
