"""The KubeRay manifests in cluster/, rendered by kustomize, against the real CRD and core Kubernetes schemas and
against what a run needs: the RayJob's config loads with `crv-ray validate` exactly as its entrypoint would load
it, with the environment its pods get, and lands on storage every Ray pod mounts."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from crv_ray.config import load_config
from crv_ray.engines import caller_resources, pool_resources
from crv_ray.refine.pipeline import required_local_cpus

import k8s  # tests/cluster/k8s.py

pytestmark = pytest.mark.skipif(k8s.crd_dir() is None,
                                reason="shared/kuberay-crds not found beside the clone (set KUBERAY_CRDS_DIR)")

PYPROJECT = tomllib.loads((k8s.ROOT / "pyproject.toml").read_text())
# The run config each job overlay mounts: the package's embedded default, the GPU example.
JOB_CONFIGS = {
    "cpu-demo": k8s.ROOT / "crv_ray" / "configs" / "default.yaml",
    "gpu": k8s.ROOT / "jobs" / "configs" / "gpu_qwen7b_stratos.yaml",
}
IMAGE_TAG = {"cpu-demo": "crv-ray:cpu", "gpu": "crv-ray:gpu", "raycluster": "crv-ray:gpu"}
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)


def _pin(requirements: list[str], name: str) -> str:
    pins = [m.group(1) for r in requirements if (m := re.fullmatch(rf"{name}(?:\[[^\]]*\])?==(\S+)", r.strip()))]
    assert len(pins) == 1, f"expected one '{name}==' pin in {requirements}"
    return pins[0]


def _one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {[d['kind'] for d in docs]}"
    return found[0]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_docs(target: str) -> list[dict]:
    return [d for d in k8s.render(target) if d["kind"] in k8s.RAY_KINDS]


def _containers(doc: dict):
    for group, template in k8s.pod_templates(doc):
        for c in template["spec"]["containers"]:
            yield group, template, c


# ------------------------------------------------------------------ schemas
@pytest.mark.parametrize("target", list(k8s.TARGETS))
def test_every_rendered_manifest_is_valid(target):
    docs = k8s.render(target)
    assert {d["kind"] for d in docs} >= {"PersistentVolumeClaim"} and _ray_docs(target)
    errors = [e for d in docs for e in k8s.schema_errors(d)]
    assert errors == []


def test_validator_rejects_broken_manifests():
    job = _one(k8s.render("gpu"), "RayJob")
    assert k8s.schema_errors(job) == []

    def broken(edit) -> list[str]:
        doc = copy.deepcopy(job)
        edit(doc["spec"])
        return k8s.schema_errors(doc)

    assert broken(lambda s: s.update(backoffLimit="two")) == \
        ["RayJob/crv-ray: spec.backoffLimit: 'two' is not of type 'integer'"]
    # A typo is an unknown field: the API server would drop it, and with it the intended minimum.
    errs = broken(lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplica=0))
    assert len(errs) == 1 and "workerGroupSpecs.0: Additional properties are not allowed ('minReplica'" in errs[0]
    errs = broken(lambda s: s["rayClusterSpec"]["autoscalerOptions"].update(upscalingMode="Fast"))
    assert len(errs) == 1 and "autoscalerOptions.upscalingMode: 'Fast' is not one of" in errs[0]
    # Inside a pod template, caught by the CRD schema and by the core PodTemplate schema.
    errs = broken(lambda s: s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                  .update(ports=[{"containerPort": "dashboard"}]))
    assert len(errs) == 2 and all("containers.0.ports.0.containerPort: 'dashboard'" in e for e in errs)
    assert "head pod template" in errs[1]
    pvc = copy.deepcopy(_one(k8s.render("gpu"), "PersistentVolumeClaim"))
    pvc["spec"]["accessModes"] = "ReadWriteMany"
    (err,) = k8s.schema_errors(pvc)
    assert err.startswith("PersistentVolumeClaim/crv-ray-shared: spec.accessModes: 'ReadWriteMany' is not of type")


# ------------------------------------------------------------------ cluster shape
@pytest.mark.parametrize("target", list(k8s.TARGETS))
def test_head_runs_no_work_and_autoscaler_is_on(target):
    ray_pin = _pin(PYPROJECT["project"]["dependencies"], "ray")
    for doc in _ray_docs(target):
        spec = _cluster_spec(doc)
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["rayVersion"] == ray_pin  # the Ray the images install from pyproject
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert "cpu" in groups and groups["cpu"]["minReplicas"] >= 1


@pytest.mark.parametrize("target", ["base", "gpu", "raycluster"])
def test_gpu_group_scales_from_zero_and_requests_gpus(target):
    for doc in _ray_docs(target):
        gpu = next(g for g in _cluster_spec(doc)["workerGroupSpecs"] if g["groupName"] == "gpu")
        assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
        res = gpu["template"]["spec"]["containers"][0]["resources"]
        assert int(res["requests"]["nvidia.com/gpu"]) == int(res["limits"]["nvidia.com/gpu"]) >= 1


def test_gpu_nodes_fit_the_largest_engine_and_training():
    """A tensor-parallel engine and a training run each sit on one node's GPUs in this layout."""
    cfg = load_config(JOB_CONFIGS["gpu"])
    job = _one(k8s.render("gpu"), "RayJob")
    gpu = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    per_node = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    tp = max(e.tensor_parallel_size * e.pipeline_parallel_size for e in cfg.engines.values() if e.kind == "vllm")
    assert tp == 4 and per_node >= tp
    s = cfg.train.scaling
    assert per_node * gpu["maxReplicas"] >= s.num_workers * s.gpus_per_worker
    cpus = float(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cpus >= s.cpus_per_worker * min(s.num_workers, per_node // s.gpus_per_worker)


def test_cpu_demo_is_one_small_cpu_node_big_enough_for_the_default_run():
    job = _one(k8s.render("cpu-demo"), "RayJob")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu" and group["minReplicas"] == group["maxReplicas"] == group["replicas"] == 1
    assert not any("nvidia.com/gpu" in str(c["resources"]) for _, _, c in _containers(job))
    requested_gib = sum(float(c["resources"]["requests"]["memory"].removesuffix("Gi")) for _, _, c in _containers(job))
    assert requested_gib <= 14  # with the cpu requests (3), fits a 4-CPU, 16 GiB node
    cfg = load_config(JOB_CONFIGS["cpu-demo"], ["ray.address=auto"])
    logical = int(group["rayStartParams"]["num-cpus"])
    assert logical >= required_local_cpus(cfg)
    eval_engine = cfg.eval.engine or cfg.negatives.student.engine
    assert logical >= pool_resources(cfg, eval_engine)["CPU"] + caller_resources(cfg, eval_engine)["CPU"] + 2
    assert logical >= cfg.train.scaling.num_workers * cfg.train.scaling.cpus_per_worker


@pytest.mark.parametrize("target", ["cpu-demo", "gpu", "raycluster"])
def test_images_and_dockerfiles_agree_with_pyproject(target):
    assert {c["image"] for doc in _ray_docs(target) for _, _, c in _containers(doc)} == {IMAGE_TAG[target]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    gpu_df = (k8s.CLUSTER / "docker" / "Dockerfile.gpu").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v(\S+)$", gpu_df, re.M).group(1) == _pin(extras["gpu"], "vllm")
    assert '".[gpu]"' in gpu_df
    assert '".[cpu]"' in (k8s.CLUSTER / "docker" / "Dockerfile.cpu").read_text()


# ------------------------------------------------------------------ the job
@pytest.mark.parametrize("target", ["cpu-demo", "gpu"])
def test_rayjob_lifecycle(target):
    job = _one(k8s.render(target), "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0 and job["backoffLimit"] >= 1
    assert "clusterSelector" not in job  # it makes (and deletes) its own cluster


@pytest.mark.parametrize("target", list(k8s.TARGETS))
def test_secrets_come_only_from_secret_key_refs(target):
    docs = k8s.render(target)
    assert not [d for d in docs if d["kind"] == "Secret"]  # keys are created in the cluster, never kept here
    refs = set()
    for doc in _ray_docs(target):
        assert "runtimeEnvYAML" not in doc["spec"]  # `ray job list` would show it
        for group, _, c in _containers(doc):
            assert "envFrom" not in c
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert set(e) == {"name", "valueFrom"}, f"{group}: {e['name']} must come from a Secret"
                    refs.add((e["valueFrom"]["secretKeyRef"]["name"], e["name"]))
                else:
                    assert not SECRET_NAME.search(str(e)), e
    names = {n for n, _ in refs}
    assert names == {"crv-ray-secrets"} and ("crv-ray-secrets", "TEACHER_API_KEY") in refs


@pytest.mark.parametrize("target", list(JOB_CONFIGS))
def test_job_config_is_the_repo_file_mounted_where_the_entrypoint_reads_it(target):
    docs = k8s.render(target)
    job = _one(docs, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["crv-ray", "run", "/configs/run.yaml"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]  # the driver runs on the head
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/configs")
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    cm = _one(docs, "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"] == "crv-ray-run-config"
    assert cm["data"] == {"run.yaml": JOB_CONFIGS[target].read_text()}  # generated, never copied by hand


@pytest.mark.parametrize("target", list(JOB_CONFIGS))
def test_job_config_loads_with_crv_ray_validate(target, tmp_path, monkeypatch):
    """`crv-ray validate` on the ConfigMap's file with the entrypoint's own arguments and the pods' environment:
    the run joins the job's cluster and writes run_dir (and reads inputs) on the volume every Ray pod mounts."""
    docs = k8s.render(target)
    job = _one(docs, "RayJob")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(_one(docs, "ConfigMap")["data"]["run.yaml"])
    pod_env = {}
    for _, _, c in _containers(job):
        for e in c.get("env", []):  # a Secret's value is whatever the user stores; the name is what matters
            pod_env[e["name"]] = e.get("value", "from-secret")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRV_") and k not in pod_env}
    argv = shlex.split(job["spec"]["entrypoint"])
    out = subprocess.run([sys.executable, "-m", "crv_ray.cli", "validate", str(run_yaml), *argv[3:]],
                         capture_output=True, text=True, env={**env, **pod_env}, timeout=120)
    assert out.returncode == 0, out.stderr
    # validate prints values that came from the environment as their ${VAR} reference (redaction): the values
    # themselves come from loading the config here, in the pods' environment.
    for k in os.environ:
        if k.startswith("CRV_") and k not in pod_env:
            monkeypatch.delenv(k)
    for k, v in pod_env.items():
        monkeypatch.setenv(k, v)
    rest = argv[3:]
    overrides = [rest[i + 1] for i, a in enumerate(rest) if a == "--set"]
    resolved = load_config(run_yaml, overrides).model_dump(mode="json")
    assert resolved["ray"]["address"] == "auto"

    shared = {}  # mount path -> claim, for every Ray container
    for group, template, c in _containers(job):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        shared[group] = {m["mountPath"]: claims[m["name"]] for m in c["volumeMounts"] if m["name"] in claims}
    assert len({json.dumps(m, sort_keys=True) for m in shared.values()}) == 1, shared  # the same on every pod
    (mounts,) = {json.dumps(m) for m in shared.values()}

    def on_shared(path: str) -> bool:
        return any(Path(path).is_relative_to(p) for p in json.loads(mounts))

    assert on_shared(resolved["run_dir"]), resolved["run_dir"]
    paths = [e["model"] for e in resolved["engines"].values() if e["kind"] == "vllm"] + [resolved["student"]["model"]]
    if resolved["input"]["source"] == "file":
        paths.append(resolved["input"]["path"])
    for p in paths:
        assert p.startswith("builtin:") or on_shared(p), f"{p} is on no volume the Ray pods mount"
    if target == "cpu-demo":
        assert resolved["run_dir"] == "/mnt/shared/crv-runs/demo"
    else:
        assert resolved["run_dir"] == "/mnt/shared/crv-runs/qwen7b-stratos"
        assert "/mnt/models/Qwen2.5-32B-Instruct" in paths


def test_standalone_raycluster_is_the_jobs_cluster():
    """cluster/raycluster copies the base RayJob's cluster spec: one definition, two uses."""
    (cluster,) = _ray_docs("raycluster")
    assert cluster["kind"] == "RayCluster"
    assert cluster["spec"] == _one(k8s.render("base"), "RayJob")["spec"]["rayClusterSpec"]
    pvc = _one(k8s.render("raycluster"), "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]



def test_readme_kuberay_commands_name_what_the_manifests_define():
    """The README's copyable KubeRay block: its paths exist and its Secret and RayJob names are the manifests'."""
    readme = (k8s.ROOT / "README.md").read_text()
    section = readme.split("\n## On a cluster\n", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "kubectl" in b]
    for path in re.findall(r"\b(cluster/[\w./-]+)", block):
        assert (k8s.ROOT / path).exists(), path
    job = _one(k8s.render("cpu-demo"), "RayJob")
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for _, _, c in _containers(job) for e in c["env"]}
    (secret,) = refs
    assert f"create secret generic {secret} " in block
    name = job["metadata"]["name"]
    assert f"get rayjob {name} " in block and f"logs -f job/{name} " in block and f"delete rayjob {name} " in block
    assert "kubectl kustomize --load-restrictor LoadRestrictionsNone cluster/overlays/cpu-demo | kubectl apply -f -" \
        in block
