"""Build the plugin manager: built-ins, entry points (group ``aiproxy``), plugins folder."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pluggy

from aiproxy import hookspecs
from aiproxy.config import Config, ConfigError

if TYPE_CHECKING:
    from aiproxy.hooks import Hooks
    from aiproxy.provider import Provider

log = logging.getLogger("aiproxy.plugins")

#: Built-in plugins, registered exactly as third-party ones are; name → module.
BUILTINS = {
    # pluggy calls the last registered first: "auth" (the master key) is asked before
    # "keys" (virtual keys), and "database" starts before "keys" and stops after it.
    # The stages: before-call runs quotas then limits (a refused quota takes no rate
    # slot); after-call runs cost first (quotas' budgets and the usage log read
    # call.cost), then quotas, limits, usage, metrics last. "usage" starts after
    # "database" and stops (flushes) before it.
    "metrics": "aiproxy.builtin.metrics",
    "usage": "aiproxy.builtin.usage",
    "limits": "aiproxy.builtin.limits",
    "quotas": "aiproxy.builtin.quotas",
    "cost": "aiproxy.builtin.cost",
    "cache": "aiproxy.builtin.cache",
    "tenant_keys": "aiproxy.builtin.tenant_keys",
    "keys": "aiproxy.builtin.keys",
    "database": "aiproxy.builtin.database",
    "auth": "aiproxy.builtin.auth",
    "openai": "aiproxy.builtin.openai",
    "ollama": "aiproxy.builtin.ollama",
    "google": "aiproxy.builtin.google",
    "anthropic": "aiproxy.builtin.anthropic",
    "mock": "aiproxy.builtin.mock",
    "messages": "aiproxy.builtin.messages",
    "manage": "aiproxy.builtin.manage",
}
ENTRY_POINT_GROUP = "aiproxy"


class PluginError(Exception):
    """A plugin could not be loaded; the message names it and why."""


@dataclass(slots=True)
class PluginInfo:
    name: str
    source: str  # "builtin", "entry point <dist>", or a file path
    hooks: list[str]


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering where each plugin came from."""

    def __init__(self) -> None:
        super().__init__("aiproxy")
        self.sources: dict[str, str] = {}


def build_plugin_manager(config: Config) -> PluginManager:
    """A new manager for one app. Raises PluginError naming a plugin that fails to load.

    A plugin is a module of ``@hookimpl`` functions. A module that defines
    ``aiproxy_plugin(config)`` instead has that factory's return value registered, so a
    plugin can keep per-app state on an object built from config (no module globals).
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for name in config.plugins.disable:
        pm.set_blocked(name)
    for name, module in BUILTINS.items():
        if not pm.is_blocked(name):
            _register(pm, config, name, importlib.import_module(module), "builtin")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name):
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        try:
            module = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} (entry point of {dist}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
        _register(pm, config, ep.name, module, f"entry point ({dist})")
    if config.plugins.dir is not None:
        _load_folder(pm, config, config.plugins.dir)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin)!r}: {exc}") from exc
    return pm


def _register(pm: PluginManager, config: Config, name: str, module: object, source: str) -> None:
    if pm.has_plugin(name):
        raise PluginError(f"{source}: a plugin named {name!r} is already loaded "
                          f"(from {pm.sources.get(name, '?')})")
    factory = getattr(module, "aiproxy_plugin", None)
    plugin = module
    if callable(factory):
        try:
            plugin = factory(config)
        except ConfigError:
            raise  # a bad setting in the plugin's section: reported as every config error is
        except Exception as exc:
            raise PluginError(f"plugin {name!r} ({source}) failed to start: "
                              f"{type(exc).__name__}: {exc}") from exc
    try:
        pm.register(plugin, name=name)
    except ValueError as exc:
        raise PluginError(f"plugin {name!r} ({source}): {exc}") from exc
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} ({source}): {exc}") from exc
    pm.sources[name] = source


def _load_folder(pm: PluginManager, config: Config, folder: Path) -> None:
    if not folder.is_dir():
        log.debug("plugins folder %s does not exist; none loaded from it", folder)
        return
    for path in sorted(folder.glob("*.py")):
        name = path.stem
        if name.startswith("_") or pm.is_blocked(name):
            continue
        if pm.has_plugin(name):
            raise PluginError(f"{path}: a plugin named {name!r} is already loaded "
                              f"(from {pm.sources.get(name, '?')}); rename the file")
        _register(pm, config, name, _import_file(name, path), str(path))


def _import_file(name: str, path: Path) -> ModuleType:
    module_name = f"aiproxy_plugins.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path}: cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(f"{path}: failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def describe(pm: PluginManager) -> list[PluginInfo]:
    """What is loaded, from where, implementing which hooks (``aiproxy plugins``)."""
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        out.append(PluginInfo(name, pm.sources.get(name, "registered directly"), hooks))
    return out


def provider_kinds(hooks: Hooks) -> dict[str, type[Provider]]:
    """Provider classes by kind, as plugins register them; two for one kind is an error."""
    kinds: dict[str, type[Provider]] = {}
    owners: dict[str, str] = {}

    for impl_plugin in hooks.implementers("aiproxy_register_providers"):
        def register(kind: str, cls: type[Provider], _plugin: str = impl_plugin) -> None:
            if kind in kinds:
                raise PluginError(f"provider kind {kind!r} is registered by both plugin "
                                  f"{owners[kind]!r} and plugin {_plugin!r}")
            kinds[kind] = cls
            owners[kind] = _plugin

        hooks.sync_one("aiproxy_register_providers", impl_plugin, register=register)
    return kinds


def check_provider_kinds(config: Config, kinds: dict[str, type[Provider]]) -> None:
    errors = [
        f"providers.{p.name}.plugin: no provider plugin named {p.plugin!r} "
        f"(loaded: {', '.join(sorted(kinds)) or 'none'})"
        for p in config.providers.values() if p.plugin not in kinds
    ]
    if errors:
        raise ConfigError(errors, config.source)
