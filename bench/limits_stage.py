"""The rate-limit stage's own cost per call: before-call (rules, GCRA take, headers) plus
after-call (settling the token estimate), driven directly on a typical chat call.

    .venv/bin/python bench/limits_stage.py [--calls 20000] [--repeat 7] [--redis redis://127.0.0.1:6379/15]

Cases, in process: requests only (key, user, tenant: 3 counters), requests and tokens per
minute (key, user, tenant, model: 8 counters, an estimate and a settle), and no limits
configured. With ``--redis``, the same as the second over one Redis (two round trips a call:
the take, and the settle of the estimate). Best of ``--repeat``; limits large enough never
to refuse. Redis keys go under a fresh prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import time
import uuid
from typing import Any

from starlette.datastructures import Headers

from aiproxy.builtin.limits import Limits
from aiproxy.call import Call, Principal, Usage
from aiproxy.config import parse_config

PRINCIPAL = Principal(id="key-1", user="u-1", tenant="acme", tier="pro")
HEADERS = Headers({"content-type": "application/json", "authorization": "Bearer sk-x"})
BIG = 10**9


def calls(n: int) -> list[Call]:
    out = []
    for i in range(n):
        body = {"model": "gpt-4o-mini", "max_tokens": 200,
                "messages": [{"role": "system", "content": "You are a helpful assistant. " * 4},
                             {"role": "user", "content": f"Question number {i}: what is the answer?"}]}
        out.append(Call(request_id=str(i), operation="chat", body=body, model="gpt-4o-mini", stream=False,
                        headers=HEADERS, principal=PRINCIPAL, upstream_model="gpt-4o-mini"))
    return out


def plugin(limits: dict[str, Any], redis: dict[str, Any] | None = None) -> Limits:
    raw: dict[str, Any] = {"plugins": {"dir": None}, "limits": limits}
    if redis:
        raw["redis"] = redis
    return Limits(parse_config(raw, env={}))


async def run(limits: Limits, batch: list[Call]) -> float:
    start = time.perf_counter()
    for call in batch:
        pending = limits.aiproxy_before_call(call)
        if inspect.isawaitable(pending):
            await pending
        call.usage = Usage(60, 40, 100)
        pending = limits.aiproxy_after_call(call)
        if inspect.isawaitable(pending):
            await pending
    return (time.perf_counter() - start) / len(batch) * 1e6


async def best(limits: Limits, n: int, repeat: int) -> float:
    return min([await run(limits, calls(n)) for _ in range(repeat)])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--redis")
    args = parser.parse_args()
    requests = {"tiers": {"pro": {"requests": BIG}}}
    both = {"tiers": {"pro": {"requests": BIG, "tokens_per_minute": BIG}},
            "models": {"gpt-4o-mini": {"requests": BIG, "tokens_per_minute": BIG}}}
    for name, limits in (("requests only, 3 counters:", requests), ("requests + tokens, 8 counters:", both),
                         ("no limits configured:", {})):
        print(f"{name:33}{await best(plugin(limits), args.calls, args.repeat):7.2f} µs/call")
    if args.redis:
        prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        shared = plugin(both, {"url": args.redis, "prefix": prefix})
        try:
            n = min(args.calls, 2000)
            figure = await best(shared, n, args.repeat)
            print(f"same over Redis (take + settle): {figure:7.2f} µs/call")
        finally:
            assert shared.remote is not None
            redis = shared.remote.redis
            keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
            if keys:
                await redis.delete(*keys)
            await shared.remote.aclose()


if __name__ == "__main__":
    asyncio.run(main())
