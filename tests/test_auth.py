"""Who may call, and what the hooks on the way do: the master key, ``aiproxy_authenticate``
plugins and principals, and plugin stages that fail (a crash is a bare 500, a
``ProxyError`` reaches the client, ``aiproxy_on_error`` sees every failure).

No master key ever appears in an answer.
"""

from __future__ import annotations

from typing import Any

import pytest

from aiproxy import hookimpl
from aiproxy.call import Call, Principal
from aiproxy.errors import ProxyError
from aiproxy.plugins import build_plugin_manager
from tests.conftest import CHAT, make_config
from tests.helpers import CHAT_URL, KEY, STREAM, Errors, assert_no_secret, error_of, with_plugins

# ---------------------------------------------------------------- master key

MASTER = "mk-test"


@pytest.fixture
async def keyed(gateway):
    async with gateway(make_config(server={"master_key": MASTER})) as pair:
        yield pair


def _answer(upstream: Any) -> None:
    upstream.post(CHAT_URL).respond(200, json={"id": "c", "object": "chat.completion", "choices": []})


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer mk-wrong"}, {"authorization": "mk-test"},
    {"authorization": "Basic mk-test"}, {"x-api-key": "mk-tes"}, {"authorization": "Bearer "},
], ids=["none", "wrong", "no-scheme", "basic", "prefix", "empty"])
async def test_master_key_required(keyed, headers):
    http, upstream = keyed
    _answer(upstream)
    r = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 401
    error = error_of(r)
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert_no_secret(r, MASTER)
    assert not upstream.calls
    r = await http.get("/v1/models", headers=headers)
    assert r.status_code == 401
    assert_no_secret(r, MASTER)
    r = await http.get("/v1/models/gpt-test", headers=headers)
    assert r.status_code == 401


@pytest.mark.parametrize("headers", [
    {"authorization": f"Bearer {MASTER}"}, {"authorization": f"bearer  {MASTER} "},
    {"x-api-key": MASTER}, {"api-key": MASTER},
], ids=["bearer", "bearer-lowercase", "x-api-key", "api-key"])
async def test_master_key_admits(keyed, headers):
    http, upstream = keyed
    _answer(upstream)
    r = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 200, r.text
    assert_no_secret(r, MASTER)
    # The client's key is the gateway's, not the upstream's.
    assert upstream.calls.last.request.headers["authorization"] == f"Bearer {KEY}"
    r = await http.get("/v1/models", headers=headers)
    assert r.status_code == 200
    assert "gpt-test" in [m["id"] for m in r.json()["data"]]
    assert_no_secret(r, MASTER)


