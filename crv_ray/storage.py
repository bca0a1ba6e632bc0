"""Run directories and input/output paths on local disk or object storage (`s3://`, `gs://`, `abfs://`, ...), in one
place: everything else takes a path from `as_path` and uses the pathlib methods both kinds share.

- A local path (or `file://...`) stays a `pathlib.Path`: local behaviour is exactly what it was.
- A URI becomes a `RemotePath`, a small pathlib-like object over `pyarrow.fs` (the file system pyarrow, Ray Data and
  Ray Train use). A scheme pyarrow does not know goes through fsspec (`pyarrow.fs.FSSpecHandler`).

Credentials and endpoints come from the standard environment of each store; for S3 (and S3-compatible servers such
as MinIO or moto) pyarrow, Ray Data and Ray Train read `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` (and AWS profiles / instance roles). Every Ray node must see the same
variables (a local cluster inherits the driver's environment).

Object stores have no rename, but one PUT is atomic: a writer that needs an all-or-nothing commit writes the data
objects first and its marker last (crv_ray.refine.store), never a temporary name that is renamed.
"""

from __future__ import annotations

import fcntl
import fnmatch
import functools
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Union

import pyarrow.fs as pafs
from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

S3_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
_ENV_HINT = {
    "s3": "set " + ", ".join(S3_ENV_VARS) + " (AWS_ENDPOINT_URL for an S3-compatible server such as MinIO)",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS (or log in with gcloud)",
    "abfs": "set AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET (Azure's default credentials; or use a "
            "managed identity or `az login`)",
}


class StorageError(OSError):
    """Object storage could not be reached or used; the message names the URI and the settings to check."""


def is_uri(path: object) -> bool:
    """True for an object-storage URI (`scheme://...` other than file://)."""
    if isinstance(path, RemotePath):
        return True
    s = str(path)
    return "://" in s and not s.startswith("file://")


def _hint(scheme: str) -> str:
    return _ENV_HINT.get(scheme, "check the credentials and endpoint of that store")


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, bucket: str) -> tuple[pafs.FileSystem, str]:
    """(file system, the bucket's path in it), one per bucket; pyarrow reads the endpoint and credentials from the
    environment."""
    try:
        fs, root = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
        return fs, root.rstrip("/")
    except ValueError as e:  # pyarrow.ArrowInvalid: a scheme pyarrow has no file system for
        if "Unrecognized filesystem" not in str(e):
            raise
    import fsspec  # installed with `datasets`; its own package (e.g. adlfs, hdfs) must be installed for the scheme

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme))), bucket


