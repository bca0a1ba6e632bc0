"""Chat completions against any OpenAI-compatible endpoint (a hosted teacher, or `vllm serve`) as a Ray Data stage.

Ray's own `ray.data.llm` HTTP stage is not used: after its retries it raises and fails the whole dataset, it has no
way to skip rows, and it awaits its requests one after another. This stage records a failure in the row's error
column instead, skips rows flagged by a column, and keeps a whole batch of requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple
from urllib.parse import urlparse

import aiohttp
import pyarrow as pa
import ray.data
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from crv_ray.redact import LOCAL_HOSTS, redact_text

if TYPE_CHECKING:
    from crv_ray import config as run_config

logger = logging.getLogger(__name__)

# 408/409/429 and 5xx are transient on OpenAI-style servers (rate limits, overload, restarts): retry them.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_MAX_ERROR_CHARS = 300


class OpenAIEngineConfig(BaseModel):
    """Where and how fast to send chat-completion requests. Holds the *name* of the key's env var, never the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="Endpoint root including /v1, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="Served model name sent in each request.")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY",
        description="Env var holding the API key, read inside each worker; optional for a local server. None: no key.",
    )
    concurrency: int = Field(default=1, ge=1, description="Number of request actors.")
    batch_size: int = Field(default=16, ge=1, description="Rows per batch; one actor keeps a whole batch in flight.")
    qps: float | None = Field(default=None, gt=0, description="Request rate limit over all actors; None = unlimited.")
    max_retries: int = Field(default=3, ge=0, description="Retries on 408/409/429/5xx, timeouts and connection errors.")
    base_retry_wait_s: float = Field(default=1.0, ge=0, description="First backoff wait; doubles per retry, with jitter.")
    timeout_s: float = Field(default=300.0, gt=0, description="Total time allowed for one HTTP request.")

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if urlparse(value).scheme not in ("http", "https") or not urlparse(value).hostname:
            raise ValueError(f"base_url {value!r} must be an http(s) URL like http://127.0.0.1:8000/v1")
        return value.rstrip("/")

    @property
    def is_local(self) -> bool:
        return urlparse(self.base_url).hostname in LOCAL_HOSTS

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"


def read_api_key(cfg: OpenAIEngineConfig) -> SecretStr | None:
    """The key from `cfg.api_key_env`; None for a local server without one. A remote server needs it."""
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if key:
        return SecretStr(key)
    if cfg.is_local or cfg.api_key_env is None:
        return None
    raise ValueError(f"env var {cfg.api_key_env} (api_key_env) is not set; {redact_text(cfg.base_url)} needs an "
                     "API key")


class _Result(NamedTuple):
    text: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


class _RateLimiter:
    """Spaces request starts 1/qps apart (a token bucket of depth one): smooth, so no burst trips a 429."""

    def __init__(self, qps: float | None) -> None:
        self.interval = 1.0 / qps if qps else 0.0
        self.next_start = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self.next_start)
        self.next_start = start + self.interval
        await asyncio.sleep(start - now)


