"""The only code that calls hooks: pluggy never awaits, so this does.

An ``async def`` implementation returns a coroutine, never None; under pluggy's own
``firstresult`` it would "win" before it ran. Here each answer is awaited in turn,
in pluggy's call order, and each implementation gets its own plugin's settings.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import Any, NamedTuple, TypeGuard

import pluggy
from pluggy import HookCaller

log = logging.getLogger("aiproxy.hooks")


async def first_result(caller: HookCaller, **kwargs: Any) -> Any | None:
    """Await each implementation in call order; return the first non-None answer."""
    for impl in reversed(caller.get_hookimpls()):
        value = impl.function(*[kwargs[name] for name in impl.argnames])
        if _awaitable(value):
            value = await value
        if value is not None:
            return value
    return None


async def call_all(caller: HookCaller, **kwargs: Any) -> list[Any]:
    """Await every implementation in call order; return the non-None answers."""
    results = []
    for impl in reversed(caller.get_hookimpls()):
        value = impl.function(*[kwargs[name] for name in impl.argnames])
        if _awaitable(value):
            value = await value
        if value is not None:
            results.append(value)
    return results


class _Impl(NamedTuple):
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    settings: dict[str, Any]
    plugin: str
    only: str | None  # the one argument it takes, when that is all (most stages: ``call``)


class Hooks:
    """The app's view of its hooks: implementations resolved once, settings bound.

    Plugins are fixed once the app is built, so the per-call path is a loop over a
    tuple; a hook nobody implements costs one dict lookup.
    """

    def __init__(self, pm: pluggy.PluginManager, settings_for: Callable[[str], dict[str, Any]]) -> None:
        self.pm = pm
        self._impls: dict[str, tuple[_Impl, ...]] = {}
        for name in dir(pm.hook):
            if not name.startswith("aiproxy_"):
                continue
            caller: HookCaller = getattr(pm.hook, name)
            self._impls[name] = tuple(
                _Impl(impl.function, tuple(impl.argnames), settings_for(impl.plugin_name),
                      impl.plugin_name, _only(tuple(impl.argnames)))
                for impl in reversed(caller.get_hookimpls())
            )

    def has(self, hook: str) -> bool:
        return bool(self._impls.get(hook))

    def implementers(self, hook: str) -> list[str]:
        return [impl.plugin for impl in self._impls.get(hook, ())]

    async def first(self, hook: str, **kwargs: Any) -> Any | None:
        for impl in self._impls.get(hook, ()):
            value = _invoke(impl, hook, kwargs)
            if _awaitable(value):
                value = await _awaited(value, impl, hook)
            if value is not None:
                return value
        return None

    async def all(self, hook: str, **kwargs: Any) -> list[Any]:
        results = []
        for impl in self._impls.get(hook, ()):
            value = _invoke(impl, hook, kwargs)
            if _awaitable(value):
                value = await _awaited(value, impl, hook)
            if value is not None:
                results.append(value)
        return results

    async def each(self, hook: str, **kwargs: Any) -> None:
        """Run every implementation, each on its own: one that raises is logged (naming
        its plugin) and the rest still run. For hooks whose failure must not cost the
        client its answer, nor the later stages their turn (after-call, on-error)."""
        for impl in self._impls.get(hook, ()):
            try:
                value = _invoke(impl, hook, kwargs)
                if _awaitable(value):
                    await _awaited(value, impl, hook)
            except Exception:
                call = kwargs.get("call")
                log.exception("plugin %r failed in %s for request %s", impl.plugin, hook,
                              getattr(call, "request_id", "?"))

    async def one(self, hook: str, plugin: str, **kwargs: Any) -> Any:
        """Await one plugin's implementation of ``hook`` (start-up and shutdown, in order)."""
        for impl in self._impls.get(hook, ()):
            if impl.plugin == plugin:
                value = _invoke(impl, hook, kwargs)
                return await _awaited(value, impl, hook) if _awaitable(value) else value
        return None

    def sync_all(self, hook: str, **kwargs: Any) -> list[Any]:
        """For start-up hooks that must not be async (registration, routes)."""
        return [value for plugin in self.implementers(hook)
                if (value := self.sync_one(hook, plugin, **kwargs)) is not None]

    def sync_one(self, hook: str, plugin: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of a sync hook."""
        for impl in self._impls.get(hook, ()):
            if impl.plugin != plugin:
                continue
            value = _invoke(impl, hook, kwargs)
            if _awaitable(value):
                close = getattr(value, "close", None)
                if close:
                    close()
                raise TypeError(f"plugin {impl.plugin!r}: {hook} must not be async")
            return value
        return None


def _only(argnames: tuple[str, ...]) -> str | None:
    return argnames[0] if len(argnames) == 1 and argnames[0] != "settings" else None


def _awaitable(value: Any) -> TypeGuard[Awaitable[Any]]:
    # most stages answer None, or a coroutine when they do I/O: both without isawaitable's
    # three isinstance checks
    return value is not None and (type(value) is CoroutineType or inspect.isawaitable(value))


def _invoke(impl: _Impl, hook: str, kwargs: dict[str, Any]) -> Any:
    try:
        if impl.only is not None:
            return impl.function(kwargs[impl.only])
        return impl.function(*[impl.settings if name == "settings" else kwargs[name]
                               for name in impl.argnames])
    except Exception as exc:
        _note(exc, impl, hook)
        raise


async def _awaited(value: Any, impl: _Impl, hook: str) -> Any:
    try:
        return await value
    except Exception as exc:
        _note(exc, impl, hook)
        raise


def _note(exc: Exception, impl: _Impl, hook: str) -> None:
    note = f"raised in plugin {impl.plugin!r}, hook {hook}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
