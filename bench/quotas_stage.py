"""Micro-benchmark: the quotas stage's before-call + after-call per call, in process.

    .venv/bin/python bench/quotas_stage.py

Each case runs the two hooks of the stage object directly (no HTTP, no upstream) for a
key whose Principal is built once, as the auth stage's cache hands it out; the best of
7 rounds of 20,000 calls is reported in µs per call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.datastructures import Headers

from aiproxy.builtin.quotas import Quotas
from aiproxy.call import Call, Principal, Usage
from aiproxy.config import parse_config

BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 16}
SECTION = {"plans": {"pro": {"monthly_tokens": 10**12}},
           "budgets": {"tiers": {"pro": {"key": {"daily_usd": 10**9, "monthly_usd": 10**9},
                                         "tenant": {"monthly_usd": 10**9}}}}}
CASES: dict[str, tuple[dict[str, Any], Principal]] = {
    "no limit (a key's month still counted)": ({}, Principal(id="key_1", tier="free")),
    "key monthly limit": ({}, Principal(id="key_1", tier="free", metadata={"monthly_limit_tokens": 10**12})),
    "key limit + plan + 3 budgets": (SECTION, Principal(id="key_1", tier="pro", tenant="acme",
                                                        metadata={"monthly_limit_tokens": 10**12})),
    "master key (skipped)": (SECTION, Principal(id="master", kind="master")),
}


async def run(section: dict[str, Any], principal: Principal, n: int = 20_000) -> float:
    quotas = Quotas(parse_config({"quotas": section}, env={}))
    headers = Headers({})
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(n):
            call = Call(request_id="r", operation="chat", body=BODY, model="mock-gpt", stream=False,
                        headers=headers, principal=principal, upstream_model="mock-gpt")
            quotas.aiproxy_before_call(call)  # in process: no coroutine
            call.usage = Usage(20, 12, 32)
            call.cost = 0.0001
            quotas.aiproxy_after_call(call)
        best = min(best, time.perf_counter() - start)
    baseline = float("inf")  # the loop and the Call alone
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(n):
            call = Call(request_id="r", operation="chat", body=BODY, model="mock-gpt", stream=False,
                        headers=headers, principal=principal, upstream_model="mock-gpt")
            call.usage = Usage(20, 12, 32)
        baseline = min(baseline, time.perf_counter() - start)
    return (best - baseline) / n * 1e6


async def main() -> None:
    for name, (section, principal) in CASES.items():
        print(f"{name:45s} {await run(section, principal):6.2f} µs/call")


if __name__ == "__main__":
    asyncio.run(main())
