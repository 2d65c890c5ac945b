"""End to end: a started ``aiproxy serve`` in front of a fake OpenAI server, driven by the
real ``openai`` SDK: the cost header of a whole answer, priced from the usage the client
sees, and a spend alert e-mailed to a real SMTP server (aiosmtpd) once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from aiosmtpd.controller import Controller

from tests.fakes import FakeOpenAI
from tests.helpers import free_port, started_proxy

UPSTREAM_KEY = "sk-fake-upstream-key"


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Mailbox, Path]]:
    box, port = Mailbox(), free_port()
    smtp = Controller(box, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
            config = {
                "server": {"host": "127.0.0.1"},
                "plugins": {"dir": None},
                "providers": {"openai": {"plugin": "openai", "api_base": f"{fake.url}/v1",
                                         "api_key": UPSTREAM_KEY}},
                "models": [{"name": "gpt-mini", "provider": "openai", "model": "gpt-4o-mini"},
                           {"name": "gpt-priced", "provider": "openai", "model": "gpt-4o-mini",
                            "price": {"input": 100, "output": 300}}],
                "cost": {"alert_threshold_usd": "0.005", "alert_email": "ops@example.com",
                         "smtp": {"host": "127.0.0.1", "port": port}},
            }
            tmp: Path = tmp_path_factory.mktemp("cost-e2e")
            with started_proxy(config, tmp) as proxy:
                yield proxy.url, box, proxy.log
    finally:
        smtp.stop()


@pytest.fixture
def client(served: tuple[str, Mailbox, Path]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{served[0]}/v1", api_key="anything", max_retries=0, timeout=15) as c:
        yield c


def _chat(client: openai.OpenAI, model: str) -> tuple[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello to the cost stage please"}])
    return raw.headers["x-aiproxy-cost"], raw.parse().usage


def test_the_cost_header_prices_the_usage_the_client_got(client):
    header, usage = _chat(client, "gpt-mini")
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    # gpt-4o-mini: $0.15 input, $0.60 output per million tokens
    expected = (Decimal(usage.prompt_tokens) * Decimal("0.15")
                + Decimal(usage.completion_tokens) * Decimal("0.60")) / 1_000_000
    assert Decimal(header) == expected
    assert "e" not in header.lower()


def test_a_stream_has_no_cost_header(client):
    with client.chat.completions.with_streaming_response.create(
            model="gpt-mini", stream=True, messages=[{"role": "user", "content": "hi"}]) as r:
        assert "x-aiproxy-cost" not in r.headers
        assert list(r.iter_lines())


def test_yaml_price_and_one_alert_mail_for_the_month(client, served):
    _, box, log = served
    seen = 0
    for _ in range(4):  # $100 / $300 per million: ~$0.0025 a call, past $0.005 on the second
        header, usage = _chat(client, "gpt-priced")
        assert Decimal(header) == (Decimal(usage.prompt_tokens) * 100
                                   + Decimal(usage.completion_tokens) * 300) / 1_000_000
        seen += 1
    deadline = time.monotonic() + 10
    while not box.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # room for a (wrong) second mail to arrive
    assert seen == 4 and len(box.messages) == 1, log.read_text()[-3000:]
    assert b"Subject: aiproxy: tenant key:anonymous has spent $" in box.messages[0]
