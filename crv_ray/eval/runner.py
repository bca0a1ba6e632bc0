"""The eval glue: benchmarks -> chat messages -> vLLM on Ray Data (refine's engine layer) -> scored rows -> outputs.

Per model, one Ray Data pass over the union of its unfinished benchmarks (two when both greedy replies and n samples
are asked for), all on one engine pool: it loads for the first model that has work, and the next models' weights are
swapped into it when they are fine-tuned copies of that model (`engines.weight_swap`). Scoring runs inside the same
pipeline, after the engine. Outputs:

    <out>/<model>/<benchmark>/generations.parquet   every generation with its score
    <out>/<model>/<benchmark>/done.json             the marker: config hash, metrics, status counts
    <out>/quarantine/<benchmark>.jsonl              benchmark rows that could not be used (file:line, reason)
    <out>/summary.json                              the metrics of every (model, benchmark) of this call

A (model, benchmark) whose marker holds the same hash (model weights, benchmark file, eval settings) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from crv_ray import storage
from crv_ray.answers import check_answer
from crv_ray.config import RunConfig, Sampling, VLLMEngineConfig
from crv_ray.engines import vllm_engine
from crv_ray.engines.columns import MESSAGES, OUT_ERROR, OUT_PROMPT_TOKENS, OUT_REPLY, OUT_TOKENS, SEED, SKIP
from crv_ray.eval.benchmarks import Benchmark, load_benchmark, select_benchmarks
from crv_ray.eval.config import PROBLEM_PLACEHOLDER, EvalConfig
from crv_ray.eval.scoring import GREEDY, SAMPLED, status_counts, summarize
from crv_ray.redact import redact
from crv_ray.run_paths import EVAL_DONE as DONE
from crv_ray.run_paths import EVAL_SUMMARY, RunPaths

log = logging.getLogger("crv_ray.eval")

# Engine settings that change what a model generates (the rest only change speed or placement).
_OUTPUT_ENGINE_KEYS = ("max_model_len", "dtype", "engine_kwargs", "trust_remote_code")
_KEEP = ["benchmark", "problem_id", "mode", "sample_index", "gold"]
GENERATIONS = "generations.parquet"


class EvalError(RuntimeError):
    pass


@dataclass(frozen=True)
class EvalModel:
    name: str  # the output folder and the table row
    spec: str  # as given: a directory, builtin:NAME, or a hub id
    path: str  # what vLLM loads: a local directory (or the hub id)


# ------------------------------------------------------------------ models
def _model_name(spec: str) -> str:
    from crv_ray.models.builtin import BUILTIN_PREFIX, is_builtin

    if is_builtin(spec):
        return spec[len(BUILTIN_PREFIX):]
    p = Path(spec.rstrip("/"))
    # `<run>/sft/model` -> "sft": the folder name "model" says nothing.
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def parse_model(arg: str) -> EvalModel:
    """`DIR`, `builtin:NAME` or `NAME=DIR|builtin:NAME` -> an EvalModel with a resolved path."""
    from crv_ray.engines import resolved_model_path
    from crv_ray.eval.config import NAME_RE

    name, spec = None, arg
    if "=" in arg and not Path(arg).exists():
        name, spec = arg.split("=", 1)
    name = name or _model_name(spec)
    if not NAME_RE.match(name):
        raise ValueError(f"model {arg!r}: the name {name!r} cannot name a folder; give one as NAME=PATH")
    return EvalModel(name=name, spec=spec, path=resolved_model_path(spec))


def run_models(cfg: RunConfig) -> list[EvalModel]:
    """The models of a run's eval stage, in `eval.models` order: the student, then the trained ones that exist."""
    from crv_ray.engines import resolved_model_path
    paths = RunPaths(cfg.run_dir)
    out = []
    for which in cfg.eval.models:
        if which == "base":
            out.append(EvalModel("base", cfg.student.model, resolved_model_path(cfg.student.model)))
        elif paths.model(which).exists():
            out.append(EvalModel(which, str(paths.model(which)), str(paths.model(which))))
    return out


def _model_fingerprint(path: str) -> list:
    """Names, sizes and mtimes of the weight and config files: retrained weights in the same folder are new."""
    p = storage.as_path(path)
    if not p.is_dir():
        return [path]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir())
            if f.suffix in (".safetensors", ".bin", ".json", ".gguf")]