@dataclass(frozen=True, order=True)
class RemotePath:
    """`scheme://bucket/key` with the pathlib methods this project uses, over pyarrow.fs. Picklable (Ray tasks get
    the URI; the file system is made again from the worker's environment)."""

    scheme: str
    key: str  # "bucket/a/b", no leading or trailing slash

    @classmethod
    def parse(cls, uri: str) -> RemotePath:
        scheme, _, rest = str(uri).partition("://")
        key = str(PurePosixPath("/" + rest.strip("/")))[1:]
        if not key:
            raise ValueError(f"{uri}: a storage URI needs a bucket (scheme://bucket/path)")
        return cls(scheme.lower(), key)

    # -- pure path operations
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __truediv__(self, other: str | PurePosixPath) -> RemotePath:
        return RemotePath(self.scheme, str(PurePosixPath(self.key) / str(other)).strip("/"))

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> RemotePath:
        parent = str(PurePosixPath(self.key).parent)
        return self if parent in ("", ".") else RemotePath(self.scheme, parent)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def resolve(self) -> RemotePath:
        return self

    absolute = resolve

    # -- file system
    @property
    def fs(self) -> pafs.FileSystem:
        return _call(self, lambda: _filesystem(self.scheme, self.bucket))[0]

    @property
    def _root(self) -> str:
        """The bucket's path inside its file system ("bucket" on S3 and GCS; "container" for
        abfs://container@account.dfs.core.windows.net)."""
        return _call(self, lambda: _filesystem(self.scheme, self.bucket))[1]

    @property
    def fs_path(self) -> str:
        """This path inside `fs` (what pyarrow calls take)."""
        return self._root + self.key[len(self.bucket):]

    def _from_fs(self, fs_path: str) -> RemotePath:
        return RemotePath(self.scheme, self.bucket + fs_path[len(self._root):])

    def _info(self) -> pafs.FileInfo:
        return _call(self, lambda: self.fs.get_file_info(self.fs_path))

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> os.stat_result:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        ns = info.mtime_ns or 0
        s = ns // 10**9
        # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime), then the float times and the _ns times.
        return os.stat_result((0, 0, 0, 1, 0, 0, info.size or 0, s, s, s, ns / 1e9, ns / 1e9, ns / 1e9, ns, ns, ns))

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.fs_path) as f:
                return f.read()

        return _call(self, read)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        def write() -> int:
            with self.fs.open_output_stream(self.fs_path) as f:  # one PUT: the object appears whole or not at all
                f.write(data)
            return len(data)

        return _call(self, write)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "r", encoding: str | None = "utf-8"):
        """Reading: a buffered, seekable file (lines iterate); writing ("w"/"wb"): the object is stored when the file
        is closed."""
        if mode in ("r", "rt"):
            return io.TextIOWrapper(self.open("rb"), encoding=encoding)
        if mode == "rb":
            return io.BufferedReader(_call(self, lambda: self.fs.open_input_file(self.fs_path)))
        if mode == "wb":
            return _call(self, lambda: self.fs.open_output_stream(self.fs_path))
        if mode in ("w", "wt"):
            return io.TextIOWrapper(_call(self, lambda: self.fs.open_output_stream(self.fs_path)), encoding=encoding)
        raise ValueError(f"{self}: mode {mode!r} is not supported on object storage (no appends)")

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a key's prefix exists once an object under it does."""

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        _call(self, lambda: self.fs.delete_file(self.fs_path))

    def replace(self, target: RemotePath) -> RemotePath:
        _call(self, lambda: self.fs.move(self.fs_path, target.fs_path))  # copy + delete on S3: not atomic
        return target

    def _children(self, recursive: bool) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive)
        return _call(self, lambda: self.fs.get_file_info(sel))

    def iterdir(self):
        return iter(sorted(self._from_fs(i.path) for i in self._children(False)))

    def glob(self, pattern: str):
        """`*`-patterns of one level, or `**/pattern` / `*/*/name` across levels (what the project uses)."""
        depth = pattern.count("/") + 1
        recursive = pattern.startswith("**/") or depth > 1
        if pattern.startswith("**/"):
            return self.rglob(pattern[3:])
        out = []
        for i in self._children(recursive):
            rel = PurePosixPath(i.path).relative_to(self.fs_path)
            if len(rel.parts) == depth and fnmatch.fnmatchcase(str(rel), pattern):
                out.append(self._from_fs(i.path))
        return iter(sorted(out))

    def rglob(self, pattern: str):
        return iter(sorted(self._from_fs(i.path) for i in self._children(True)
                           if fnmatch.fnmatchcase(PurePosixPath(i.path).name, pattern)))


AnyPath = Union[Path, RemotePath]


def as_path(path: str | os.PathLike | RemotePath) -> AnyPath:
    """A `Path` for a local path or file:// URI, a `RemotePath` for any other URI."""
    if isinstance(path, (Path, RemotePath)):
        return path
    s = str(path)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return RemotePath.parse(s) if "://" in s else Path(s)


def absolute(path: str | os.PathLike | RemotePath) -> AnyPath:
    """`as_path`, with a local path made absolute (what gets hashed and handed to Ray workers)."""
    p = as_path(path)
    return p.resolve() if isinstance(p, Path) else p


