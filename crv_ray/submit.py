"""`crv-ray submit`: run `crv-ray run CONFIG` as a Ray job on a cluster, through Ray's Job Submission SDK.

The job's runtime env holds a working dir with the config (the entrypoint names it relative to that dir) and,
optionally, packages to install (pip or uv) or a container image. It never holds environment values: a job's runtime
env is shown by `ray job list` to anyone who can reach the dashboard, so the variables a config reads (`${VAR}`, an
engine's api_key_env) must be set on the cluster itself (on KubeRay: a Secret in the RayJob's env).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crv_ray.config import RunConfig, load_config_dict, read_config_file
from crv_ray.redact import ENV_REF_RE, SECRET_FIELD_RE
from crv_ray.storage import is_uri

# Not uploaded from a --working-dir: repository metadata and virtual environments are large and never needed.
WORKING_DIR_EXCLUDES = [".git", ".venv", "__pycache__"]
_UNSET = "set-on-the-cluster"
AGENT_WAIT_S = 180  # how long a just-started cluster may take to accept jobs


def job_address(address: str | None) -> str:
    """The dashboard address to submit to: --address, else RAY_ADDRESS."""
    address = address or os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        raise ValueError("no Ray cluster to submit to: pass --address http://HEAD:8265 (the dashboard's address) or "
                         "set the RAY_ADDRESS environment variable to it")
    return address


def env_references(raw: Any, cfg: RunConfig | None = None) -> list[str]:
    """Names of the environment variables a config reads: `${VAR}` in any string, and the `*_env` fields (an
    engine's api_key_env) of the validated config."""
    names: list[str] = []

    def walk(obj: Any, key: str = "", from_config: bool = False) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k), from_config)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, key, from_config)
        elif isinstance(obj, str):
            names.extend(m.group(1) for m in ENV_REF_RE.finditer(obj))
            if from_config and key.endswith("_env") and obj:
                names.append(obj)

    walk(raw)
    if cfg is not None:
        walk(cfg.model_dump(mode="json"), from_config=True)
    return list(dict.fromkeys(names))


def validate_for_cluster(raw: dict, source: str, overrides: list[str]) -> RunConfig:
    """Validate the config here, before anything is uploaded. Variables unset here (they may exist only on the
    cluster) are validated as a placeholder string; the job expands the real values."""

    def placeholder(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: placeholder(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [placeholder(v) for v in obj]
        if isinstance(obj, str):
            return ENV_REF_RE.sub(lambda m: m.group(0) if m.group(1) in os.environ or m.group(2) is not None
                               else _UNSET, obj)
        return obj

    return load_config_dict(placeholder(raw), source, overrides)


@dataclass
class JobSpec:
    entrypoint: str
    runtime_env: dict
    working_dir: Path
    notes: list[str]


def build_job(config: Path, overrides: list[str], working_dir: Path | None = None, pip: list[str] | None = None,
              uv: list[str] | None = None, image_uri: str | None = None, staging: Path | None = None) -> JobSpec:
    """The entrypoint and runtime env of a `crv-ray run` job. Without `working_dir` the config alone is copied into
    `staging` (a fresh folder) and uploaded from there."""
    config = Path(config)
    for o in overrides:  # the entrypoint, like the runtime env, is shown by `ray job list`
        key = o.split("=", 1)[0].strip()
        if SECRET_FIELD_RE.search(key.rsplit(".", 1)[-1]) and not key.endswith("_env"):
            raise ValueError(f"--set {key}=...: a secret would be visible in the job's entrypoint (`ray job list`); "
                             "reference an environment variable set on the cluster instead (${VAR} in the config)")
    raw = read_config_file(config)
    cfg = validate_for_cluster(raw, str(config), overrides)
    if working_dir is not None:
        working_dir = Path(working_dir).resolve()
        if not working_dir.is_dir():
            raise FileNotFoundError(f"--working-dir {working_dir} is not a folder")
        try:
            rel = config.resolve().relative_to(working_dir)
        except ValueError:
            raise ValueError(f"the config {config} is not inside --working-dir {working_dir}: the job can only read "
                             "files under its working dir") from None
    else:
        if staging is None:
            raise ValueError("build_job needs a staging folder when no working_dir is given")
        working_dir = Path(staging)
        rel = Path(config.name)
        shutil.copyfile(config, working_dir / rel)
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir)}
    if working_dir != staging:
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if pip:
        runtime_env["pip"] = list(pip)
    if uv:
        runtime_env["uv"] = list(uv)
    if image_uri:
        runtime_env["image_uri"] = image_uri
    entrypoint = shlex.join(["crv-ray", "run", rel.as_posix(), *[a for o in overrides for a in ("--set", o)]])

    notes = []
    env_names = env_references(raw, cfg)
    if env_names:
        notes.append(f"the config reads the environment variables {', '.join(env_names)}: they are not sent with "
                     "the job (its runtime env is visible in `ray job list`); set them on the cluster's nodes, "
                     "e.g. from a Secret in the RayJob or RayCluster spec")
    if isinstance(cfg.run_dir, Path) and not cfg.run_dir.is_absolute():
        notes.append(f"run_dir {cfg.run_dir} is relative: the job writes it inside its working dir on the cluster, "
                     "which Ray removes later; set run_dir to an absolute path on storage the cluster keeps")
    # The job resolves relative paths from its working dir (its current directory).
    if cfg.input.source == "file" and cfg.input.path and not is_uri(cfg.input.path) \
            and not Path(cfg.input.path).is_absolute() \
            and not (working_dir / cfg.input.path).exists():
        notes.append(f"input.path {cfg.input.path} is relative and not in the uploaded working dir {working_dir}: "
                     "use --working-dir with a folder holding it, or an absolute path the cluster sees")
    return JobSpec(entrypoint, runtime_env, working_dir, notes)