# ------------------------------------------------------------------ engine and Ray
def eval_engine(cfg: RunConfig) -> VLLMEngineConfig:
    """The vLLM settings eval runs with: `eval.engine`, else the student's engine; their model is replaced."""
    name = cfg.eval.engine or cfg.negatives.student.engine
    knob = "eval.engine" if cfg.eval.engine else "eval.engine (unset: negatives.student.engine)"
    engine = cfg.engines.get(name)
    if engine is None:
        raise ValueError(f"{knob} = {name!r} is not defined in engines (defined: {sorted(cfg.engines)})")
    if not isinstance(engine, VLLMEngineConfig):
        raise ValueError(f"{knob} = {name!r} is a {engine.kind!r} engine; eval generates with vLLM: name a "
                         "`kind: vllm` entry of engines in eval.engine")
    return engine


def _ensure_ray(cfg: RunConfig, engine_name: str) -> None:
    """A Ray cluster with room for one vLLM pool and its caller; a local Ray started too small (by a stage that
    needed less) is restarted, since the pool would wait forever for CPUs it cannot get."""
    import ray

    from crv_ray.cluster_resources import ensure
    from crv_ray.engines import caller_resources, pool_resources
    from crv_ray.ray_session import cluster_address, init_ray, quiet_ray_data

    def need() -> dict[str, float]:
        pool, caller = pool_resources(cfg, engine_name), caller_resources(cfg, engine_name)
        return {k: pool[k] + caller[k] for k in ("CPU", "GPU")}

    need_cpus = int(need()["CPU"] + 0.999) + 2  # + the scoring map tasks and the driver's reads
    local = cluster_address(cfg)[0] is None  # a joined cluster is not ours to restart
    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < need_cpus and local and not cfg.ray.num_cpus:
        log.info("restarting the local Ray with %d logical CPUs for the eval engine", need_cpus)
        ray.shutdown()
    init_ray(cfg, need_cpus)
    quiet_ray_data()
    needed = need()  # again, now that the cluster can say whether it has (or can add) GPUs
    ensure(needed, subject="the eval engine's replicas", what={k: f"engine {engine_name!r}" for k in needed},
           timeout_s=cfg.ray.autoscale_timeout_s, hint="raise ray.num_cpus, or use a bigger cluster", error=EvalError)


# ------------------------------------------------------------------ work items
def render_messages(problem: str, ecfg: EvalConfig) -> list[dict]:
    msgs = [{"role": "system", "content": ecfg.system_prompt}] if ecfg.system_prompt else []
    # A plain replace, not str.format: prompts hold LaTeX braces (\boxed{}).
    msgs.append({"role": "user", "content": ecfg.prompt.replace(PROBLEM_PLACEHOLDER, problem)})
    return msgs


def _seed(base: int, problem_id: str, sample_index: int) -> int:
    return (base + int(hashlib.sha1(problem_id.encode()).hexdigest()[:7], 16) + sample_index) % (2**31 - 1)


def work_items(benches: list[Benchmark], ecfg: EvalConfig, mode: str, seed: int) -> list[dict]:
    """One row per generation: every problem once (greedy) or n times (sampled)."""
    items = []
    copies = 1 if mode == GREEDY else ecfg.n
    for b in benches:
        for p in b.problems:
            msgs = json.dumps(render_messages(p["problem"], ecfg))
            for i in range(copies):
                items.append({"benchmark": b.name, "problem_id": p["problem_id"], "mode": mode, "sample_index": i,
                              "gold": p["gold"], MESSAGES: msgs, SKIP: False,
                              # all ints or all None in one pass: Arrow turns a mixed column into floats
                              SEED: _seed(seed, p["problem_id"], i) if mode == SAMPLED else None})
    return items


