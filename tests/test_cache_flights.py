"""Single flight's edges: what a flight leaves behind once it lands, a store that fails,
a follower whose client leaves (the gateway-level cases are in test_cache_single_flight)."""

from __future__ import annotations

import asyncio
import sys

from aiproxy.builtin.cache.flights import UPSTREAM, Flights, Pending
from tests.cache_support import (
    DET,
    Upstream,
    auth,
    config,
    content,
    gateway,
    lined_up,
    post_then_leave,
    until,
)


async def test_a_landed_streaming_leader_leaves_nothing_on_its_task() -> None:
    """A streaming leader watches its task's end; once it lands, the watch goes, or a task
    that runs many requests (an in-process client) would hold every such call, and its
    stored answer, until it ends."""
    flights = Flights()
    pending = Pending("key", 60.0, "gpt-4o-mini")
    alone = sys.getrefcount(pending)
    assert flights.leader(pending) is None
    flights.watch(pending, lambda: UPSTREAM)
    flights.land(pending, b'{"answer": 1}')
    assert sys.getrefcount(pending) == alone
    assert len(flights) == 0


async def test_a_leader_whose_store_fails_still_releases_its_followers() -> None:
    """The answer could not be stored (the backend raised): the followers hear it at once
    and go upstream themselves, instead of waiting out their patience."""
    async with gateway(config({"single_flight_wait": 30})) as g:
        g.chat.side_effect = up = Upstream()

        def broken(key: str, raw: bytes, ttl: float) -> None:
            raise RuntimeError("the backend broke")

        g.cache.memory.set = broken  # type: ignore[method-assign]
        leader, followers = await lined_up(g, up, DET, 3)
        up.gate.set()
        assert content(await leader) == "answer 1"
        answers = await asyncio.wait_for(asyncio.gather(*followers), timeout=10)
        assert sorted(content(r) for r in answers) == ["answer 2", "answer 3", "answer 4"]
        stats = g.cache.aiproxy_stats()
        assert stats["aiproxy_cache_flight_timeouts_total"] == 0 and stats["aiproxy_cache_flights"] == 0


async def test_a_follower_whose_client_leaves_does_not_disturb_the_others() -> None:
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream()
        leader, followers = await lined_up(g, up, DET, 3)
        leave = asyncio.Event()
        gone = asyncio.ensure_future(post_then_leave(g.app, DET, auth("a2"), leave))
        await until(lambda: g.cache.flights.waits == 4)
        leave.set()
        assert await gone == 499
        await asyncio.sleep(0.05)  # the others keep waiting for the leader, none goes upstream
        assert up.calls == 1 and not any(f.done() for f in followers)
        up.gate.set()
        answers = await asyncio.gather(leader, *followers)
        assert {content(r) for r in answers} == {"answer 1"} and up.calls == 1
