"""Spend alerts: a real local webhook receiver and a real SMTP server (aiosmtpd) get
exactly one alert per tenant per month (clock injected), in one process and shared by
two apps through a real Redis (``AIPROXY_TEST_REDIS_URL``); a notifier or Redis failing
never fails a call nor loses spend."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from email import message_from_bytes
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from aiproxy import hookimpl
from aiproxy.builtin.cost import CostStage
from aiproxy.call import Call, Principal
from tests.conftest import CHAT, OPENAI_BASE, make_config
from tests.helpers import CHAT_URL, free_port, with_plugins
from tests.tcp_proxy import TcpProxy

REDIS_URL = os.environ.get("AIPROXY_TEST_REDIS_URL") or ""
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="AIPROXY_TEST_REDIS_URL is not set")
# gpt-4o, 100 prompt + 100 completion tokens: 100 x 2.50 + 100 x 10 = 1250 per million = $0.00125
USAGE = {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200}
PER_CALL = Decimal("0.00125")
NOV = dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.UTC)
DEC = dt.datetime(2026, 12, 1, 0, 0, tzinfo=dt.UTC)


class Tenants:
    """Callers named by ``x-tenant``; ``x-key`` alone is a key without a tenant."""

    @hookimpl
    def aiproxy_authenticate(self, call: Call) -> Principal | None:
        tenant = call.headers.get("x-tenant")
        return Principal(id=call.headers.get("x-key", f"k-{tenant}"), tenant=tenant)


class Webhook:
    """A tiny HTTP server on 127.0.0.1 that records each POSTed JSON body."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Webhook:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/cost"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                          if k.lower() == "content-length")
            body = await reader.readexactly(length)
            self.attempts += 1
            if self.status == 200:
                assert lines[0].startswith("POST /hooks/cost ")
                self.bodies.append(json.loads(body))
            reply = f"HTTP/1.1 {self.status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            writer.write(reply.encode())
            await writer.drain()
        finally:
            writer.close()


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()



def config(cost: dict[str, Any], **sections: Any) -> Any:
    return make_config(
        providers={"openai": {"plugin": "openai", "api_base": OPENAI_BASE, "api_key": "sk-up"}},
        models=[{"name": "gpt-test", "provider": "openai", "model": "gpt-4o", "retries": 0}],
        cost=cost, **sections)


def answer() -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o", "usage": USAGE,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                         "finish_reason": "stop"}]}


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@contextlib.asynccontextmanager
async def app(gateway: Any, cfg: Any, clock: Clock) -> AsyncIterator[tuple[Any, CostStage]]:
    pm = with_plugins(cfg, tenants=Tenants())
    stage: CostStage = pm.get_plugin("cost")
    assert stage.spend is not None
    stage.spend.now = clock

    async def no_wait(seconds: float) -> None:
        return None

    stage.spend.notifiers.sleep = no_wait
    async with gateway(cfg, plugin_manager=pm) as (http, upstream):
        upstream.post(CHAT_URL).respond(200, json=answer())

        async def call(tenant: str | None = None, key: str | None = None) -> None:
            headers = {"x-tenant": tenant} if tenant else {}
            if key:
                headers["x-key"] = key
            r = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 200, r.text
            assert r.headers["x-aiproxy-cost"] == "0.00125"

        yield call, stage