def work_hash(cfg: RunConfig, engine: VLLMEngineConfig, model: EvalModel, bench: Benchmark) -> str:
    """Everything that changes one (model, benchmark)'s generations or scores, and nothing that only changes speed."""
    e = cfg.eval
    d = {
        "model": [model.path, _model_fingerprint(model.path)],
        # The file's content, not its path: a reinstalled package or a moved file is the same benchmark.
        "benchmark": [bench.spec.model_dump(mode="json", exclude={"name", "path"}), bench.file_sha1],
        "eval": e.model_dump(mode="json", include={"limit", "n", "greedy", "sampling", "prompt", "system_prompt"}),
        "engine": engine.model_dump(mode="json", include=set(_OUTPUT_ENGINE_KEYS)),
        "answers": cfg.answers.model_dump(mode="json"),
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ one Ray Data pass
def _score_fn(cfg: RunConfig):
    patterns, timeout_s = cfg.answers.patterns, cfg.answers.timeout_s

    def score(row: dict) -> dict:
        out = {k: row.get(k) for k in _KEEP}
        reply, err = row.get(OUT_REPLY), row.get(OUT_ERROR)
        out.update(response=reply, tokens=int(row.get(OUT_TOKENS) or 0),
                   prompt_tokens=int(row.get(OUT_PROMPT_TOKENS) or 0))
        if err or reply is None:
            out.update(predicted=None, status="error", reason=f"engine: {err or 'no reply'}")
        else:
            chk = check_answer(reply, row["gold"], patterns=patterns, timeout_s=timeout_s)
            out.update(predicted=chk.predicted, status=chk.status, reason=chk.reason)
        return out

    return score


def generate_and_score(cfg: RunConfig, make_transform: Callable, items: list[dict], sampling: Sampling,
                       what: str) -> list[dict]:
    """make_transform: what `engines.vllm_engine.ModelPool.load` returns (one loaded model, any sampling)."""
    import ray

    from crv_ray.refine.pipeline import RefineStalled, iterate_with_watchdog

    transform = make_transform(sampling, None, _KEEP + [SKIP])
    ds = transform(ray.data.from_items(items)).map(_score_fn(cfg))
    rows: list[dict] = []
    try:
        for batch in iterate_with_watchdog(ds.iter_batches(batch_size=16, batch_format="pyarrow"),
                                           cfg.eval.watchdog_s, what, cfg.eval.startup_timeout_s):
            rows.extend(batch.to_pylist())
    except RefineStalled:
        knob = "eval.watchdog_s" if rows else "eval.startup_timeout_s"
        wait = cfg.eval.watchdog_s if rows else cfg.eval.startup_timeout_s
        raise EvalError(f"{what}: no generation finished for {wait:.0f} s ({knob}); the engine may wait for "
                        "resources it cannot get (see `ray status`), or it hung") from None
    if len(rows) != len(items):
        raise EvalError(f"{what}: {len(items)} generations went in, {len(rows)} came out (rows lost in the pipeline)")
    return rows


# ------------------------------------------------------------------ outputs
def _table(model: EvalModel, bench: Benchmark, rows: list[dict]) -> pa.Table:
    info = {p["problem_id"]: (i, p) for i, p in enumerate(bench.problems)}
    rows = sorted(rows, key=lambda r: (info[r["problem_id"]][0], r["mode"] != GREEDY, r["sample_index"]))
    fields = [("model", pa.string()), ("model_path", pa.string()), ("benchmark", pa.string()),
              ("problem_id", pa.string()), ("problem", pa.string()), ("gold", pa.string()), ("gold_raw", pa.string()),
              ("mode", pa.string()), ("sample_index", pa.int32()), ("response", pa.string()),
              ("predicted", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("tokens", pa.int64()),
              ("prompt_tokens", pa.int64())] + [(f"group_{g}", pa.string()) for g in bench.spec.group_by]
    out = []
    for r in rows:
        p = info[r["problem_id"]][1]
        rec = {**r, "model": model.name, "model_path": model.path, "problem": p["problem"], "gold_raw": p["gold_raw"]}
        rec.update({f"group_{g}": p["groups"].get(g) for g in bench.spec.group_by})
        out.append(rec)
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in out], schema=schema)


