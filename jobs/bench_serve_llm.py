"""Benchmark: crv-ray's vLLM engine actors against a Ray Serve LLM deployment, the same workload from Ray Data.

Issue 7 asked for refine's engine pools on Ray Serve LLM (fed through `ray.data.llm`'s
ServeDeploymentProcessorConfig) or on long-lived vLLM engine actors, measured if the first was doubtful. Both paths
here serve the same model with the same engine settings (1 replica, `engine_kwargs` of a VLLMEngineConfig,
VLLM_CPU_KVCACHE_SPACE=1) and get the same refine-like chat requests (the critic's prompt: a problem and its CoT,
greedy, max_tokens 64) from a Ray Data dataset:

  crv    VLLMPool + build_vllm_transform (crv_ray/engines/vllm_pool.py, vllm_engine.py)
  serve  build_llm_deployment + serve.run, then ray.data.llm.build_processor(ServeDeploymentProcessorConfig),
         with the PrefixCacheAffinityRouter

Each path runs in its own process (its own local Ray cluster) so the driver's peak RSS is its own. Printed per
path: start-up to ready, rows/s per N and the marginal rate between the two N, agreement of the greedy texts,
driver peak RSS, the cluster's processes, RSS and idle CPU, and what happens to a run whose replica is killed
mid-run (ray.kill of the engine actor / Serve replica).

    pip install -e '.[cpu,serve]'                   # Serve LLM needs ray[serve]
    python jobs/bench_serve_llm.py                  # N = 100 and 400, builtin:tiny
    python jobs/bench_serve_llm.py --model builtin:smollm2-135m --n 50 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("crv", "serve")
MAX_TOKENS = 64
APP = "bench_llm"
MODEL_ID = "bench-model"


# ------------------------------------------------------------------ pure helpers
def workload(n: int, seed: int = 7) -> list[dict]:
    """n refine-like requests: the critic's messages (system prompt, problem, gold answer, CoT of a few hundred
    tokens) as JSON text, keyed by problem id."""
    from crv_ray.data.synthetic import iter_problems
    from crv_ray.refine.prompts import render_messages

    return [{"problem_id": p["id"],
             "messages": json.dumps(render_messages("critic", student_name="bench", student_size="1M",
                                                    problem=p["problem"], answer=p["answer"], cot=p["cot"]))}
            for p in iter_problems(n, seed, wrong_fraction=0.25)]


def agreement(a: dict[str, str | None], b: dict[str, str | None]) -> tuple[float, int]:
    """(share of the keys both sides answered whose texts are identical, keys compared). An errored row (None)
    never agrees."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return 0.0, 0
    same = sum(1 for k in keys if a[k] is not None and a[k] == b[k])
    return same / len(keys), len(keys)


def marginal_rate(n_lo: int, wall_lo: float, n_hi: int, wall_hi: float) -> float | None:
    """Rows/s between two run sizes: what a longer run adds, without what both pay once."""
    if n_hi <= n_lo or wall_hi <= wall_lo:
        return None
    return (n_hi - n_lo) / (wall_hi - wall_lo)


# ------------------------------------------------------------------ the two paths
def engine_config(model: str):
    from crv_ray.config import VLLMEngineConfig

    # jobs/configs/tiny_cpu.yaml's engine settings; batching at crv's defaults (16 rows x 4 batches in flight).
    return VLLMEngineConfig(model=model, max_model_len=2048, dtype="float32", enforce_eager=True)