async def test_one_alert_per_tenant_per_month_by_webhook_and_email(gateway, smtp):
    box, port = smtp
    clock = Clock(NOV)
    async with Webhook() as hook:
        cfg = config({"alert_threshold_usd": "0.003", "alert_webhook": hook.url,
                      "alert_email": "ops@example.com, finance@example.com",
                      "smtp": {"host": "127.0.0.1", "port": port, "from": "aiproxy@example.com"}})
        async with app(gateway, cfg, clock) as (call, stage):
            for _ in range(2):
                await call("acme")
            await stage.spend.settled()
            assert hook.bodies == [] and box.messages == []  # $0.0025: under
            for _ in range(4):  # the first of these crosses ($0.00375); the rest must not alert
                await call("acme")
            await call("globex")  # another tenant, under its threshold
            await call(key="k-solo")  # no tenant: its own tenant, key:k-solo
            await stage.spend.settled()
            assert hook.bodies == [{"event": "cost.threshold_crossed", "tenant": "acme", "period": "2026-11",
                                    "spend_usd": "0.00375", "threshold_usd": "0.003",
                                    "at": "2026-11-30T23:59:00Z"}]
            assert len(box.messages) == 1
            sender, rcpts, message = box.messages[0]
            assert sender == "aiproxy@example.com"
            assert rcpts == ["ops@example.com", "finance@example.com"]
            assert message["Subject"] == "aiproxy: tenant acme has spent $0.00375 in 2026-11"
            clock.now = DEC  # a new month: acme starts again from 0
            for _ in range(2):
                await call("acme")
            await stage.spend.settled()
            assert len(hook.bodies) == 1
            await call("acme")
            for _ in range(2):
                await call(key="k-solo")  # with November's call, 3 calls — but 2 in December
            await stage.spend.settled()
            assert [(b["tenant"], b["period"], b["spend_usd"]) for b in hook.bodies] == [
                ("acme", "2026-11", "0.00375"), ("acme", "2026-12", "0.00375")]
            assert len(box.messages) == 2
            assert stage.aiproxy_stats()["aiproxy_cost_alerts_sent_total"] == 4
            assert stage.aiproxy_stats()["aiproxy_cost_alerts_failed_total"] == 0


async def test_a_failing_webhook_is_retried_a_bounded_number_of_times_and_fails_no_call(gateway, caplog):
    clock = Clock(NOV)
    async with Webhook(status=503) as hook:
        cfg = config({"alert_threshold_usd": 0.001, "alert_webhook": hook.url, "alert_retries": 2})
        async with app(gateway, cfg, clock) as (call, stage):
            await call("acme")  # crosses at once; the call is answered whatever the webhook does
            await stage.spend.settled()
            assert hook.attempts == 3  # one try and two retries
            stats = stage.aiproxy_stats()
            assert stats["aiproxy_cost_alerts_failed_total"] == 1
            assert stats["aiproxy_cost_alerts_sent_total"] == 0
            await call("acme")
            await stage.spend.settled()
            assert hook.attempts == 3  # once per period, even when it failed
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures and all(hook.url not in f for f in failures)  # the URL may hold a token


async def test_an_unreachable_smtp_server_fails_no_call_and_logs_no_password(gateway, caplog):
    clock = Clock(NOV)
    port = free_port()  # nothing listens there
    cfg = config({"alert_threshold_usd": 0.001, "alert_email": "ops@example.com", "alert_retries": 1,
                  "smtp": {"host": "127.0.0.1", "port": port, "username": "u",
                           "password": "smtp-secret-789", "timeout": 2}})
    async with app(gateway, cfg, clock) as (call, stage):
        await call("acme")
        await stage.spend.settled()
        assert stage.aiproxy_stats()["aiproxy_cost_alerts_failed_total"] == 1
    assert "smtp-secret-789" not in caplog.text
    assert "smtp-secret-789" not in repr(stage.spend.notifiers.smtp)


async def test_no_threshold_no_tracking(gateway):
    cfg = config({"alert_threshold_usd": ""})
    stage = with_plugins(cfg).get_plugin("cost")
    assert stage.spend is None


@needs_redis
async def test_two_apps_on_one_redis_send_one_alert_for_their_shared_spend(gateway, smtp, prefix):
    box, port = smtp
    clock = Clock(NOV)
    async with Webhook() as hook:
        cost = {"alert_threshold_usd": "0.005", "alert_webhook": hook.url, "alert_email": "ops@example.com",
                "smtp": {"host": "127.0.0.1", "port": port}, "flush_interval": 3600}
        cfg = config(cost, redis={"url": REDIS_URL, "prefix": prefix})
        async with app(gateway, cfg, clock) as (one, a), app(gateway, cfg, clock) as (two, b):
            for _ in range(3):
                await one("acme")  # $0.00375 here …
            await two("acme")  # … and $0.00125 there: $0.005 together, neither alone
            await a.spend.flush()
            await b.spend.flush()
            for _ in range(2):
                await one("acme")
                await two("acme")
            await asyncio.gather(a.spend.flush(), b.spend.flush())
            await a.spend.settled()
            await b.spend.settled()
            assert [(x["tenant"], x["spend_usd"]) for x in hook.bodies] == [("acme", "0.005")]
            assert len(box.messages) == 1
            from redis.asyncio import Redis

            client = Redis.from_url(REDIS_URL)
            try:
                total = int(await client.get(f"{prefix}cost:spend:2026-11:acme"))
                assert total == 8 * 1_250_000  # nano-dollars: 8 calls of $0.00125, exact
                assert await client.get(f"{prefix}cost:alerted:2026-11:acme") is not None
            finally:
                await client.aclose()


