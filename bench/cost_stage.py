"""Micro-benchmark: the cost stage's after-call per call, in process.

    .venv/bin/python bench/cost_stage.py

Each case runs the stage object's after-call directly (no HTTP, no upstream) on a call
served by a real Router deployment (openai kind, gpt-4o-mini); the best of 15 rounds of
20,000 calls is reported in µs per call, the loop and the Call alone subtracted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from starlette.datastructures import Headers

from aiproxy.app import build_providers
from aiproxy.builtin.cost import CostStage
from aiproxy.call import Call, Principal, Usage
from aiproxy.config import parse_config
from aiproxy.hooks import Hooks
from aiproxy.plugins import build_plugin_manager, provider_kinds
from aiproxy.router import Router

BODY = {"model": "gpt", "messages": [{"role": "user", "content": "Say hello in one short sentence."}]}
MODELS = [{"name": "gpt", "provider": "openai", "model": "gpt-4o-mini"},
          {"name": "priced", "provider": "openai", "model": "gpt-4o-mini",
           "price": {"input": 1, "output": 2}}]
CASES: dict[str, tuple[str, dict[str, Any], bool, Usage]] = {
    "built-in price, no alerts": ("gpt", {}, False, Usage(1234, 56, 1290, 1024)),
    "models entry price, no alerts": ("priced", {}, False, Usage(20, 12, 32)),
    "built-in price + spend tracking (in process)": ("gpt", {"alert_threshold_usd": 10**9}, False,
                                                    Usage(1234, 56, 1290, 1024)),
    "stream (no header)": ("gpt", {}, True, Usage(20, 12, 32)),
}


async def run(model: str, section: dict[str, Any], stream: bool, usage: Usage, n: int = 20_000) -> float:
    config = parse_config({"plugins": {"dir": None},
                           "providers": {"openai": {"plugin": "openai", "api_key": "sk-x"}},
                           "models": MODELS, "cost": section}, env={})
    stage = CostStage(config)
    async with httpx.AsyncClient() as http:
        kinds = provider_kinds(Hooks(build_plugin_manager(config), config.section))
        providers, _ = build_providers(config, kinds, http, quiet=True)
        deployment = Router(config.models, providers, {}).pick(model)
    headers = Headers({})
    principal = Principal(id="key_1", tenant="acme")

    def new() -> Call:
        return Call(request_id="r", operation="chat", body=BODY, model=model, stream=stream,
                    headers=headers, principal=principal, deployment=deployment,
                    upstream_model="gpt-4o-mini", usage=usage)

    best = baseline = float("inf")
    for _ in range(15):
        start = time.perf_counter()
        for _ in range(n):
            stage.aiproxy_after_call(new())
        best = min(best, time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(n):
            new()
        baseline = min(baseline, time.perf_counter() - start)
    return (best - baseline) / n * 1e6


async def main() -> None:
    for name, case in CASES.items():
        print(f"{name:48s} {await run(*case):6.2f} µs/call")


if __name__ == "__main__":
    asyncio.run(main())
