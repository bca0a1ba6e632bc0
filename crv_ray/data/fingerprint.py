"""The input's fingerprint, stored at ingest: an input file edited after its rows were ingested must not be mixed
with the shards made from its old rows.

Files (local or on object storage, crv_ray.storage): name, size, mtime and sha256. On a rerun a file whose name, size and mtime are unchanged keeps its
stored sha256 without being read again, so checking costs a `stat` per file; only a file that looks changed is
hashed (and one whose mtime moved but whose bytes did not counts as unchanged). Synthetic problems: the generator's
settings. A hub dataset: its name and split (its content cannot be checked without downloading it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from crv_ray import storage
from crv_ray.config import InputConfig
from crv_ray.data.input import input_files

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _name(f: Path, root: Path) -> str:
    return f.name if root.is_file() else str(f.relative_to(root))


def input_fingerprint(cfg: InputConfig, previous: dict | None = None) -> dict:
    """What identifies the input's content. `previous` (a stored fingerprint) lets unchanged-looking files skip
    hashing."""
    if cfg.source == "synthetic":
        return {"source": "synthetic", "settings": cfg.synthetic.model_dump(mode="json")}
    files = input_files(cfg)
    if files is None:
        return {"source": cfg.source, "name": cfg.path, "split": cfg.split}
    known = {f["name"]: f for f in (previous or {}).get("files", [])}
    root = storage.as_path(cfg.path)  # type: ignore[arg-type]
    out = []
    for f in files:
        st = f.stat()
        entry = {"name": _name(f, root), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        old = known.get(entry["name"])
        if old is not None and old.get("size") == entry["size"] and old.get("mtime_ns") == entry["mtime_ns"]:
            entry["sha256"] = old["sha256"]
        else:
            entry["sha256"] = sha256_file(f)
        out.append(entry)
    return {"source": cfg.source, "path": str(cfg.path), "files": out}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, one line per file or setting; [] when the content is the same (mtimes
    alone do not count)."""
    if old.get("source") != new.get("source"):
        return [f"the input source changed ({old.get('source')} -> {new.get('source')})"]
    if "files" not in old or "files" not in new:
        keys = sorted(set(old) | set(new))
        return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    before = {f["name"]: f for f in old["files"]}
    after = {f["name"]: f for f in new["files"]}
    changes = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None:
            changes.append(f"{name}: a new file")
        elif b is None:
            changes.append(f"{name}: removed")
        elif a["sha256"] != b["sha256"]:
            changes.append(f"{name}: content changed (size {a['size']} -> {b['size']} bytes, sha256 "
                           f"{a['sha256'][:12]} -> {b['sha256'][:12]})")
    return changes