def resolve(path: str | os.PathLike | RemotePath) -> tuple[pafs.FileSystem, str]:
    """(pyarrow file system, path inside it): what pyarrow, Ray Data (`filesystem=`) and Ray Train
    (`storage_filesystem=`) take."""
    p = absolute(path)
    if isinstance(p, RemotePath):
        return p.fs, p.fs_path
    return pafs.LocalFileSystem(), str(p)


def _call(path: RemotePath, fn):
    """Run one storage call; a failure names the URI and the settings to check."""
    try:
        return fn()
    except FileNotFoundError:
        raise
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        msg = str(e)
        if "NO_SUCH_BUCKET" in msg or ("does not exist" in msg.lower() and "bucket" in msg.lower()):
            why = f"the bucket {path.bucket!r} does not exist (create it first)"
        elif "NETWORK_CONNECTION" in msg or "Could not connect" in msg or "curlCode" in msg:
            why = "the storage endpoint cannot be reached"
        elif "ACCESS_DENIED" in msg or "403" in msg or "credentials" in msg.lower():
            why = "access was denied (missing or wrong credentials)"
        else:
            why = "the storage call failed"
        raise StorageError(f"{path}: {why}; {_hint(path.scheme)}. ({type(e).__name__}: {msg})") from e


def settings_note(path: str | os.PathLike | RemotePath) -> str | None:
    """For a URI: where its store's endpoint and credentials come from, and which of those variables are set (names
    only, never values); None for a local path. No request is made."""
    p = as_path(path)
    if not isinstance(p, RemotePath):
        return None
    if p.scheme != "s3":
        return f"{p}: {_hint(p.scheme)}"
    unset = [k for k in S3_ENV_VARS if not os.environ.get(k)]
    return (f"{p}: pyarrow, Ray Data and Ray Train read {', '.join(S3_ENV_VARS)}; "
            + (f"unset here: {', '.join(unset)} (AWS profiles or an instance role may stand in)" if unset
               else "all set here") + "; every Ray node needs them")


def check_access(path: str | os.PathLike | RemotePath) -> None:
    """Fail early, naming the URI and the environment to set, when a run directory's bucket cannot be used."""
    p = as_path(path)
    if not isinstance(p, RemotePath):
        return
    info = _call(p, lambda: p.fs.get_file_info(p._root))
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{p}: the bucket {p.bucket!r} does not exist or is not visible with these credentials; "
                           f"create it, or {_hint(p.scheme)}")


# -- whole files and folders
def rmtree(path: str | os.PathLike | RemotePath) -> None:
    """Remove a folder and everything under it; nothing happens when it is missing."""
    p = as_path(path)
    if isinstance(p, Path):
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        _call(p, lambda: p.fs.delete_dir(p.fs_path))


def copy_file(src: str | os.PathLike | RemotePath, dst: str | os.PathLike | RemotePath) -> None:
    s, d = as_path(src), as_path(dst)
    if isinstance(s, Path) and isinstance(d, Path):
        shutil.copyfile(s, d)
    else:
        d.write_bytes(s.read_bytes())


def upload_file(local_file: str | os.PathLike, dest: str | os.PathLike | RemotePath) -> None:
    """Copy one local file to `dest` (one PUT on object storage, streamed from disk)."""
    d = as_path(dest)
    if isinstance(d, Path):
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_file, d)
        return
    _call(d, lambda: pafs.copy_files(str(Path(local_file).resolve()), d.fs_path,
                                     source_filesystem=pafs.LocalFileSystem(), destination_filesystem=d.fs))


def upload_dir(local_dir: str | os.PathLike, dest: str | os.PathLike | RemotePath, replace: bool = True) -> None:
    """Copy a local folder's files to `dest` (local or remote), replacing what was there (`replace`) or adding to
    it."""
    d = as_path(dest)
    if replace:
        rmtree(d)
    if isinstance(d, Path):
        shutil.copytree(local_dir, d, dirs_exist_ok=True)
        return
    _call(d, lambda: pafs.copy_files(str(Path(local_dir).resolve()), d.fs_path,
                                     source_filesystem=pafs.LocalFileSystem(), destination_filesystem=d.fs))


