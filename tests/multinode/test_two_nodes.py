"""Refine and SFT on a two-node Ray cluster on this machine (a head and a worker node, see local_cluster.py), then the
same with the worker node killed mid-refine and again mid-training, a fresh node taking its place each time.

Placement is forced by size, as on a real cluster: each node has 3 logical CPUs and a training worker takes 2, so
the two workers can only run one per node; Ray Data spreads the refine's read-and-map tasks over the nodes.
The scripted reply double (crv_ray.testing.node_logged_replies) logs each call to a file of the node it ran on.

The drivers are `crv-ray` processes that join the cluster through `ray.address` in their config; this test process
only starts and kills nodes (the session's own Ray may be up in it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import yaml

from crv_ray import storage
from crv_ray.testing import HOLD_CRITIC_ENV, NODE_LOG_ENV
from local_cluster import LocalCluster  # tests/multinode/local_cluster.py

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NODE_CPUS = 3
COT = "We add {a} and {b}.\n\nThat gives {a} + {b} = {s}.\n\nThe final answer is \\boxed{{{s}}}."
PROBLEMS = [{"id": f"p{i}", "problem": f"[label={('easy', 'medium', 'hard')[i % 3]}] What is {i}+{i + 2}?",
             "answer": str(2 * i + 2), "cot": COT.format(a=i, b=i + 2, s=2 * i + 2)} for i in range(8)]
BAD_LINES = ['{"id": "broken", "problem": ', json.dumps({"id": "noanswer", "problem": "x", "cot": "y"})]
IDS = [p["id"] for p in PROBLEMS]
# 8 rows on 2 workers: 4 steps per epoch, 24 steps. Ray Train registers a checkpoint at its controller's next poll
# (every 2 s), so with one every 4 steps the run lasts at least 5 polls after the first one is registered: a kill
# made then always lands mid-training.
SFT = {"epochs": 6, "lr": 1.0e-2, "max_length": 256, "max_prompt_length": 128, "per_device_batch_size": 1,
       "grad_accum_steps": 1, "checkpoint_every_steps": 4, "keep_last_checkpoints": 2, "seed": 3}
STEPS = 24


# ------------------------------------------------------------------ storage (the run_dir URI on the S3 server)
def _fs(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    return storage.resolve(uri)


def read_text(uri: str) -> str:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def count_files(uri: str, suffix: str) -> int:
    fs, path = _fs(uri)
    if not exists(uri):
        return 0
    return sum(1 for i in fs.get_file_info(pyarrow.fs.FileSelector(path)) if i.base_name.endswith(suffix))


def read_rows(uri: str) -> list[dict]:
    fs, path = _fs(uri)
    return pq.read_table(path, filesystem=fs).to_pylist()


def metrics(stage_uri: str) -> list[dict]:
    """metrics.jsonl lines in the order written (a restart writes steps after its checkpoint again)."""
    uri = f"{stage_uri}/metrics.jsonl"
    return [json.loads(x) for x in read_text(uri).splitlines()] if exists(uri) else []


def registered_checkpoints(stage_uri: str) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (its snapshot in the run's storage folder):
    the ones a restart can resume from."""
    fs, path = _fs(f"{stage_uri}/checkpoints")
    if not exists(f"{stage_uri}/checkpoints"):
        return []
    steps = []
    for run in fs.get_file_info(pyarrow.fs.FileSelector(path)):
        snapshot = f"{stage_uri}/checkpoints/{run.base_name}/checkpoint_manager_snapshot.json"
        if exists(snapshot):
            try:
                results = json.loads(read_text(snapshot))["checkpoint_results"]
            except ValueError:  # caught mid-write
                continue
            steps += [int(r["metrics"]["step"]) for r in results]
    return sorted(steps)


def last_per_step(lines: list[dict]) -> list[dict]:
    by_step = {m["step"]: m for m in lines}
    return [by_step[s] for s in sorted(by_step)]


