"""The response cache stage's own cost per call, in process: a lookup that misses plus the
store of the answer, and a lookup that hits (the stored answer parsed, under a new id).

    .venv/bin/python bench/cache_stage.py [--calls 20000] [--repeat 7]

Drives the plugin's hooks directly on a typical chat call (a system and a user message,
temperature 0, a ~400-byte answer with usage), so the figure is the stage's work alone:
key hash (orjson with sorted keys, SHA-256), headers, LRU get/set. Best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from starlette.datastructures import Headers

from aiproxy.builtin.cache import ResponseCache
from aiproxy.call import Call, Principal
from aiproxy.config import parse_config
from aiproxy.provider import Reply

ANSWER = {"id": "chatcmpl-abc123", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 50},
                       "logprobs": None, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 40, "completion_tokens": 50, "total_tokens": 90}}
PRINCIPAL = Principal(id="key-1", tenant="acme")
HEADERS = Headers({"content-type": "application/json", "authorization": "Bearer sk-x"})


def calls(n: int) -> list[Call]:
    out = []
    for i in range(n):
        body = {"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 200, "user": "u-1",
                "messages": [{"role": "system", "content": "You are a helpful assistant. " * 4},
                             {"role": "user", "content": f"Question number {i}: what is the answer?"}]}
        out.append(Call(request_id=str(i), operation="chat", body=body, model="gpt-4o-mini", stream=False,
                        headers=HEADERS, principal=PRINCIPAL, upstream_model="gpt-4o-mini"))
    return out


async def run(n: int, repeat: int) -> None:
    config = parse_config({"providers": {}, "models": [], "cache": {"max_size": n}}, env={})
    reply = Reply(ANSWER)
    reply.body()  # the upstream's bytes, as a relayed answer has them
    miss_best = hit_best = float("inf")
    for _ in range(repeat):
        cache = ResponseCache(config)
        batch = calls(n)
        start = time.perf_counter()
        for call in batch:
            cache.aiproxy_cache_lookup(call)  # in process: a plain function
            cache.aiproxy_cache_store(call, reply)
        miss_best = min(miss_best, time.perf_counter() - start)
        again = calls(n)
        start = time.perf_counter()
        for call in again:
            cache.aiproxy_cache_lookup(call)  # in process: a plain function
        hit_best = min(hit_best, time.perf_counter() - start)
        assert cache.hits == n and cache.misses == n, (cache.hits, cache.misses)
    print(f"lookup miss + store: {miss_best / n * 1e6:.2f} us/call")
    print(f"lookup hit:          {hit_best / n * 1e6:.2f} us/call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.repeat))


if __name__ == "__main__":
    main()