def cache_root() -> Path:
    from crv_ray.models.builtin import default_cache_dir

    return default_cache_dir() / "storage"


def local_copy(path: str | os.PathLike | RemotePath, cache: Path | None = None) -> Path:
    """A local path with the content of `path` (a file or a folder): the path itself when it is local, else a copy
    downloaded into the cache (`<CRV_RAY_CACHE>/storage/<scheme>/<key>`) for readers that need local files (a model
    for transformers / vLLM, a tokenized file to memory-map). The copy is reused while the objects' names, sizes
    and modification times are unchanged."""
    p = as_path(path)
    if isinstance(p, Path):
        return p
    dest = (cache or cache_root()) / p.scheme / p.key
    info = p._info()
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{p} does not exist")
    infos = [info] if info.type == pafs.FileType.File else [i for i in p._children(True)
                                                            if i.type == pafs.FileType.File]
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos)
    stamp = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    stamp_file = dest.parent / f".{dest.name}.crv_ray_copy"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Several workers of one node may ask at once: one downloads, the others wait and reuse its copy.
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp_file.is_file() and stamp_file.read_text() == stamp and dest.exists()):
            _download(p, info, dest, stamp_file, stamp)
    return dest


def _download(p: RemotePath, info: pafs.FileInfo, dest: Path, stamp_file: Path, stamp: str) -> None:
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if info.type != pafs.FileType.File:
        tmp.mkdir()  # a folder's objects are copied into it
    _call(p, lambda: pafs.copy_files(p.fs_path, str(tmp), source_filesystem=p.fs,
                                      destination_filesystem=pafs.LocalFileSystem()))
    if dest.is_dir():
        shutil.rmtree(dest)
    elif dest.exists():
        dest.unlink()
    os.replace(tmp, dest)
    stamp_file.write_text(stamp)


# -- Parquet
def read_table(path: str | os.PathLike | RemotePath, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    fs, key = resolve(path)
    return _wrap(path, lambda: pq.read_table(key, columns=columns, filesystem=fs))


def read_schema(path: str | os.PathLike | RemotePath):
    import pyarrow.parquet as pq

    fs, key = resolve(path)
    return _wrap(path, lambda: pq.read_schema(key, filesystem=fs))


def parquet_file(path: str | os.PathLike | RemotePath):
    import pyarrow.parquet as pq

    p = as_path(path)
    return pq.ParquetFile(p if isinstance(p, Path) else _call(p, lambda: p.fs.open_input_file(p.fs_path)))


def write_table(table, path: str | os.PathLike | RemotePath) -> None:
    """Write one Parquet file (one PUT on object storage; not atomic on local disk: see refine.store)."""
    import pyarrow.parquet as pq

    fs, key = resolve(path)
    _wrap(path, lambda: pq.write_table(table, key, filesystem=fs))


def _wrap(path, fn):
    p = as_path(path)
    return _call(p, fn) if isinstance(p, RemotePath) else fn()


def ray_paths(paths: list) -> dict:
    """Keyword arguments for `ray.data.read_parquet` / `write_parquet`: paths inside one file system and that
    file system (all paths must be on the same store)."""
    resolved = [resolve(p) for p in paths]
    if not resolved:
        return {"paths": [], "filesystem": None}
    fs = resolved[0][0]
    return {"paths": [k for _, k in resolved], "filesystem": fs}


def _validate_location(value: object) -> AnyPath:
    if not isinstance(value, (str, os.PathLike, RemotePath)):
        raise ValueError(f"expected a path or a URI (s3://bucket/path), got {type(value).__name__}")
    return as_path(value)  # type: ignore[arg-type]


# A config field holding a local path or a URI: a `Path` or a `RemotePath` in Python, its string in JSON/YAML.
Location = Annotated[Any, BeforeValidator(_validate_location), PlainSerializer(str, return_type=str, when_used="json"),
                     WithJsonSchema({"type": "string", "description": "a local path or a URI (s3://, gs://, abfs://)"})]