# ------------------------------------------------------------------ cluster and drivers
class Nodes:
    """The cluster, its node logs, and which worker node is current (a killed one is replaced by a fresh one)."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs = logs
        self.cluster = LocalCluster(env={"PYTHONPATH": str(ROOT), **env})
        self.workers = 0
        self.worker = ""

    def start(self) -> None:
        self.cluster.start_head(NODE_CPUS, env={NODE_LOG_ENV: str(self.logs / "head.log")})
        self.add_worker()

    def add_worker(self) -> None:
        self.workers += 1
        self.worker = f"worker-{self.workers}"
        self.cluster.add_node(self.worker, NODE_CPUS, env={NODE_LOG_ENV: str(self.logs / f"{self.worker}.log"),
                                                           HOLD_CRITIC_ENV: str(self.hold_file(self.worker))})

    def hold_file(self, node: str) -> Path:
        """While it exists, the node's critic calls do not return (crv_ray.testing.node_logged_replies)."""
        return self.logs / f"{node}.hold"

    def calls(self, node: str) -> list[tuple[str, str]]:
        path = self.logs / f"{node}.log"
        return [tuple(x.split("\t")) for x in path.read_text().splitlines()] if path.exists() else []

    def replace_worker(self) -> str:
        """Kill the current worker node (SIGKILL to all its processes, as a node dies) and add a fresh one."""
        killed = self.worker
        self.cluster.kill_node(killed)
        self.add_worker()
        return killed


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, cluster_env, tiny_model_dir):
    logs = tmp_path_factory.mktemp("node_logs")
    n = Nodes(logs, cluster_env)
    n.start()
    yield n
    n.cluster.shutdown()


def write_config(tmp: Path, run_dir: str, address: str) -> Path:
    inp = tmp / "in.jsonl"
    inp.write_text("\n".join([json.dumps(p) for p in PROBLEMS] + BAD_LINES) + "\n")
    cfg = {
        "run_dir": run_dir,
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "file", "path": str(inp), "columns": {"id": "id"}},
        "engines": {"agent": {"kind": "scripted", "function": "crv_ray.testing:node_logged_replies"},
                    "student": {"kind": "scripted", "function": "crv_ray.testing:node_logged_replies"}},
        "negatives": {"student": {"k": 2}},
        "refine": {"shard_size": 2, "watchdog_s": 120, "startup_timeout_s": 120},
        "ray": {"address": address},
        "train": {"scaling": {"num_workers": 2, "cpus_per_worker": 2}, "sft": SFT},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_driver(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "disabled", **env}
    with open(log, "ab") as f:
        f.write(f"$ crv-ray {' '.join(args)}\n".encode())
        return subprocess.Popen([sys.executable, "-m", "crv_ray.cli", *args], env=env, cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, nodes: Nodes, timeout_s: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"driver did not finish in {timeout_s:.0f}s:\n{log.read_text()[-4000:]}\n{nodes.cluster.logs()}")


def run_driver(args: list[str], env: dict[str, str], log: Path, nodes: Nodes) -> None:
    rc = finish(start_driver(args, env, log), log, nodes)
    assert rc == 0, log.read_text()[-4000:]


def wait_for(what: str, cond, proc: subprocess.Popen, log: Path, timeout_s: float = 180, poll_s: float = 0.1):
    deadline = time.time() + timeout_s
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the driver ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
        time.sleep(poll_s)


# ------------------------------------------------------------------ checks
def check_refine_outputs(run_dir: str) -> dict:
    """Every input row is one trace row; the two bad lines are quarantined with their reasons; nothing twice."""
    manifest = json.loads(read_text(f"{run_dir}/refine/manifest.json"))
    rec = manifest["reconciliation"]
    assert rec["complete"] and rec["balanced"], rec
    assert rec["rows_in"] == 10 and rec["trace_rows"] == 10 and rec["trace_error"] == rec["errors_rows"] == 2, rec
    trace = read_rows(f"{run_dir}/refine/trace")
    assert sorted(r["problem_id"] for r in trace if r["status"] == "ok") == sorted(IDS)  # each once
    errors = read_rows(f"{run_dir}/refine/errors")
    assert len(errors) == 2 and all(e["stage"] == "input" and e["reason"] for e in errors)
    sft = read_rows(f"{run_dir}/refine/sft")
    assert sorted(r["problem_id"] for r in sft) == sorted(IDS)
    pairs = read_rows(f"{run_dir}/refine/pairs")
    assert len({p["pair_id"] for p in pairs}) == len(pairs) > 0
    return {"manifest": manifest, "sft": sft, "pairs": pairs}