class CrvSide:
    def __init__(self, model: str):
        from crv_ray.engines import resolved_model_path

        self.cfg = engine_config(model)
        self.model_path = resolved_model_path(model)

    def start(self) -> None:
        from crv_ray.config import Sampling
        from crv_ray.engines.vllm_engine import build_vllm_transform
        from crv_ray.engines.vllm_pool import VLLMPool, new_load_log

        self.log_name, self.log_handle = new_load_log()
        self.pool = VLLMPool("bench", self.cfg, self.model_path, self.log_name)
        self.pool.start()
        self.pool.wait_ready(600)
        self.transform = build_vllm_transform(self.cfg, self.pool.client(), Sampling(temperature=0.0,
                                              max_tokens=MAX_TOKENS), None, keep=["problem_id"],
                                              key_column="problem_id")

    def run(self, rows: list[dict], on_rows=None) -> dict[str, dict]:
        import ray.data

        from crv_ray.engines.columns import MESSAGES, OUT_ERROR, OUT_REPLY, SKIP

        ds = ray.data.from_items([{"problem_id": r["problem_id"], MESSAGES: r["messages"], SKIP: False}
                                  for r in rows])
        return collect(self.transform(ds), OUT_REPLY, OUT_ERROR, on_rows)

    def kill_replica(self) -> str:
        import ray

        ray.kill(self.pool.actors[0], no_restart=False)  # Ray restarts it (max_restarts=-1), as after a crash
        return "ray.kill(engine actor)"

    def loads(self) -> int:
        import ray

        return ray.get(self.log_handle.count.remote("bench"))

    def stop(self) -> None:
        self.pool.stop()


class ServeSide:
    def __init__(self, model: str):
        from crv_ray.engines import resolved_model_path

        self.cfg = engine_config(model)
        self.model_path = resolved_model_path(model)

    def start(self) -> None:
        from ray import serve
        from ray.data.llm import ServeDeploymentProcessorConfig, build_processor
        from ray.serve.llm import LLMConfig, build_llm_deployment
        from ray.serve.llm.openai_api_models import ChatCompletionRequest
        from ray.serve.llm.request_router import PrefixCacheAffinityRouter

        from crv_ray.engines.vllm_pool import engine_kwargs

        llm_config = LLMConfig(
            model_loading_config={"model_id": MODEL_ID, "model_source": self.model_path},
            deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                               "request_router_config": {"request_router_class": PrefixCacheAffinityRouter}},
            engine_kwargs=engine_kwargs(self.cfg),
            placement_group_config={"bundles": [{"CPU": self.cfg.cpus_per_replica}]},
            runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(self.cfg.kv_cache_space_gb),
                                      "TOKENIZERS_PARALLELISM": "false"}},
            log_engine_metrics=False,
        )
        handle = serve.run(build_llm_deployment(llm_config), name=APP, route_prefix=None)
        self.deployment = handle.deployment_name
        proc_cfg = ServeDeploymentProcessorConfig(
            deployment_name=self.deployment, app_name=APP, batch_size=self.cfg.batch_size,
            dtype_mapping={"ChatCompletionRequest": ChatCompletionRequest}, should_continue_on_error=True)
        self.processor = build_processor(
            proc_cfg,
            preprocess=lambda row: {"problem_id": row["problem_id"], "method": "chat",
                                    "dtype": "ChatCompletionRequest",
                                    "request_kwargs": {"model": MODEL_ID, "messages": json.loads(row["messages"]),
                                                       "max_tokens": MAX_TOKENS, "temperature": 0.0}},
            postprocess=_serve_reply)

    def run(self, rows: list[dict], on_rows=None) -> dict[str, dict]:
        import ray.data

        return collect(self.processor(ray.data.from_items(rows)), "text", "error", on_rows)

    def kill_replica(self) -> str:
        import ray

        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::") and self.deployment in a["name"]]
        for a in names:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
        return f"ray.kill({len(names)} Serve replica actor)"

    def loads(self) -> int | None:
        return None  # Serve does not count replica starts

    def stop(self) -> None:
        from ray import serve

        serve.shutdown()


def collect(ds, text_col: str, error_col: str, on_rows=None) -> dict[str, dict]:
    """problem_id -> {text, error}, streamed; on_rows=(k, fn) calls fn() once k rows have come back (the rest are
    still in flight then)."""
    out: dict[str, dict] = {}
    for r in ds.iter_rows():
        out[r["problem_id"]] = {"text": r[text_col], "error": r[error_col]}
        if on_rows is not None and len(out) == on_rows[0]:
            on_rows[1]()
    return out