def _write_result(out_dir: Path, model: EvalModel, bench: Benchmark, rows: list[dict], hash_: str,
                  wall_s: float) -> dict:
    from crv_ray.refine.store import write_parquet_atomic, write_text_atomic

    d = out_dir / model.name / bench.name
    d.mkdir(parents=True, exist_ok=True)
    (d / DONE).unlink(missing_ok=True)
    write_parquet_atomic(d / GENERATIONS, _table(model, bench, rows))
    groups = {p["problem_id"]: p["groups"] for p in bench.problems}
    result = {"model": model.name, "model_path": model.path, "benchmark": bench.name,
              **summarize([{**r, "groups": groups[r["problem_id"]]} for r in rows], bench.spec.group_by)}
    marker = {"config_hash": hash_, "result": result, "status_counts": status_counts(rows),
              "quarantined_rows": len(bench.quarantined), "generation_wall_s": round(wall_s, 3),
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_text_atomic(d / DONE, json.dumps(redact(marker), indent=2))  # the marker last: a crash before it reruns
    return marker


def _read_done(out_dir: Path, model: EvalModel, bench: Benchmark, hash_: str) -> dict | None:
    p = out_dir / model.name / bench.name / DONE
    if not p.is_file() or not (p.parent / GENERATIONS).is_file():
        return None
    try:
        marker = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return marker if marker.get("config_hash") == hash_ else None


def _report_quarantine(out_dir: Path, benches: list[Benchmark]) -> None:
    from crv_ray.refine.store import write_text_atomic

    for b in benches:
        if not b.quarantined:
            continue
        (out_dir / "quarantine").mkdir(parents=True, exist_ok=True)
        path = out_dir / "quarantine" / f"{b.name}.jsonl"
        write_text_atomic(path, "".join(json.dumps(q) + "\n" for q in b.quarantined))
        print(f"[eval] {b.name}: {len(b.quarantined)} row(s) quarantined, not evaluated (first: "
              f"{b.quarantined[0]['error']}); all in {path}", flush=True)


# ------------------------------------------------------------------ driver
def run_eval(cfg: RunConfig, models: list[EvalModel], out_dir: Path,
             benchmark_names: list[str] | None = None) -> dict:
    """Evaluate `models` on the configured (or named) benchmarks; write outputs and summary.json; print tables."""
    ecfg = cfg.eval
    t_start = time.time()
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name ({names}); name them as NAME=PATH")
    if not models:
        raise ValueError("no models to evaluate")
    engine = eval_engine(cfg)
    engine_name = ecfg.engine or cfg.negatives.student.engine
    benches = [load_benchmark(s, ecfg.limit) for s in select_benchmarks(ecfg.benchmarks, benchmark_names)]
    for b in benches:
        if not b.problems:
            raise ValueError(f"benchmark {b.name}: no usable problems in {b.spec.path or b.spec.source} "
                             f"({len(b.quarantined)} quarantined; first: "
                             f"{b.quarantined[0]['error'] if b.quarantined else 'the file is empty'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    _report_quarantine(out_dir, benches)
    markers: dict[tuple[str, str], dict] = {}
    greedy_sampling = ecfg.sampling.model_copy(update={"temperature": 0.0, "top_p": 1.0, "seed": None})
    # One pool for every model: the next model's weights are swapped into the running engines when it is a
    # fine-tuned copy of the loaded one (one engine load for base, SFT and CogPO); nothing loads for skipped models.
    with vllm_engine.ModelPool("eval", engine, ecfg.startup_timeout_s) as engines:
        _eval_models(cfg, models, benches, out_dir, engine, engine_name, engines, greedy_sampling, markers)
    summary = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "results": [markers[(m.name, b.name)]["result"] for m in models for b in benches]}
    from crv_ray.refine.store import write_text_atomic

    write_text_atomic(out_dir / EVAL_SUMMARY, json.dumps(redact(summary), indent=2))
    print("\n" + format_tables(summary), flush=True)
    print(f"[eval] summary: {out_dir / EVAL_SUMMARY}  [{time.time() - t_start:.0f}s]", flush=True)
    return summary


def _eval_models(cfg: RunConfig, models: list[EvalModel], benches: list[Benchmark], out_dir: Path,
                 engine: VLLMEngineConfig, engine_name: str, engines: vllm_engine.ModelPool,
                 greedy_sampling: Sampling, markers: dict[tuple[str, str], dict]) -> None:
    ecfg = cfg.eval
    for model in models:
        hashes = {b.name: work_hash(cfg, engine, model, b) for b in benches}
        pending = []
        for b in benches:
            done = _read_done(out_dir, model, b, hashes[b.name])
            if done is not None:
                markers[(model.name, b.name)] = done
            else:
                pending.append(b)
        if not pending:
            print(f"[eval] {model.name}: {len(benches)} benchmark(s) already done, skipped", flush=True)
            continue
        if engines.pool is None:  # not while engines are up: a restarted Ray would end them
            _ensure_ray(cfg, engine_name)
        t0 = time.time()
        n_problems = sum(len(b.problems) for b in pending)
        passes = [(GREEDY, greedy_sampling)] if ecfg.greedy else []
        passes += [(SAMPLED, ecfg.sampling)] if ecfg.sampled else []
        rows: list[dict] = []
        make = engines.load(model.path, model.name)  # one load (or reload) per model for both passes
        for mode, sampling in passes:
            items = work_items(pending, ecfg, mode, cfg.seed if ecfg.sampling.seed is None else ecfg.sampling.seed)
            print(f"[eval] {model.name}: {mode} pass, {len(items)} generation(s) over {n_problems} problem(s) "
                  f"of {', '.join(b.name for b in pending)} ({model.spec})", flush=True)
            rows += generate_and_score(cfg, make, items, sampling, f"eval {model.name} ({mode})")
        wall = time.time() - t0
        for b in pending:
            b_rows = [r for r in rows if r["benchmark"] == b.name]
            markers[(model.name, b.name)] = _write_result(out_dir, model, b, b_rows, hashes[b.name], wall)
            counts = markers[(model.name, b.name)]["status_counts"]
            if counts.get("error"):
                print(f"[eval] {model.name}/{b.name}: {counts['error']} generation(s) failed (status 'error', reason "
                      f"in {out_dir / model.name / b.name / GENERATIONS})", flush=True)
        print(f"[eval] {model.name}: done in {wall:.0f}s", flush=True)


def run_eval_stage(cfg: RunConfig) -> dict[str, Path]:
    """The eval stage of `crv-ray run`: the student, the SFT model and the CogPO model on eval.benchmarks."""
    out_dir = RunPaths(cfg.run_dir).eval
    if not cfg.eval.enabled:
        print("[run] eval disabled (eval.enabled=false)", flush=True)
        return {}
    run_eval(cfg, run_models(cfg), out_dir)
    return {"eval summary": out_dir / EVAL_SUMMARY}


# ------------------------------------------------------------------ console
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_tables(summary: dict) -> str:
    """One table per benchmark (models as rows), then one per group field (group values as rows, models as
    columns, pass@1)."""
    blocks = []
    by_bench: dict[str, list[dict]] = {}
    for r in summary["results"]:
        by_bench.setdefault(r["benchmark"], []).append(r)
    for bench, results in by_bench.items():
        r0 = results[0]
        k = next((r["k"] for r in results if r["k"]), None)
        title = f"{bench}: {r0['n_problems']} problems" + (f", {r0['n_samples']} samples each" if k else "")
        header = ["model", "greedy pass@1", "pass@1", f"maj@{k}" if k else "maj@k", "mean tokens", "no answer"]
        rows = [[r["model"], _pct(r["greedy_pass@1"]), _pct(r["pass@1"]), _pct(r["maj@k"]),
                 f"{r['mean_response_tokens']:.0f}", _pct(r["no_answer_rate"])] for r in results]
        blocks.append(title + "\n" + _grid(header, rows))
        for field in r0["groups"]:
            values = list(dict.fromkeys(v for r in results for v in r["groups"].get(field, {})))
            header = [field, "n"] + [f"{r['model']} pass@1" for r in results]
            rows = [[v, str(r0["groups"][field].get(v, {}).get("n", 0))]
                    + [_pct(r["groups"].get(field, {}).get(v, {}).get("pass@1")) for r in results] for v in values]
            blocks.append(f"{bench} by {field}\n" + _grid(header, rows))
    return "\n\n".join(blocks)


def run_eval_command(cfg: RunConfig, model_args: list[str], benchmarks: list[str] | None, out: str | None,
                     config_given: bool) -> int:
    """`crv-ray eval MODEL [MODEL ...]`."""
    models = [parse_model(a) for a in model_args]
    out_dir = storage.as_path(out) if out else (RunPaths(cfg.run_dir).eval if config_given else Path("runs") / "eval")
    run_eval(cfg, models, out_dir, benchmarks)
    return 0
