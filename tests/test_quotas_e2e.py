"""A key's monthly token limit through a started ``aiproxy serve`` and the real ``openai``
SDK: set through the management API, enforced with a 429 the SDK reads as
``insufficient_quota``, written back at shutdown, continued by the next server on the
same database (SQLite, and PostgreSQL when configured), raised through the API at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from aiproxy import tokens
from tests.helpers import started_proxy

MASTER = "mk-quotas-e2e-master-key-0123456789"
LIMIT = 60
BODY: dict[str, Any] = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}


def _config(db_url: str) -> dict[str, Any]:
    return {
        "server": {"master_key": MASTER},
        "plugins": {"dir": None},
        "database": {"url": db_url},
        "keys": {"required": True},
        "quotas": {"flush_interval": 3600},  # written back at shutdown, not before
        "providers": {"mock": {"plugin": "mock"}},
        "models": [{"name": "mock-*", "provider": "mock"}],
    }


def _api(url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{url}/api/ai{path}", headers={"authorization": f"Bearer {MASTER}"},
                         timeout=15, trust_env=False, **kwargs)


def _chat(client: openai.OpenAI) -> int:
    reply = client.chat.completions.create(**BODY)
    assert reply.usage is not None
    return reply.usage.total_tokens


def test_a_keys_monthly_limit_holds_across_a_restart(db_url: str, tmp_path: Path) -> None:
    with started_proxy(_config(db_url), tmp_path, log_name="first.log", stop_timeout=15) as served:
        made = _api(served.url, "POST", "/keys", json={"name": "capped", "monthly_limit_tokens": LIMIT})
        assert made.status_code == 201, made.text
        key_id, secret = made.json()["id"], made.json()["key"]
        used = 0
        with openai.OpenAI(base_url=f"{served.url}/v1", api_key=secret, max_retries=0, timeout=15) as client:
            for _ in range(LIMIT):  # bounded: every call uses at least one token
                try:
                    used += _chat(client)
                except openai.RateLimitError as exc:
                    refused = exc
                    break
            else:
                pytest.fail("the key was never refused")
        assert used + tokens.prompt(BODY) > LIMIT  # refused when this call would not fit
        assert refused.code == "insufficient_quota"
        assert f"the monthly token limit of key {key_id} is {LIMIT} tokens and {used} are used" in \
            refused.message
        assert re.search(r"resets at \d{4}-\d{2}-01T00:00:00Z", refused.message)
        assert int(refused.response.headers["retry-after"]) > 0

    with started_proxy(_config(db_url), tmp_path, log_name="second.log", stop_timeout=15) as served:
        row = _api(served.url, "GET", f"/keys/{key_id}").json()
        assert row["current_usage"] == used and re.fullmatch(r"\d{4}-\d{2}", row["usage_period"])
        with openai.OpenAI(base_url=f"{served.url}/v1", api_key=secret, max_retries=0, timeout=15) as client:
            with pytest.raises(openai.RateLimitError) as again:
                _chat(client)
            assert f"{used} are used" in again.value.message
            raised = _api(served.url, "PATCH", f"/keys/{key_id}", json={"monthly_limit_tokens": 10 * LIMIT})
            assert raised.status_code == 200, raised.text
            assert _chat(client) > 0
        assert secret not in served.log.read_text()