def _serve_reply(row: dict) -> dict:
    err = row.get("__inference_error__") or None
    choices = row.get("choices") or []
    text = choices[0]["message"]["content"] if choices and not err else None
    return {"problem_id": row["problem_id"], "text": text, "error": err}


# ------------------------------------------------------------------ one path, in its own process
def cluster_usage(idle_s: float = 5.0) -> dict:
    """The local cluster is this driver's process tree: its processes, their RSS, and the CPU they burn while no
    request is in flight (controllers, proxies, health checks, metrics)."""
    import psutil

    procs = psutil.Process().children(recursive=True)

    def cpu() -> dict[int, float]:
        seconds = {}
        for p in procs:
            try:
                t = p.cpu_times()
                seconds[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return seconds

    rss = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
        except psutil.Error:
            pass
    c0 = cpu()
    time.sleep(idle_s)
    c1 = cpu()
    busy = sum(c1[pid] - c0[pid] for pid in c1.keys() & c0.keys())  # a process that ended in between: left out
    return {"processes": len(procs), "rss_mb": rss / 2**20, "idle_cpu_pct": 100 * busy / idle_s}


def child(side_name: str, model: str, ns: list[int], fault_n: int, num_cpus: int, out_path: str) -> None:
    import ray

    from crv_ray.ray_session import quiet_ray_data

    side = CrvSide(model) if side_name == "crv" else ServeSide(model)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    res: dict = {"side": side_name, "runs": [], "texts": {}}
    t0 = time.time()
    side.start()
    res["startup_s"] = time.time() - t0
    rows = workload(sum(ns) + fault_n)
    start = 0
    for n in ns:  # distinct problems per run: no prefix-cache reuse from the previous run
        part = rows[start:start + n]
        start += n
        t = time.time()
        out = side.run(part)
        wall = time.time() - t
        errors = sum(1 for r in out.values() if r["error"])
        res["runs"].append({"n": n, "wall_s": wall, "returned": len(out), "errors": errors})
        res["texts"].update({k: v["text"] for k, v in out.items()})
        print(f"[{side_name}] N={n}: {wall:.1f}s, {len(out)} rows, {errors} errors", flush=True)
    res["cluster"] = cluster_usage()
    if fault_n:
        res["fault"] = fault_run(side, rows[start:start + fault_n])
    res["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out_path).write_text(json.dumps(res))
    side.stop()
    ray.shutdown()


def fault_run(side, rows: list[dict]) -> dict:
    """Run `rows` once undisturbed (the reference texts), then again killing the replica as soon as the first rows
    come back (most rows are then queued or running on it)."""
    ref = side.run(rows)
    how: list[str] = []
    kill_at = max(1, len(rows) // 10)
    t = time.time()
    try:
        out = side.run(rows, on_rows=(kill_at, lambda: how.append(side.kill_replica())))
        outcome = None
    except Exception as e:  # noqa: BLE001 - the outcome being measured
        out, outcome = {}, f"run failed: {error_summary(e)}"
    wall = time.time() - t
    recovery_s = recovered_after(side, rows[:16])
    served = sum(1 for k, r in out.items() if r["text"] is not None and r["text"] == ref[k]["text"])
    errors = [r["error"] for r in out.values() if r["error"]]
    return {"n": len(rows), "kill_after_rows": kill_at, "kill": how[0] if how else "not killed", "wall_s": wall,
            "returned": len(out), "same_text": served, "errors": len(errors),
            "first_error": errors[0][:200] if errors else None, "failure": outcome, "loads": side.loads(),
            "recovery_s": recovery_s}


def recovered_after(side, rows: list[dict], timeout_s: float = 180.0) -> float | None:
    """Seconds until a fresh run of `rows` is served without errors again (None: not within timeout_s)."""
    t = time.time()
    while time.time() - t < timeout_s:
        try:
            if all(r["error"] is None for r in side.run(rows).values()):
                return time.time() - t
        except Exception:  # noqa: BLE001 - not back yet
            time.sleep(2)
    return None


def error_summary(e: Exception) -> str:
    """The innermost error of a (Ray-wrapped, colored) traceback: a chained traceback prints the cause first, and
    Ray's wrappers (RayTaskError, UserCodeException) say only that a task failed."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    causes = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    inner = [ln for ln in causes if not re.match(r"^(ray\.exceptions\.)?(RayTaskError|UserCodeException)\b", ln)]
    return ((inner or causes)[0] if causes else f"{type(e).__name__}: {lines[0] if lines else ''}")[:300]


# ------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs=2, default=[100, 400], help="two run sizes (rows)")
    ap.add_argument("--fault-n", type=int, default=100, help="rows of the killed-replica run (0: skip)")
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--num-cpus", type=int, default=6, help="logical CPUs of the local Ray cluster (as crv-ray's)")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.model, args.n, args.fault_n, args.num_cpus, args.child[1])
        return
    if "serve" in args.sides:
        try:
            import ray.serve  # noqa: F401
        except ImportError:
            sys.exit("Ray Serve is not installed: pip install -e '.[serve]' (or pip install \"ray[serve]==2.60.0\")")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, __file__, "--child", side, str(out), "--model", args.model, "--n", *map(str, args.n),
                   "--fault-n", str(args.fault_n), "--num-cpus", str(args.num_cpus)]
            t = time.time()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if p.returncode != 0 or not out.exists():
                sys.exit(f"{side} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
            results[side] = json.loads(out.read_text())
            print(f"{side}: done in {time.time() - t:.0f}s", flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    print(f"\nServe LLM vs engine actors ({args.model}, 1 replica, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f})")
    (n_lo, n_hi) = args.n
    head = (f"{'path':<6} {'start s':>8} {f'N={n_lo} r/s':>10} {f'N={n_hi} r/s':>10} {'marginal':>9} "
            f"{'driver MB':>10} {'procs':>6} {'cluster MB':>11} {'idle CPU%':>10}")
    print(head)
    for side, r in results.items():
        lo, hi = r["runs"]
        m = marginal_rate(lo["n"], lo["wall_s"], hi["n"], hi["wall_s"])
        c = r["cluster"]
        m_txt = f"{m:.2f}" if m else "n/a"
        print(f"{side:<6} {r['startup_s']:>8.1f} {lo['n'] / lo['wall_s']:>10.2f} {hi['n'] / hi['wall_s']:>10.2f} "
              f"{m_txt:>9} {r['driver_peak_rss_mb']:>10.0f} {c['processes']:>6} "
              f"{c['rss_mb']:>11.0f} {c['idle_cpu_pct']:>10.1f}")
    if len(results) == 2:
        share, n = agreement(results["crv"]["texts"], results["serve"]["texts"])
        print(f"identical greedy texts crv vs serve: {share:.1%} of {n} rows")
    for side, r in results.items():
        f = r.get("fault")
        if not f:
            continue
        loads = "" if f["loads"] is None else f", engine loads {f['loads']}"
        tail = "".join(f"; {x}" for x in (f["failure"], f["first_error"] and "first error: " + f["first_error"]) if x)
        print(f"killed replica, {side}: {f['kill']} after {f['kill_after_rows']} of {f['n']} rows came back -> "
              f"{f['returned']} rows returned, {f['same_text']} with the undisturbed text, {f['errors']} error rows"
              f"{loads}, {f['wall_s']:.1f}s{tail}")
        back = "not within 180s" if f["recovery_s"] is None else f"{f['recovery_s']:.1f}s after the run"
        print(f"  {side}: served 16 rows without errors again {back}")

if __name__ == "__main__":
    main()