async def test_health_needs_no_key(keyed):
    http, _ = keyed
    r = await http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_without_master_key_calls_are_anonymous(gateway):
    seen: list[Principal | None] = []

    class Spy:
        @hookimpl
        def aiproxy_before_call(self, call: Call) -> None:
            seen.append(call.principal)

    cfg = make_config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, spy=Spy())) as (http, _):
        r = await http.post("/v1/chat/completions",
                            json={"model": "mock-a", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert [p.kind if p else None for p in seen] == ["anonymous"]


# ---------------------------------------------------------------- authenticate hooks

class Decliner:
    def __init__(self) -> None:
        self.asked = 0

    @hookimpl
    async def aiproxy_authenticate(self, call: Call) -> Principal | None:
        self.asked += 1
        return None


class TeamKeys:
    def __init__(self) -> None:
        self.asked = 0

    @hookimpl
    async def aiproxy_authenticate(self, call: Call) -> Principal | None:
        self.asked += 1
        if call.headers.get("authorization") == "Bearer team-key":
            return Principal(id="key-1", team="red", allowed_models=("mock-ok",))
        return None


class TeamHeader:
    def __init__(self) -> None:
        self.principals: list[Principal | None] = []

    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        self.principals.append(call.principal)
        if call.principal and call.principal.team:
            call.response_headers["x-team"] = call.principal.team


async def test_async_decline_then_async_answer(gateway):
    cfg = make_config(server={"master_key": MASTER})
    decliner, team_keys, team_header = Decliner(), TeamKeys(), TeamHeader()
    pm = build_plugin_manager(cfg)
    pm.register(team_keys, name="team_keys")
    pm.register(decliner, name="decliner")  # registered last: pluggy asks it first
    pm.register(team_header, name="team_header")
    body = {"model": "mock-ok", "messages": [{"role": "user", "content": "x"}]}
    async with gateway(cfg, plugin_manager=pm) as (http, _):
        r = await http.post("/v1/chat/completions", json=body,
                            headers={"authorization": "Bearer team-key"})
        assert r.status_code == 200, r.text
        assert r.headers["x-team"] == "red"
        assert decliner.asked == 1 and team_keys.asked == 1
        [principal] = team_header.principals
        assert isinstance(principal, Principal)
        assert principal.id == "key-1"

        # The principal's model list is enforced.
        r = await http.post("/v1/chat/completions", json={**body, "model": "mock-other"},
                            headers={"authorization": "Bearer team-key"})
        assert r.status_code == 403
        assert error_of(r)["code"] == "model_not_allowed"

        # Nobody answers: 401, after every plugin had its turn.
        r = await http.post("/v1/chat/completions", json=body,
                            headers={"authorization": "Bearer someone-else"})
        assert r.status_code == 401
        assert decliner.asked == 3 and team_keys.asked == 3

        # The master key still works alongside.
        r = await http.post("/v1/chat/completions", json=body,
                            headers={"authorization": f"Bearer {MASTER}"})
        assert r.status_code == 200
        assert team_header.principals[-1] is not None
        assert team_header.principals[-1].kind == "master"


async def test_authenticate_raising_401_rejects(gateway):
    class Rejecter:
        @hookimpl
        async def aiproxy_authenticate(self, call: Call) -> Principal | None:
            raise ProxyError(401, "This key was revoked.", code="key_revoked")

    cfg = make_config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, rejecter=Rejecter())) as (http, upstream):
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401
        assert error_of(r)["code"] == "key_revoked"
        r = await http.get("/v1/models")
        assert r.status_code == 401
        assert not upstream.calls


async def test_authentication_comes_before_reading_the_body(gateway):
    """A caller without a key learns nothing about the API, not even what a bad body is."""
    async with gateway(make_config(server={"master_key": MASTER})) as (http, _):
        r = await http.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 401
        r = await http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": []})
        assert r.status_code == 401
        r = await http.post("/v1/chat/completions", content=b"{not json",
                            headers={"authorization": f"Bearer {MASTER}"})
        assert r.status_code == 400


# ---------------------------------------------------------------- stage errors

class Broken:
    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        raise RuntimeError("database password hunter2 rejected at /srv/aiproxy/stage.py")


class Limited:
    @hookimpl
    async def aiproxy_before_call(self, call: Call) -> None:
        raise ProxyError(429, "Team quota of 10 requests per minute reached.",
                         code="team_rate_limited", headers={"retry-after": "9"})


async def test_plugin_crash_is_500_without_details(gateway, caplog):
    cfg = make_config()
    errors = Errors()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, broken=Broken(), errors=errors)) \
            as (http, upstream):
        for body in (CHAT, STREAM):
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 500
            error = error_of(r)
            assert error["type"] == "internal_error"
            for leak in ("Traceback", "RuntimeError", "hunter2", "stage.py", "broken"):
                assert leak not in r.text
        assert not upstream.calls
    assert [e.status for _, e in errors.seen] == [500, 500]
    assert "hunter2" in caplog.text  # logged for the operator instead


async def test_plugin_proxy_error_reaches_client(gateway):
    cfg = make_config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, limited=Limited())) as (http, upstream):
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "9"
        error = error_of(r)
        assert error["message"] == "Team quota of 10 requests per minute reached."
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "team_rate_limited"
        assert not upstream.calls


async def test_on_error_sees_upstream_error(gateway):
    cfg = make_config()
    errors = Errors()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, errors=errors)) as (http, upstream):
        upstream.post(CHAT_URL).respond(503, text="overloaded")
        r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "rid-1"})
    assert r.status_code == 503
    [(call, error)] = errors.seen
    assert error.status == 503
    assert error.code == "upstream_unavailable"
    assert call.request_id == "rid-1"
    assert call.model == "gpt-test"
    assert call.error is error
    assert call.finished is not None