@needs_redis
async def test_spend_waits_out_a_redis_outage_and_loses_nothing(gateway, prefix):
    clock = Clock(NOV)
    with TcpProxy.for_url(REDIS_URL) as tcp:
        async with Webhook() as hook:
            cost = {"alert_threshold_usd": "0.003", "alert_webhook": hook.url, "flush_interval": 3600}
            cfg = config(cost, redis={"url": tcp.url(REDIS_URL), "prefix": prefix})
            async with app(gateway, cfg, clock) as (call, stage):
                await call("acme")
                await stage.spend.flush()
                tcp.cut()
                for _ in range(2):
                    await call("acme")  # answered while Redis is away
                await stage.spend.flush()
                assert stage.aiproxy_stats()["aiproxy_cost_backend_errors_total"] >= 1
                assert hook.bodies == []
                tcp.restore()
                await stage.spend.flush()
                await stage.spend.settled()
                assert [(x["tenant"], x["spend_usd"]) for x in hook.bodies] == [("acme", "0.00375")]


@needs_redis
async def test_a_shutdown_during_a_flush_loses_no_spend(prefix):
    # before: aclose cancelled the flusher while its pipeline was in flight, and the batch
    # it had taken was neither in Redis nor kept for the last flush
    from aiproxy.builtin.cost.alerts import Spend
    from aiproxy.builtin.cost.notifiers import Notifiers

    spend = Spend(Decimal(100), Notifiers([], [], None), redis_url=REDIS_URL, prefix=prefix,
                  flush_interval=0.001)
    entered, release = asyncio.Event(), asyncio.Event()
    add = spend._add_script

    async def held_add(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        return await add(*args, **kwargs)

    spend._add_script = held_add
    spend.now = Clock(NOV)
    spend.start()
    spend.add("acme", 1_250_000)
    await asyncio.wait_for(entered.wait(), 5)  # the flusher is inside its Redis write
    closing = asyncio.create_task(spend.aclose())
    for _ in range(5):
        await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(closing, 10)
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    try:
        assert await client.get(f"{prefix}cost:spend:2026-11:acme") == b"1250000"
    finally:
        await client.aclose()


@needs_redis
async def test_an_alert_whose_mark_could_not_be_set_is_sent_at_the_next_flush(prefix):
    # the INCRBY pipeline went through, then setting the alert mark failed: before,
    # that flush stopped there (the other tenant that crossed in the same batch was not
    # even looked at) and neither was looked at again unless it spent more that month
    from redis.exceptions import ConnectionError as RedisConnectionError

    from aiproxy.builtin.cost.alerts import Spend
    from aiproxy.builtin.cost.notifiers import Notifiers

    async with Webhook() as hook:
        spend = Spend(Decimal("0.001"), Notifiers([hook.url], [], None), redis_url=REDIS_URL,
                      prefix=prefix, flush_interval=3600)
        spend.now = Clock(NOV)
        real_mark = spend._mark_script
        failures = [RedisConnectionError("gone")]

        async def mark_once_failing(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()
            return await real_mark(*args, **kwargs)

        spend._mark_script = mark_once_failing
        try:
            spend.add("acme", 1_250_000)
            spend.add("globex", 1_250_000)
            await spend.flush()
            await spend.settled()
            assert hook.bodies == [] and spend.stats.backend_errors == 1
            await spend.flush()  # no new spend: the alerts still owed go out
            await spend.settled()
            assert sorted(b["tenant"] for b in hook.bodies) == ["acme", "globex"]
            await spend.flush()
            await spend.settled()
            assert len(hook.bodies) == 2
        finally:
            await spend.aclose()
