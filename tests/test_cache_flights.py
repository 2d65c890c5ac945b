"""Single flight's edges: what a flight leaves behind once it lands, a store that fails,
a follower whose client leaves (the gateway-level cases are in test_cache_single_flight)."""

from __future__ import annotations

import sys

from aiproxy.builtin.cache.flights import UPSTREAM, Flights, Pending


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