def comparable(rows: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def plain_run(nodes, run_root, cluster_env, tmp_path_factory):
    """Refine, then SFT with one worker per node, on the two-node cluster without faults."""
    tmp = tmp_path_factory.mktemp("plain")
    run_dir = f"{run_root}/plain"
    config = write_config(tmp, run_dir, nodes.cluster.address)
    log = tmp / "driver.log"
    t0 = time.time()
    run_driver(["refine", str(config)], cluster_env, log, nodes)
    t_refine = time.time() - t0
    run_driver(["train", "sft", str(config)], cluster_env, log, nodes)
    print(f"two nodes: refine {t_refine:.0f}s, sft {time.time() - t0 - t_refine:.0f}s")
    return run_dir, log


def test_refine_and_sft_use_both_nodes(plain_run, nodes):
    run_dir, log = plain_run
    out = check_refine_outputs(run_dir)
    # Both nodes answered scripted calls; together, each problem's critic was asked (at least) once.
    head, worker = nodes.calls("head"), nodes.calls("worker-1")
    assert head and worker, (len(head), len(worker))
    assert {pid for stage, pid in head + worker if stage.startswith("critic")} == set(IDS)
    assert out["manifest"]["shards"]["total"] == 5
    # SFT: every step ran on a worker group spanning two nodes, and it learned.
    steps = last_per_step(metrics(f"{run_dir}/sft"))
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert all(m["nodes"] == 2 for m in steps), [m["nodes"] for m in steps]
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"]
    assert exists(f"{run_dir}/sft/model/crv_ray_train.json")


def test_a_worker_no_node_can_hold_fails_at_once(plain_run, nodes, cluster_env, tmp_path):
    """The cluster has 6 CPUs in all, but a 4-CPU training worker fits on neither node: refused with the numbers
    (Ray Train would wait for its placement group without end)."""
    run_dir, _ = plain_run
    config = write_config(tmp_path, run_dir, nodes.cluster.address)
    log = tmp_path / "driver.log"
    proc = start_driver(["train", "sft", str(config), "--set", "train.scaling.num_workers=1",
                         "--set", "train.scaling.cpus_per_worker=4"], cluster_env, log)
    assert finish(proc, log, nodes, timeout_s=120) != 0
    assert ("the training workers do not fit the Ray cluster: each needs CPU 4 on one node, and no node of the 2 "
            "has that (at most CPU 3) (no autoscaler") in log.read_text(), log.read_text()[-3000:]


def test_tiny_vllm_pool_has_a_replica_on_each_node(nodes, run_root, cluster_env, tmp_path):
    """Refine on real vLLM (builtin:tiny) with a 2-replica pool on the two-node cluster, run_dir on S3: the replicas
    load on different nodes (SPREAD), each once, and every input row is accounted for."""
    run_dir = f"{run_root}/vllm"
    args = ["refine", str(ROOT / "jobs" / "configs" / "tiny_cpu.yaml"), "--set", f"run_dir={run_dir}",
            "--set", f"ray.address={nodes.cluster.address}", "--set", "engines.agent.replicas=2",
            "--set", "engines.agent.cpus_per_replica=1"]
    run_driver(args, cluster_env, tmp_path / "driver.log", nodes)
    manifest = json.loads(read_text(f"{run_dir}/refine/manifest.json"))
    rec = manifest["reconciliation"]
    assert rec["complete"] and rec["balanced"] and rec["rows_in"] == rec["trace_rows"] == 8, rec
    (pool,) = [p for p in manifest["runs"][-1]["engine_pools"].values() if "agent" in p["engines"]]
    assert (pool["replicas"], pool["loads"], pool["nodes"]) == (2, 2, 2), pool


def test_worker_node_killed_mid_refine_and_mid_sft(plain_run, nodes, run_root, cluster_env, tmp_path):
    """The worker node dies (all its processes SIGKILLed) while it holds refine rows, and again while it runs a
    training worker; each time a fresh node joins. Refine ends with every row once and its committed shards kept
    (Ray Data retries the lost tasks within the run, or a rerun resumes from the committed shards); training
    restarts from its last checkpoint and ends on the uninterrupted run's loss trajectory."""
    plain_dir, _ = plain_run
    run_dir = f"{run_root}/killed"
    config = write_config(tmp_path, run_dir, nodes.cluster.address)
    log = tmp_path / "driver.log"
    done_dir = f"{run_dir}/refine/_work/done"

    # Refine: the worker node's critic calls hang, so it holds its shards' rows while the head's shards commit.
    holding = nodes.worker
    nodes.hold_file(holding).touch()
    before = len(nodes.calls(holding))  # the calls of the plain run

    def holds_rows_and_a_shard_committed() -> bool:
        held = [s for s, _ in nodes.calls(holding)[before:] if s.startswith("critic")]
        return bool(held) and count_files(done_dir, ".json") >= 1

    proc = start_driver(["refine", str(config)], cluster_env, log)
    wait_for("a shard committed while the worker node holds rows", holds_rows_and_a_shard_committed, proc, log)
    fs, done_path = _fs(done_dir)
    committed = {i.base_name: read_text(f"{done_dir}/{i.base_name}")
                 for i in fs.get_file_info(pyarrow.fs.FileSelector(done_path)) if i.base_name.endswith(".json")}
    nodes.replace_worker()
    rc = finish(proc, log, nodes)
    if rc != 0:  # the run failed with the node: the rerun resumes from the shards committed before
        run_driver(["refine", str(config)], cluster_env, log, nodes)
    out = check_refine_outputs(run_dir)
    assert 1 <= len(committed) < 5, sorted(committed)
    for name, marker in committed.items():  # committed shards are never redone
        assert read_text(f"{done_dir}/{name}") == marker, name
    runs = out["manifest"]["runs"]
    assert [r["shards"] for r in runs] == ([5] if rc == 0 else [5 - len(committed)]), (rc, runs)
    plain = check_refine_outputs(plain_dir)
    assert comparable(out["sft"]) == comparable(plain["sft"])
    assert comparable(out["pairs"]) == comparable(plain["pairs"])

    # SFT: kill the worker node as soon as Ray Train has registered a checkpoint.
    sft_dir = f"{run_dir}/sft"
    proc = start_driver(["train", "sft", str(config)], cluster_env, log)
    wait_for("a registered SFT checkpoint", lambda: registered_checkpoints(sft_dir), proc, log, timeout_s=240)
    registered = registered_checkpoints(sft_dir)
    nodes.replace_worker()
    assert finish(proc, log, nodes) == 0, log.read_text()[-4000:]
    lines = metrics(sft_dir)
    steps = [m["step"] for m in lines]
    # Restarted from a checkpoint at least as late as the one registered before the kill, not from scratch: the
    # steps after it were run again, each once more.
    restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    assert restart is not None, f"no restart in {steps}"
    resumed_from = steps[restart] - 1
    assert resumed_from % SFT["checkpoint_every_steps"] == 0 and max(registered) <= resumed_from, (steps, registered)
    assert steps == list(range(1, steps[restart - 1] + 1)) + list(range(resumed_from + 1, STEPS + 1)), steps
    final, reference = last_per_step(lines), last_per_step(metrics(f"{plain_dir}/sft"))
    assert [m["step"] for m in final] == list(range(1, STEPS + 1))
    assert all(m["nodes"] == 2 for m in lines), [m["nodes"] for m in lines]
    for a, b in zip(reference, final):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), a["step"]
    assert exists(f"{sft_dir}/model/crv_ray_train.json")
    print(f"refine: {len(committed)} shard(s) committed before the kill, "
          f"{'completed in the run' if rc == 0 else 'resumed by a rerun'}; sft: checkpoints {registered} registered "
          f"at the kill, killed after step {steps[restart - 1]}, resumed from step {resumed_from}")
