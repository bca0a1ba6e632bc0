"""Keeping secrets out of what crv-ray prints and writes.

Rule: a config value that came from an environment variable is shown as the `${VAR}` reference it was written
with (`https://u:${OPENAI_KEY}@host/v1`, `${HF_TOKEN}`), never as the value; the reference says which variable to
set and is no secret. A literal string under a secret-looking field name (`api_key: sk-...`) and the password
part of any URL (`https://u:pw@host`) are shown as `***`.

How: `load_config` records, before expanding `${VAR}`, which config fields held references (`EnvRefs.raw`, shown
as written) and which values the variables gave (`EnvRefs.values`). `redact(obj)` is the one function every
printer and writer uses; it replaces those values, and the values of env variables whose names look like keys
(`OPENAI_API_KEY`, `HF_TOKEN`, `AWS_SECRET_ACCESS_KEY`, `DB_PASSWORD`), wherever they appear in any string, so a
path, URL or message built from the config is covered too. Values under `MIN_SEARCHED_CHARS` are only redacted in
the config fields that held them: searched for in free text, "8000" or "true" would match unrelated text.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Config field names whose literal string values are secrets (api_key_env holds a variable's name: not a secret).
SECRET_FIELD_RE = re.compile(r"(key|token|secret|password)", re.IGNORECASE)
# Env variable names whose values are secrets. By name part, so TOKENIZERS_PARALLELISM is not one.
SECRET_ENV_RE = re.compile(r"(^|_)(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD)(_|$)", re.IGNORECASE)
MIN_SEARCHED_CHARS = 8
MASK = "***"
# scheme://user:password@ - the password group is replaced unless it is already a ${VAR} reference.
_URL_PASSWORD_RE = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)(?!\$\{)([^@\s/]+)(@)")
logger = logging.getLogger(__name__)
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})  # a key sent there stays on this machine

Location = tuple  # a place in the config: keys and list indices from the top


@dataclass
class EnvRefs:
    """What `${VAR}` expansion put into one loaded config."""

    raw: dict[Location, str] = field(default_factory=dict)  # field location -> its text as written, references in it
    values: dict[str, str] = field(default_factory=dict)  # a substituted value -> "${VAR}"


# Every config loaded in this process adds its references here, so logs and files written later without the config
# at hand (markers, summaries, log records) are redacted too.
_seen = EnvRefs()


def find_env_refs(raw: Any, environ: dict[str, str] | None = None) -> EnvRefs:
    """The references in an unexpanded config (plain YAML data), with the values `environ` gives them."""
    environ = os.environ if environ is None else environ
    refs = EnvRefs()

    def walk(obj: Any, path: Location) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, path + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, path + (i,))
        elif isinstance(obj, str):
            for m in ENV_REF_RE.finditer(obj):
                refs.raw[path] = obj
                if environ.get(m.group(1)):
                    refs.values[environ[m.group(1)]] = "${" + m.group(1) + "}"

    walk(raw, ())
    return refs


def remember(refs: EnvRefs) -> None:
    _seen.values.update(refs.values)


def _secret_values(refs: EnvRefs | None) -> list[tuple[str, str]]:
    found = {v: f"${{{k}}}" for k, v in os.environ.items() if SECRET_ENV_RE.search(k) and len(v) >= MIN_SEARCHED_CHARS}
    for r in (_seen, refs):
        if r is not None:
            found.update({v: ref for v, ref in r.values.items() if len(v) >= MIN_SEARCHED_CHARS})
    return sorted(found.items(), key=lambda kv: -len(kv[0]))  # longest first: a value inside another goes second


def _replace(text: str, secrets: list[tuple[str, str]]) -> str:
    for value, ref in secrets:
        if value in text:
            text = text.replace(value, ref)
    return _URL_PASSWORD_RE.sub(lambda m: m.group(1) + MASK + m.group(3), text)


def redact_text(text: str, refs: EnvRefs | None = None) -> str:
    return _replace(text, _secret_values(refs))


def redact(obj: Any, refs: EnvRefs | None = None) -> Any:
    """`obj` (a string, or JSON-like data) with secrets replaced in every string, keys included."""
    secrets = _secret_values(refs)

    def walk(o: Any) -> Any:
        if isinstance(o, (str, os.PathLike)):
            return _replace(str(o), secrets)
        if isinstance(o, dict):
            return {walk(k): walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj)


def redact_config(dumped: dict, refs: EnvRefs | None = None) -> dict:
    """A config dump (`model_dump(mode="json")`) for printing: fields that held references as written, literal
    strings under secret-looking names as `***`, then `redact` over all of it."""
    refs = refs or EnvRefs()

    def walk(obj: Any, path: Location) -> Any:
        if path in refs.raw:
            return refs.raw[path]
        if isinstance(obj, dict):
            return {k: walk(v, path + (k,)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, path + (i,)) for i, v in enumerate(obj)]
        key = next((p for p in reversed(path) if isinstance(p, str)), "")
        if isinstance(obj, str) and SECRET_FIELD_RE.search(key) and not key.endswith("_env"):
            return MASK
        return obj

    return redact(walk(dumped, ()), refs)


def plain_http_key_warning(name: str, base_url: str, api_key_env: str | None) -> str | None:
    """A warning when a key (api_key_env's, or a URL password) would go over plain http to a host not this one."""
    u = urlparse(base_url)
    if u.scheme != "http" or u.hostname in LOCAL_HOSTS or (api_key_env is None and u.password is None):
        return None
    what = f"the API key from {api_key_env}" if api_key_env else "the password in base_url"
    return (f"engine {name!r}: {what} would be sent unencrypted over plain http to {u.hostname}; "
            "use an https:// base_url (or api_key_env: null if the server needs no key)")


def plain_http_warnings(engines: dict) -> list[str]:
    """`plain_http_key_warning` for each openai engine of a run config's `engines`."""
    return [w for name, e in engines.items() if getattr(e, "kind", None) == "openai"
            and (w := plain_http_key_warning(name, e.base_url, e.api_key_env))]


_warned: set[tuple[str, str]] = set()


def warn_plain_http_once(name: str, engine: Any) -> None:
    """Log `plain_http_key_warning` once per engine and process (each role's stage builds the engine again)."""
    w = plain_http_key_warning(name, engine.base_url, engine.api_key_env)
    if w and (name, engine.base_url) not in _warned:
        _warned.add((name, engine.base_url))
        logger.warning("%s", w)


class RedactingFilter(logging.Filter):
    """Redacts a record's message (arguments merged in) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the handler's to report
            return True
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    """Add `RedactingFilter` to the root logger's handlers (where `logging.basicConfig` put them)."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())
