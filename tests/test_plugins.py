"""Plugin discovery: built-ins, the plugins folder, entry points, and what goes wrong."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy
import pytest

from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.config import ConfigError
from aiproxy.hooks import call_all, first_result
from aiproxy.plugins import PluginError, build_plugin_manager, describe
from tests.conftest import CHAT, OPENAI_BASE, make_config

ROOT = Path(__file__).resolve().parent.parent


def with_plugins_dir(folder: Path | None, **extra):
    return make_config(plugins={"dir": str(folder) if folder else None}, **extra)


async def test_example_plugin_loads_from_the_shipped_folder_and_tags_requests(gateway):
    cfg = with_plugins_dir(ROOT / "plugins", request_tag={"header": "x-team", "value": "blue"})
    async with gateway(cfg) as (http, upstream):
        route = upstream.post(f"{OPENAI_BASE}/chat/completions").respond(200, json={"choices": []})
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert route.calls.last.request.headers["x-team"] == "blue"
    assert r.headers["x-team"] == "blue"


async def test_example_plugin_defaults_to_the_callers_identity(gateway):
    cfg = with_plugins_dir(ROOT / "plugins", server={"master_key": "mk-1"})
    async with gateway(cfg) as (http, _):
        r = await http.post("/v1/chat/completions", headers={"authorization": "Bearer mk-1"},
                            json={**CHAT, "model": "mock-a"})
    assert r.status_code == 200
    assert r.headers["x-aiproxy-tag"] == "master"


def test_disabling_a_plugin_removes_it(tmp_path):
    cfg = with_plugins_dir(ROOT / "plugins")
    assert "request_tag" in build_plugin_manager(cfg).sources
    cfg.plugins.disable = ["request_tag", "ollama"]
    pm = build_plugin_manager(cfg)
    assert "request_tag" not in pm.sources and "ollama" not in pm.sources
    with pytest.raises(ConfigError) as info:  # the config still names an ollama provider
        create_app(cfg)
    [error] = info.value.errors  # the loaded list grows with each built-in provider
    assert error.startswith("providers.ollama.plugin: no provider plugin named 'ollama' (loaded: ")
    loaded = error.split("(loaded: ")[1].rstrip(")").split(", ")
    assert "ollama" not in loaded and {"mock", "openai"} <= set(loaded) and loaded == sorted(loaded)


def test_misspelt_hook_stops_startup(tmp_path):
    (tmp_path / "typo.py").write_text(textwrap.dedent("""
        from aiproxy import hookimpl

        @hookimpl
        def aiproxy_authenticat(call):
            return None
    """))
    with pytest.raises(PluginError) as info:
        build_plugin_manager(with_plugins_dir(tmp_path))
    assert "typo" in str(info.value) and "aiproxy_authenticat" in str(info.value)


def test_a_plugin_file_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(PluginError) as info:
        build_plugin_manager(with_plugins_dir(tmp_path))
    assert str(tmp_path / "broken.py") in str(info.value)
    assert "ModuleNotFoundError" in str(info.value)


def test_a_bad_setting_in_a_plugins_section_is_a_config_error_naming_its_path(tmp_path):
    """Not "plugin failed to start: ConfigError: …": the CLI prints it as any config error."""
    (tmp_path / "strict.py").write_text(textwrap.dedent("""
        from aiproxy.config import ConfigError

        def aiproxy_plugin(config):
            raise ConfigError(["strict.level: expected 1, 2 or 3, got 9"], config.source)
        """))
    with pytest.raises(ConfigError) as info:
        build_plugin_manager(with_plugins_dir(tmp_path, strict={"level": 9}))
    assert "strict.level: expected 1, 2 or 3, got 9" in str(info.value)
    with pytest.raises(ConfigError, match=r"limits\.tiers\.free\.requests"):
        build_plugin_manager(make_config(limits={"tiers": {"free": {"requests": -3}}}))


def test_a_file_cannot_shadow_a_builtin(tmp_path):
    (tmp_path / "mock.py").write_text("")
    with pytest.raises(PluginError, match="already loaded"):
        build_plugin_manager(with_plugins_dir(tmp_path))


def test_two_plugins_registering_one_provider_kind_is_an_error(tmp_path):
    (tmp_path / "othermock.py").write_text(textwrap.dedent("""
        from aiproxy import hookimpl
        from aiproxy.provider import Provider

        @hookimpl
        def aiproxy_register_providers(register):
            register("mock", Provider)
    """))
    with pytest.raises(PluginError, match="provider kind 'mock' is registered by both"):
        create_app(with_plugins_dir(tmp_path))


@pytest.fixture
def installed_distribution(tmp_path, monkeypatch):
    """A pip-installed plugin package, as importlib.metadata sees one on sys.path."""
    (tmp_path / "aiproxy_shout.py").write_text(textwrap.dedent("""
        from aiproxy import hookimpl

        class Shout:
            def __init__(self, word):
                self.word = word

            @hookimpl
            def aiproxy_before_call(self, call):
                call.response_headers["x-shout"] = self.word

        def aiproxy_plugin(config):
            return Shout(config.section("shout").get("word", "hey"))
    """))
    info = tmp_path / "aiproxy_shout-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aiproxy-shout\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[aiproxy]\nshout = aiproxy_shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("aiproxy_shout", None)


async def test_entry_point_plugins_load_and_get_their_settings(installed_distribution, gateway):
    cfg = make_config(shout={"word": "ahoy"})
    pm = build_plugin_manager(cfg)
    assert pm.sources["shout"] == "entry point (aiproxy-shout 1.2)"
    async with gateway(cfg) as (http, _):
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "mock-x"})
    assert r.headers["x-shout"] == "ahoy"


def test_describe_lists_sources_and_hooks():
    rows = {r.name: r for r in describe(build_plugin_manager(with_plugins_dir(ROOT / "plugins")))}
    assert rows["auth"].source == "builtin"
    assert rows["auth"].hooks == ["aiproxy_authenticate"]
    assert rows["mock"].hooks == ["aiproxy_register_providers"]
    assert rows["request_tag"].source.endswith("plugins/request_tag.py")
    assert rows["request_tag"].hooks == ["aiproxy_before_call"]


def test_plugins_cli_shows_builtins_and_the_example():
    r = subprocess.run([sys.executable, "-m", "aiproxy", "plugins", "--config", str(ROOT / "config.yaml")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name in ("auth", "openai", "ollama", "mock", "request_tag"):
        assert any(line.startswith(name) for line in r.stdout.splitlines()), name
    assert "hooks: aiproxy_before_call" in r.stdout


class _Spec:
    hookspec = pluggy.HookspecMarker("aiproxy")

    @hookspec(firstresult=True)
    def aiproxy_authenticate(self, call, settings):
        """first result"""


async def test_first_result_awaits_an_async_decline_before_taking_the_next_answer():
    pm = pluggy.PluginManager("aiproxy")
    pm.add_hookspecs(_Spec)
    order = []

    class Answers:
        @hookimpl
        def aiproxy_authenticate(self, call):
            order.append("answers")
            return "principal"

    class Declines:
        @hookimpl
        async def aiproxy_authenticate(self, call):
            order.append("declines")
            return None

    pm.register(Answers())
    pm.register(Declines())  # registered last: called first
    assert await first_result(pm.hook.aiproxy_authenticate, call=None, settings={}) == "principal"
    assert order == ["declines", "answers"]
    assert await call_all(pm.hook.aiproxy_authenticate, call=None, settings={}) == ["principal"]