def _job_id(config: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(config).stem).strip("-") or "run"
    return f"crv-ray-{stem}-{uuid.uuid4().hex[:8]}"


def _submit_when_ready(client, timeout_s: float = AGENT_WAIT_S, **job) -> str:
    """A cluster that has just started answers "No available agent to submit job" until its head's agent is up
    (Ray asks to try again later): retry that for a while, nothing else."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            print("[submit] the cluster's job agent is not up yet (the head is still starting); retrying", flush=True)
            time.sleep(3)


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait_for_job(client, job_id: str, address: str) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED (its message
    printed)."""
    from ray.job_submission import JobStatus

    try:
        asyncio.run(_stream_logs(client, job_id))
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can close a moment before the status turns final
            time.sleep(1)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; job {job_id} keeps running: `ray job stop {job_id} --address "
              f"{address}` stops it", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    if status == JobStatus.SUCCEEDED:
        print(f"[submit] job {job_id} SUCCEEDED", flush=True)
        return 0
    print(f"[submit] job {job_id} {status}: {info.message or 'no message'}", file=sys.stderr, flush=True)
    return 1


def submit(config: str | Path, address: str | None = None, wait: bool = True, working_dir: str | Path | None = None,
           pip: list[str] | None = None, uv: list[str] | None = None, image_uri: str | None = None,
           overrides: list[str] | None = None) -> int:
    """`crv-ray submit`: the exit status of the job with --wait, else 0 once it is submitted."""
    from ray.job_submission import JobSubmissionClient

    address = job_address(address)
    config = Path(config)
    overrides = list(overrides or [])
    with tempfile.TemporaryDirectory(prefix="crv-ray-submit-") as staging:
        job = build_job(config, overrides, Path(working_dir) if working_dir else None, pip, uv, image_uri,
                        Path(staging))
        for note in job.notes:
            print(f"[submit] note: {note}", flush=True)
        client = JobSubmissionClient(address)
        # The working dir is packed and uploaded here, so the staging folder may go once this returns.
        job_id = _submit_when_ready(client, entrypoint=job.entrypoint, runtime_env=job.runtime_env,
                                    submission_id=_job_id(config), metadata={"crv_ray_config": config.name})
    print(f"[submit] job {job_id} submitted to {address}: {job.entrypoint}", flush=True)
    if not wait:
        print(f"[submit] follow it with `ray job logs --follow {job_id} --address {address}`, check it with "
              f"`ray job status {job_id} --address {address}`", flush=True)
        return 0
    return wait_for_job(client, job_id, address)