class OpenAIChatUDF:
    """The `map_batches` callable behind `build_openai_stage`: a pyarrow batch in, the same batch plus reply columns
    out. `messages_col` holds a list of {role, content}, `sampling_col` a dict of params; either may be JSON text."""

    def __init__(
        self,
        cfg: dict[str, Any],
        messages_col: str = "messages",
        sampling_col: str = "sampling",
        out_text_col: str = "reply",
        out_tokens_col: str = "reply_tokens",
        out_error_col: str = "reply_error",
        skip_col: str | None = "skip",
        out_prompt_tokens_col: str | None = None,
        num_actors: int = 1,
    ) -> None:
        self.cfg = OpenAIEngineConfig(**cfg)
        # Read here, inside the worker, so the key never rides in a pickled closure or a logged argument.
        self._api_key = read_api_key(self.cfg)
        self.messages_col, self.sampling_col, self.skip_col = messages_col, sampling_col, skip_col
        self.out_cols = {"text": out_text_col, "completion_tokens": out_tokens_col, "error": out_error_col}
        if out_prompt_tokens_col:
            self.out_cols["prompt_tokens"] = out_prompt_tokens_col
        self._limiter = _RateLimiter(self.cfg.qps / num_actors if self.cfg.qps else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = batch.column_names
        if self.messages_col not in names:
            raise ValueError(f"messages column {self.messages_col!r} not in dataset columns {names}")
        n = batch.num_rows
        messages = batch.column(self.messages_col).to_pylist()
        sampling = batch.column(self.sampling_col).to_pylist() if self.sampling_col in names else [None] * n
        skip = batch.column(self.skip_col).to_pylist() if self.skip_col and self.skip_col in names else [False] * n
        payloads = [None if skip[i] else self._payload(messages[i], sampling[i]) for i in range(n)]
        results: list[_Result] = asyncio.run(self._send_all(payloads)) if n else []
        failed = [r.error for r in results if r.error]
        if failed:
            logger.warning("%d of %d requests to %s failed; first error: %s", len(failed), n,
                           redact_text(self.cfg.base_url), failed[0])

        for field, name in self.out_cols.items():
            values = [getattr(r, field) for r in results]
            column = pa.array(values, pa.string() if field in ("text", "error") else pa.int64())
            # Replace rather than duplicate a column left by an earlier run of the stage.
            if name in batch.column_names:
                batch = batch.drop_columns([name])
            batch = batch.append_column(name, column)
        return batch

    def _payload(self, messages: list[dict[str, Any]] | str, sampling: dict[str, Any] | str | None) -> dict[str, Any]:
        if isinstance(messages, str):
            messages = json.loads(messages)
        if isinstance(sampling, str):
            sampling = json.loads(sampling)
        # Arrow fills keys that only some rows have with None: drop them so the server sees only what was set.
        clean_messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        params = {k: v for k, v in (sampling or {}).items() if v is not None}
        return {"model": self.cfg.model, "messages": clean_messages, **params}

    async def _send_all(self, payloads: list[dict[str, Any] | None]) -> list[_Result]:
        headers = {"Authorization": f"Bearer {self._api_key.get_secret_value()}"} if self._api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            return await asyncio.gather(*(self._send(session, p) for p in payloads))

    async def _send(self, session: aiohttp.ClientSession, payload: dict[str, Any] | None) -> _Result:
        """Never raises, so one bad row cannot fail the dataset."""
        if payload is None:
            return _Result()
        last_error, retry_after = "", 0.0
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                backoff = self.cfg.base_retry_wait_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                await asyncio.sleep(max(backoff, retry_after))
            await self._limiter.wait()
            try:
                async with session.post(self.cfg.chat_url, json=payload) as resp:
                    if resp.status in RETRYABLE_STATUS:
                        last_error = f"HTTP {resp.status}: {(await resp.text())[:_MAX_ERROR_CHARS]}"
                        retry_after = _retry_after_s(resp.headers.get("Retry-After"))
                        continue
                    if resp.status >= 400:
                        return _Result(error=f"HTTP {resp.status}: {(await resp.text())[:_MAX_ERROR_CHARS]}")
                    body = await resp.json(content_type=None)
            except (asyncio.TimeoutError, aiohttp.ClientError, ValueError) as exc:
                # ValueError: a body that is not JSON; likely a proxy's error page, so worth another try.
                last_error, retry_after = redact_text(f"{type(exc).__name__}: {exc}")[:_MAX_ERROR_CHARS], 0.0
                continue
            return _parse_completion(body)
        return _Result(error=f"gave up after {self.cfg.max_retries + 1} attempts; last error: {last_error}")


def _retry_after_s(header: str | None) -> float:
    try:
        return min(float(header), 60.0) if header else 0.0
    except ValueError:  # an HTTP-date: fall back to our own backoff
        return 0.0


def _parse_completion(body: Any) -> _Result:
    try:
        text = body["choices"][0]["message"]["content"]
        usage = body.get("usage") or {}
        completion_tokens, prompt_tokens = int(usage.get("completion_tokens") or 0), int(usage.get("prompt_tokens") or 0)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        return _Result(error=f"unexpected response ({type(exc).__name__}): {str(body)[:_MAX_ERROR_CHARS]}")
    if text is None:
        return _Result(None, completion_tokens, prompt_tokens, "response has no message content")
    return _Result(text, completion_tokens, prompt_tokens, None)


def build_openai_stage(
    cfg: OpenAIEngineConfig,
    messages_col: str = "messages",
    sampling_col: str = "sampling",
    out_text_col: str = "reply",
    out_tokens_col: str = "reply_tokens",
    skip_col: str | None = "skip",
    out_error_col: str | None = None,
    out_prompt_tokens_col: str | None = None,
) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """A Dataset -> Dataset function adding `out_text_col` (str|None), `out_tokens_col` (completion tokens; 0
    without a reply), `out_error_col` (default `<out_text_col>_error`; str|None) and, if named,
    `out_prompt_tokens_col` to every row. All input columns pass through unchanged.

    Rows need `messages_col` (list of {role, content}, or its JSON text) and optionally `sampling_col` (dict of
    request params: temperature, max_tokens, top_p, seed, server extras such as vLLM's structured_outputs). Rows
    whose `skip_col` is true get no request. A request still failing after retries leaves reply None and the
    error text in its row; the dataset goes on.
    """
    read_api_key(cfg)  # fail at build time, on the driver, if a remote endpoint has no key
    ctor_kwargs = dict(
        cfg=cfg.model_dump(),
        messages_col=messages_col,
        sampling_col=sampling_col,
        out_text_col=out_text_col,
        out_tokens_col=out_tokens_col,
        out_error_col=out_error_col or f"{out_text_col}_error",
        skip_col=skip_col,
        out_prompt_tokens_col=out_prompt_tokens_col,
        num_actors=cfg.concurrency,
    )

    def stage(ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(
            OpenAIChatUDF,
            fn_constructor_kwargs=ctor_kwargs,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_cpus=0.25,  # the actors mostly wait on the network
            udf_modifying_row_count=False,
        )

    return stage


# ---------------------------------------------------------------- adapter for the refine glue
_SAMPLING_COL = "__openai_sampling"


def build_openai_transform(
    engine: "run_config.OpenAIEngineConfig",
    sampling: "run_config.Sampling",
    structured: dict | None,
    keep: list[str],
) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """The engine transform `crv_ray.engines.build_engine_transform` expects: rows with the `engines.columns`
    inputs in, the `keep` columns plus `columns.REPLY_COLUMNS` out."""
    from crv_ray.engines import columns as c

    cfg = OpenAIEngineConfig(
        base_url=engine.base_url,
        model=engine.model,
        api_key_env=engine.api_key_env,
        concurrency=engine.concurrency,
        batch_size=engine.batch_size,
        qps=engine.qps * engine.concurrency if engine.qps else None,  # the run config's qps is per actor
        max_retries=engine.max_retries,
        base_retry_wait_s=engine.base_retry_wait_s,
        timeout_s=engine.timeout_s,
    )
    base: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
    if sampling.seed is not None:
        base["seed"] = sampling.seed
    if structured and engine.structured_output:
        base["structured_outputs"] = dict(structured)
    stage = build_openai_stage(
        cfg,
        messages_col=c.MESSAGES,
        sampling_col=_SAMPLING_COL,
        out_text_col=c.OUT_REPLY,
        out_tokens_col=c.OUT_TOKENS,
        skip_col=c.SKIP,
        out_error_col=c.OUT_ERROR,
        out_prompt_tokens_col=c.OUT_PROMPT_TOKENS,
    )

    def add_sampling(batch: pa.Table) -> pa.Table:
        # JSON text keeps the column one arrow type whatever keys a row's params hold.
        seeds = batch.column(c.SEED).to_pylist() if c.SEED in batch.column_names else [None] * batch.num_rows
        values = [json.dumps(base if seed is None else {**base, "seed": int(seed)}) for seed in seeds]
        return batch.append_column(_SAMPLING_COL, pa.array(values, pa.string()))

    out_cols = list(dict.fromkeys([*keep, *c.REPLY_COLUMNS]))
    return lambda ds: stage(ds.map_batches(add_sampling, batch_format="pyarrow")).select_columns(out_cols)
