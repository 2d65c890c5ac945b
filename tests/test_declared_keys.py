"""Keys declared in config.yaml: by ${ENV} reference or by hash, never a literal secret."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiproxy.cli import main
from aiproxy.config import load_config
from aiproxy.plugins import PluginError, build_plugin_manager
from tests.conftest import make_config
from tests.helpers import error_of

MOCK = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
CI_KEY = "sk-ci-" + "k" * 30
HASHED = "sk-dash-" + "h" * 30


def _config(declared: list[dict[str, Any]], **keys: Any) -> Any:
    return make_config(keys={"required": True, "declared": declared, **keys})


async def test_declared_keys_work_without_a_database(gateway: Callable[..., Any]) -> None:
    config = _config([
        {"name": "ci", "key": CI_KEY, "tier": "pro", "allowed_models": ["mock-gpt"], "tenant": "acme",
         "user": "ci-bot"},
        {"name": "dash", "hash": "sha256:" + hashlib.sha256(HASHED.encode()).hexdigest(), "role": "admin"},
    ])
    async with gateway(config) as (http, _):
        ok = await http.post("/v1/chat/completions", json=MOCK, headers={"authorization": f"Bearer {CI_KEY}"})
        assert ok.status_code == 200, ok.text
        other = await http.post("/v1/chat/completions", json={**MOCK, "model": "mock-claude"},
                                headers={"authorization": f"Bearer {CI_KEY}"})
        assert other.status_code == 403 and "'mock-claude'" in error_of(other)["message"]
        dash = await http.post("/v1/chat/completions", json={**MOCK, "model": "mock-claude"},
                               headers={"x-api-key": HASHED})
        assert dash.status_code == 200
        wrong = await http.post("/v1/chat/completions", json=MOCK,
                                headers={"authorization": f"Bearer {CI_KEY}x"})
        assert wrong.status_code == 401 and error_of(wrong)["code"] == "invalid_api_key"


async def test_a_declared_key_past_its_expiry_is_401_expired(gateway: Callable[..., Any]) -> None:
    config = _config([{"name": "old", "key": CI_KEY, "expires_at": "2020-01-01"}])
    async with gateway(config) as (http, _):
        r = await http.post("/v1/chat/completions", json=MOCK, headers={"authorization": f"Bearer {CI_KEY}"})
    assert r.status_code == 401
    err = error_of(r)
    assert err["code"] == "expired_api_key" and "(old) expired at 2020-01-01" in err["message"]
    assert CI_KEY not in r.text


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "x"}, "give exactly one of key"),
    ({"key": "short"}, "keys.declared[0].key: must be at least 16 characters"),
    ({"hash": "sha256:abc"}, "keys.declared[0].hash: expected sha256:<64 hex digits>"),
    ({"key": CI_KEY, "tier": "gold"}, "keys.declared[0].tier: expected one of free, starter, pro"),
    ({"key": CI_KEY, "colour": "red"}, "keys.declared[0].colour: unknown setting"),
    ({"key": CI_KEY, "expires_at": "soon"}, "keys.declared[0].expires_at: expected an ISO 8601"),
])
def test_bad_declarations_stop_start_up_naming_the_setting(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(PluginError, match="plugin 'keys'") as info:
        build_plugin_manager(_config([entry]))
    assert message in str(info.value)


def test_a_literal_key_in_the_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("providers: {mock: {plugin: mock}}\nmodels: [{name: m, provider: mock}]\n"
                    "plugins: {dir: null}\n"
                    f"keys:\n  declared:\n    - {{name: env, key: '${{CI_KEY}}'}}\n"
                    f"    - {{name: leaked, key: '{CI_KEY}'}}\n")
    monkeypatch.setenv("CI_KEY", "sk-from-the-environment-0123456789")
    with pytest.raises(PluginError) as info:
        build_plugin_manager(load_config(path))
    assert "keys.declared[1].key: a literal key in" in str(info.value)
    assert "keys.declared[0]" not in str(info.value)  # the env reference is fine
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "a literal key" in err and CI_KEY not in err


def test_the_shipped_config_declares_no_literal_key() -> None:
    root = Path(__file__).resolve().parent.parent
    build_plugin_manager(load_config(root / "config.yaml", env={}))


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("cache_ttl", "soon", "keys.cache_ttl: expected a number of seconds, got 'soon'"),
    ("negative_ttl", -1, "keys.negative_ttl: must not be negative"),
])
def test_bad_cache_settings_stop_start_up(setting: str, value: Any, message: str) -> None:
    with pytest.raises(PluginError, match="failed to start") as info:
        build_plugin_manager(make_config(keys={setting: value}))
    assert message in str(info.value)


def test_check_config_names_the_database_without_its_password(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("providers: {mock: {plugin: mock}}\nmodels: [{name: m, provider: mock}]\n"
                    "plugins: {dir: null}\ndatabase: {url: 'postgresql+asyncpg://u:pw-123456@db/aiproxy'}\n")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "database: postgresql+asyncpg://u:***@db/aiproxy" in out and "pw-123456" not in out
