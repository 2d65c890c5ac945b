"""The built-in stages run in the order their contracts need: before-call asks quotas then
limits (a refused quota takes no rate slot); after-call and on-error run cost first (quotas'
budgets and the usage log read call.cost), then quotas, limits, usage, metrics last; the
usage log starts after the database and stops (flushes) before it.

Checked on the real built-in modules through the app's own Hooks, for every stage that
implements the hook (a stage that does not yet is left out, so this holds while they are
being built), and on the registration order that decides it for those that will.
"""

from __future__ import annotations

import pytest

from aiproxy import hookimpl, hookspecs
from aiproxy.app import create_app
from aiproxy.hooks import Hooks
from aiproxy.plugins import BUILTINS, PluginManager, build_plugin_manager
from tests.conftest import make_config

BEFORE = ["quotas", "limits"]
AFTER = ["cost", "quotas", "limits", "usage", "metrics"]


@pytest.fixture
def hooks() -> Hooks:
    return create_app(make_config()).state.hooks


def in_order(hooks: Hooks, hook: str, names: list[str]) -> list[str]:
    return [plugin for plugin in hooks.implementers(hook) if plugin in names]


def test_the_stages_are_registered_so_that_pluggy_calls_them_in_contract_order():
    # pluggy calls the last registered first: whatever hook a stage implements (without
    # tryfirst/trylast), it is called in reverse registration order
    pm = build_plugin_manager(make_config())
    registered = [name for name, _ in pm.list_name_plugin()]
    call_order = list(reversed(registered))
    assert [n for n in call_order if n in AFTER] == AFTER
    assert [n for n in call_order if n in BEFORE] == BEFORE
    assert set(AFTER) <= set(BUILTINS)


@pytest.mark.parametrize(("hook", "expected"), [
    ("aiproxy_before_call", BEFORE),
    ("aiproxy_after_call", AFTER),
    ("aiproxy_on_error", AFTER),
])
def test_the_stages_that_implement_a_hook_run_in_contract_order(hooks, hook, expected):
    got = in_order(hooks, hook, expected)
    assert got == [name for name in expected if name in got]


def test_the_usage_log_starts_after_the_database_and_stops_before_it(hooks):
    starts = hooks.implementers("aiproxy_startup")
    stops = list(reversed(hooks.implementers("aiproxy_shutdown")))  # as app.py stops them
    if "usage" in starts:
        assert starts.index("database") < starts.index("usage")
    if "usage" in stops:
        assert stops.index("usage") < stops.index("database")


async def test_hooks_call_in_the_order_implementers_reports():
    # what the tests above rely on: Hooks.implementers is the order the calls happen in,
    # the last registered first
    seen: list[str] = []

    class Probe:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        async def aiproxy_after_call(self, call) -> None:
            seen.append(self.name)

    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for name in ("registered_first", "registered_second", "registered_last"):
        pm.register(Probe(name), name=name)
    hooks = Hooks(pm, lambda name: {})
    await hooks.all("aiproxy_after_call", call=None)
    assert seen == hooks.implementers("aiproxy_after_call") == \
        ["registered_last", "registered_second", "registered_first"]
