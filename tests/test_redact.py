"""Secrets from environment variables never reach what crv-ray prints or writes (crv_ray/redact.py)."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from crv_ray.cli import main
from crv_ray.config import ConfigError, load_config, load_config_dict, redacted_dump
from crv_ray.redact import (
    EnvRefs, RedactingFilter, find_env_refs, plain_http_key_warning, redact, redact_config, warn_plain_http_once,
)

SECRET = "sk-test-9f8e7d6c5b4a"
URL = "https://u:${TEST_KEY}@example.com/v1"
COT = "We add 2 and 3.\n\nThat gives 2 + 3 = 5.\n\nThe final answer is \\boxed{5}."


def raw_config(tmp_path: Path) -> dict:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"[label=medium] What is 2+3? ({i})", "answer": "5",
                                       "cot": COT}) + "\n" for i in range(3)))
    scripted = {"kind": "scripted", "function": "crv_ray.testing:tagged_replies"}
    return {
        "run_dir": str(tmp_path / "run"),
        "student": {"name": "Tiny", "size": "1M", "model": "builtin:tiny"},
        "input": {"source": "file", "path": str(inp)},
        "engines": {
            "agent": scripted, "student": scripted,
            # not used by any role: only printed and written
            "teacher": {"kind": "openai", "base_url": URL, "model": "gpt"},
            "spare": {"kind": "vllm", "model": "builtin:tiny", "engine_kwargs": {"api_key": "${TEST_KEY}",
                                                                               "hf_token": "literal-hf-value"}},
        },
        "negatives": {"student": {"k": 1}},
        "refine": {"shard_size": 3, "watchdog_s": 120},
    }


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("TEST_KEY", SECRET)


def test_find_env_refs_records_fields_and_values():
    refs = find_env_refs({"a": {"url": "https://u:${K}@h/v1", "n": "${PORT}", "d": "${UNSET:-x}"}, "l": ["${K}"]},
                         environ={"K": SECRET, "PORT": "8000"})
    assert refs.raw == {("a", "url"): "https://u:${K}@h/v1", ("a", "n"): "${PORT}", ("a", "d"): "${UNSET:-x}",
                        ("l", 0): "${K}"}
    assert refs.values == {SECRET: "${K}", "8000": "${PORT}"}  # an unset variable's default is no secret


def test_redact_config_rules():
    refs = EnvRefs(raw={("e", "url"): "https://u:${K}@h/v1"}, values={SECRET: "${K}", "8000": "${PORT}"})
    dumped = {"e": {"url": f"https://u:{SECRET}@h/v1", "api_key": "literal", "api_key_env": "OPENAI_API_KEY",
                    "max_tokens": 16, "other": f"https://me:pw@db.local/x", "derived": f"{SECRET}/sub",
                    "port": "8000"}}
    assert redact_config(dumped, refs) == {"e": {
        "url": "https://u:${K}@h/v1",  # as written: says which variable
        "api_key": "***", "api_key_env": "OPENAI_API_KEY", "max_tokens": 16,
        "other": "https://me:***@db.local/x",  # a literal URL password
        "derived": "${K}/sub",  # a string built from the value, outside the field that held it
        "port": "8000",  # too short to search for in free text: only the field holding it is redacted
    }}


def test_secret_named_env_vars_are_redacted_anywhere(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567890")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "falsefalse")  # a name with TOKEN in it, no secret
    assert redact({"msg": ["sent tok-1234567890 and falsefalse"]}) == {
        "msg": ["sent ${MY_SERVICE_TOKEN} and falsefalse"]}


def test_validate_prints_no_secret(tmp_path, secret_env, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path)))
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    printed = json.loads(out)
    assert printed["engines"]["teacher"]["base_url"] == URL
    assert printed["engines"]["spare"]["engine_kwargs"] == {"api_key": "${TEST_KEY}", "hf_token": "***"}
    # the loaded config itself still holds the value the engines need
    assert load_config(path).engines["teacher"].base_url == f"https://u:{SECRET}@example.com/v1"


def test_validation_error_does_not_echo_the_secret(tmp_path, secret_env):
    raw = raw_config(tmp_path)
    raw["engines"]["teacher"]["timeout_s"] = "${TEST_KEY}"  # not a number: pydantic echoes the input
    with pytest.raises(ConfigError) as e:
        load_config_dict(raw)
    assert "engines.teacher.openai.timeout_s" in str(e.value) and "${TEST_KEY}" in str(e.value)
    assert SECRET not in str(e.value)


def test_log_filter_redacts_messages(tmp_path, secret_env):
    load_config_dict(raw_config(tmp_path))  # registers the value for this process
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "calling %s", (f"https://u:{SECRET}@h",), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "calling https://u:${TEST_KEY}@h"


def test_plain_http_key_warning():
    assert "sent unencrypted over plain http to api.example.com" in plain_http_key_warning(
        "teacher", "http://api.example.com/v1", "OPENAI_API_KEY")
    assert "the password in base_url" in plain_http_key_warning("t", "http://u:p@10.0.0.5:8000/v1", None)
    for url in ("https://api.example.com/v1", "http://localhost:8000/v1", "http://127.0.0.1:8000/v1",
                "http://[::1]:8000/v1"):
        assert plain_http_key_warning("t", url, "OPENAI_API_KEY") is None, url
    assert plain_http_key_warning("t", "http://api.example.com/v1", None) is None  # no key is sent


def test_plain_http_warning_in_validate_and_once_per_engine(tmp_path, secret_env, capsys, caplog):
    raw = raw_config(tmp_path)
    raw["engines"]["teacher"] = {"kind": "openai", "base_url": "http://api.example.com/v1", "model": "gpt"}
    raw["engines"]["local"] = {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "gpt"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("# warning:")]
    assert len(warnings) == 1 and "engine 'teacher'" in warnings[0] and "OPENAI_API_KEY" in warnings[0]

    engine = load_config(path).engines["teacher"]
    with caplog.at_level(logging.WARNING, logger="crv_ray.redact"):
        for _ in range(3):  # each role's stage builds the engine again
            warn_plain_http_once("teacher", engine)
    assert [r.getMessage() for r in caplog.records].count(plain_http_key_warning(
        "teacher", engine.base_url, engine.api_key_env)) == 1


def test_scripted_refine_writes_no_secret(ray_local, tmp_path, secret_env):
    from crv_ray.refine.runner import run_refine

    from crv_ray.report import write_report

    cfg = load_config_dict(raw_config(tmp_path))
    res = run_refine(cfg)
    write_report(cfg.run_dir)  # the run report shows the manifest's config
    assert res.manifest["reconciliation"]["balanced"] and res.manifest["reconciliation"]["rows_in"] == 3
    run_dir = Path(cfg.run_dir)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 5 and run_dir / "report.html" in files
    leaking = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaking == []
    manifest = json.loads((run_dir / "refine" / "manifest.json").read_text())
    assert manifest["config"] == redacted_dump(cfg)
    assert manifest["config"]["engines"]["teacher"]["base_url"] == URL
