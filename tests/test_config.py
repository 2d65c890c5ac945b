"""config.yaml: expansion, defaults, and every error reported with its path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from aiproxy.config import ConfigError, load_config, parse_config
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent


def errors_of(raw, env=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env=env or {})
    return info.value.errors


def test_env_expansion_with_defaults_and_escapes():
    cfg = parse_config({
        "server": {"master_key": "${KEY}", "port": "${PORT:-9001}", "host": "${HOST:-127.0.0.1}"},
        "providers": {"p": {"plugin": "openai", "api_key": "${EMPTY:-fallback}",
                            "api_base": "http://${H}:${P:-1}/v1", "headers": {"x": "$${literal}"}}},
    }, env={"KEY": "mk-1", "H": "h.test", "EMPTY": ""})
    assert cfg.server.master_key == "mk-1"
    assert cfg.server.port == 9001  # a number once expanded, validated as one
    assert cfg.providers["p"].api_key == "fallback"  # ':-' also covers set-but-empty
    assert cfg.providers["p"].api_base == "http://h.test:1/v1"
    assert cfg.providers["p"].headers == {"x": "${literal}"}


def test_unset_variable_without_default_names_its_path():
    errors = errors_of({"providers": {"openai": {"api_key": "${NOPE}"}}})
    assert errors == ["providers.openai.api_key: environment variable NOPE is not set "
                      "(write ${NOPE:-default} to give a default)"]


def test_every_error_is_reported_with_its_path_at_once():
    errors = errors_of({
        "server": {"port": "eighty", "workers": 0, "colour": "blue"},
        "providers": {"openai": {"plugin": "openai", "timeout": {"read": -1},
                                 "api_base": "localhost:11434"}},
        "models": [
            {"name": "a", "provider": "openai"},
            {"name": "b", "provider": "openai"},
            {"name": "c", "provider": "opnai"},
            {"provider": "openai"},
            "not-a-mapping",
        ],
    })
    assert "models[2].provider: no provider named 'opnai' (providers: openai)" in errors
    assert "models[3].name: is required" in errors
    assert "models[4]: expected a mapping, got a string" in errors
    assert "server.port: expected a number, got 'eighty'" in errors
    assert "server.workers: must be at least 1, got 0" in errors
    assert any(e.startswith("server.colour: unknown setting") for e in errors)
    assert "providers.openai.timeout.read: must be at least 0.001, got -1.0" in errors
    assert "providers.openai.api_base: expected an http:// or https:// URL, got 'localhost:11434'" in errors
    assert len(errors) == 8


def test_defaults_and_timeouts_cascade():
    cfg = parse_config({
        "providers": {"p": {"plugin": "mock", "timeout": {"connect": 2, "read": 30}}},
        "models": [{"name": "m", "provider": "p", "timeout": 5}],
    }, env={})
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000
    assert cfg.server.master_key is None
    model = cfg.models[0]
    merged = model.timeout.over(cfg.providers["p"].timeout)
    assert (merged.connect, merged.read) == (2.0, 5.0)  # model's read wins, provider's connect stays


def test_stage_sections_are_kept_for_their_plugins():
    cfg = parse_config({"request_tag": {"header": "x-team"}, "limits": {"tiers": {}}}, env={})
    assert cfg.section("request_tag") == {"header": "x-team"}
    assert cfg.section("absent") == {}


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors[0].startswith("line 3, column 1: invalid YAML")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "cannot read" in info.value.errors[0]


def test_shipped_config_loads_with_no_environment():
    cfg = load_config(ROOT / "config.yaml", env={})
    assert cfg.server.master_key is None
    assert cfg.providers["openai"].api_key is None  # unset key: left out, not a crash
    assert cfg.section("limits")["tiers"]["free"]["requests"] == "10"
    assert cfg.section("cache")["ttl_seconds"] == "3600"


def test_shipped_config_reads_the_seed_environment_names():
    env = {"OPENAI_API_KEY": "sk-o", "OLLAMA_BASE_URL": "http://127.0.0.1:11434",
           "AI_RATE_LIMIT_FREE": "25", "AI_RATE_LIMIT_WINDOW": "60", "AI_CACHE_TTL": "5",
           "AI_CACHE_MAX_SIZE": "7", "AI_COST_ALERT_THRESHOLD": "12.5", "AI_COST_ALERT_EMAIL": "ops@x.test"}
    cfg = load_config(ROOT / "config.yaml", env=env)
    assert cfg.providers["openai"].api_key == "sk-o"
    assert cfg.providers["ollama"].api_base == "http://127.0.0.1:11434"
    limits, cache, cost = cfg.section("limits"), cfg.section("cache"), cfg.section("cost")
    assert (limits["tiers"]["free"]["requests"], limits["window_seconds"]) == ("25", "60")
    assert (cache["ttl_seconds"], cache["max_size"]) == ("5", "7")
    assert (cost["alert_threshold_usd"], cost["alert_email"]) == ("12.5", "ops@x.test")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.run([sys.executable, "-m", "aiproxy", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, cwd=ROOT, timeout=60)


def test_check_config_cli_summarises_the_shipped_config():
    r = run_cli("check-config", "--config", str(ROOT / "config.yaml"))
    assert r.returncode == 0, r.stderr
    assert "mock (mock): ready" in r.stdout
    assert "openai (openai): left out of routing: api_key is not set" in r.stdout


def test_check_config_cli_fails_with_paths(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("providers:\n  openai: {plugin: opnai}\nmodels:\n  - {name: x, provider: nope}\n")
    r = run_cli("check-config", "--config", str(path))
    assert r.returncode == 2
    assert "models[0].provider: no provider named 'nope' (providers: openai)" in r.stderr
    # structural errors come first; plugin names are checked once the structure is sound
    path.write_text("providers:\n  openai: {plugin: opnai}\n")
    r = run_cli("check-config", "--config", str(path))
    assert r.returncode == 2
    loaded = re.search(r"providers\.openai\.plugin: no provider plugin named 'opnai' \(loaded: ([a-z, ]+)\)",
                       r.stderr)
    assert loaded is not None, r.stderr
    assert {"mock", "ollama", "openai"} <= set(loaded.group(1).split(", "))  # and each built-in added later


def test_serve_refuses_a_public_address_without_a_master_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server: {host: 0.0.0.0}\n")
    r = run_cli("serve", "--config", str(path))
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0" in r.stderr


def test_a_misspelt_core_section_is_an_error_not_a_plugin_section():
    errors = errors_of({"servre": {"port": 1}, "provders": {}, "my_plugin": {"x": 1}})
    assert errors == ["servre: unknown section; did you mean 'server'?",
                      "provders: unknown section; did you mean 'providers'?"]


def test_a_section_named_almost_like_a_loaded_plugin_is_warned_about(caplog):
    from aiproxy.app import create_app

    create_app(make_config(request_tags={"header": "x"}, plugins={"dir": str(ROOT / "plugins")}))
    assert "config section 'request_tags' matches no loaded plugin; did you mean 'request_tag'?" \
        in caplog.text
