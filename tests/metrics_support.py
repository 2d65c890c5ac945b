"""Helpers for the metrics tests: a parsed scrape, and small stage plugins standing in for
the auth, cost and cache stages (so each count the tests assert is known exactly)."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from aiproxy import hookimpl
from aiproxy.call import Call, Principal
from aiproxy.provider import Reply

#: the real stages a test replaces with the stand-ins below, to know every number exactly
STAGES = ["cache", "cost", "limits", "quotas", "usage"]


class Scrape:
    """One ``/metrics`` answer, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None when there is none."""
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include these."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(ls)[label] for (n, ls), _ in self.samples.items() if n == name and label in dict(ls)}


async def scrape(http: httpx.AsyncClient, **headers: str) -> Scrape:
    r = await http.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return Scrape(r.text)


class Tenants:
    """Authenticate: ``Bearer sk-<tenant>`` is a key of that tenant (stands in for virtual keys)."""

    def __init__(self, *tenants: str) -> None:
        self.tenants = set(tenants)

    @hookimpl
    def aiproxy_authenticate(self, call: Call) -> Principal | None:
        token = call.headers.get("authorization", "").removeprefix("Bearer ")
        tenant = token.removeprefix("sk-")
        if tenant in self.tenants:
            return Principal(id=f"key-{tenant}", tenant=tenant)
        return None


class Pricing:
    """A cost stage: ``per_token`` USD a token (runs before metrics, as the real one does)."""

    def __init__(self, per_token: float) -> None:
        self.per_token = per_token

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        if call.usage is not None:
            call.cost = 0.0 if call.cached else call.usage.total_tokens * self.per_token

    @hookimpl
    def aiproxy_on_error(self, call: Call) -> None:
        self.aiproxy_after_call(call)


class Cache:
    """A cache stage: requests whose ``user`` is ``"cached"`` are hits, ``"nocache"`` skips,
    any other a miss; it says which in ``x-aiproxy-cache`` as the real stage does."""

    ANSWER: dict[str, Any] = {
        "id": "chatcmpl-cached", "object": "chat.completion", "created": 1, "model": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the cache"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }

    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        user = call.body.get("user")
        call.response_headers["x-aiproxy-cache"] = {"cached": "hit", "nocache": "skip"}.get(user, "miss")

    @hookimpl
    async def aiproxy_cache_lookup(self, call: Call) -> Reply | None:
        return Reply(dict(self.ANSWER)) if call.body.get("user") == "cached" else None


class Stats:
    """A plugin reporting its own counters through ``aiproxy_stats``; ``values`` is what it says."""

    def __init__(self, values: Any) -> None:
        self.values = values

    @hookimpl
    def aiproxy_stats(self) -> Any:
        if isinstance(self.values, Exception):
            raise self.values
        return self.values
