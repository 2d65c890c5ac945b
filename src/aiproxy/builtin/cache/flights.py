"""Single flight: identical cacheable calls that miss at the same time share one upstream call.

The first miss for a cache key *leads*: it goes upstream as any miss does. A whole-answer
miss for the same key while the leader is in flight *follows*: it waits (bounded) for the
leader's stored answer and is served it as a hit. A streaming miss does not follow (the
cache stage sends it upstream at once; the leader stays): its first token would otherwise
come only with the leader's last. The key names the tenant, so a call only ever follows a
call of its own tenant. Per process: with Redis, replicas (and workers) each lead their own.

How a leader's flight ends (cache-store lands it, on-error when it failed, and for a
stream the end of its task, which may come with neither), and what its followers do:

- its answer is stored: they get it (the bytes, parsed anew by each);
- it failed, or its answer is not stored (an error, a fallback's answer, a stream cut
  short or without a finish): each goes upstream itself, as it would have without
  single flight (one by one after each other's failures would multiply the wait);
- it left (its client went away, 499; a stream's task cancelled outright): they contend
  again, the first to wake leads and the others follow it, with what is left of their
  patience;
- it takes longer than a follower's patience (a whole answer's leader cancelled outright,
  at shutdown, says nothing and ends up here too): that follower goes upstream and leads
  the calls that arrive after it (the slow leader still answers those already waiting).

A miss that leads costs one dict operation and one more when it lands; a hit, nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

#: What a flight ends with: the stored answer's bytes, or one of these two.
UPSTREAM = "upstream"  # no answer for the followers: each goes upstream itself
AGAIN = "again"  # the leader left before its answer: one follower leads instead
Outcome = bytes | str


@dataclass(slots=True, eq=False)
class Pending:
    """What lookup decided, for store: where the answer goes, for how long, and the
    upstream model the key names (an answer from another one, a fallback's, is not
    stored). While ``lead``, it is its key's flight, run by ``task`` (a stream, whose end
    ``ended`` watches); ``waiters`` exists once a call follows it; ``outcome`` is how it
    ended, and ``successor`` the call its followers follow next when that was :data:`AGAIN`."""

    key: str
    ttl: float
    model: str | None
    lead: bool = False
    task: asyncio.Task[Any] | None = None
    ended: Callable[[asyncio.Task[Any]], None] | None = None
    waiters: asyncio.Future[None] | None = None
    outcome: Outcome | None = None
    successor: Pending | None = None


class Flights:
    """The leaders in flight in this process, by cache key; counts for metrics."""

    def __init__(self) -> None:
        self._leaders: dict[str, Pending] = {}
        self.waits = 0  # misses that followed a leader
        self.shared = 0  # of those, served the leader's stored answer
        self.timeouts = 0  # of those, out of patience: went upstream

    def __len__(self) -> int:
        return len(self._leaders)

    def leader(self, pending: Pending) -> Pending | None:
        """The call ``pending``'s call should follow; None when it leads (it is made leader).

        One dict operation: this is every miss's cost when nothing else is in flight."""
        leader = self._leaders.setdefault(pending.key, pending)
        if leader is pending:
            pending.lead = True
            return None
        return leader

    def _lead(self, pending: Pending) -> None:
        self._leaders[pending.key] = pending
        pending.lead = True

    def watch(self, pending: Pending, how: Callable[[], Outcome]) -> None:
        """Land leader ``pending`` with ``how()`` when its task ends, unless it landed before
        (a stream can end without reaching store or on-error: cut by its client, or not
        worth storing). A request is one task (uvicorn, hypercorn, Starlette's routes); the
        watch goes when the flight lands, so a task that runs many (an in-process client)
        does not hold them all."""
        task = asyncio.current_task()
        if task is not None:
            pending.task = task
            pending.ended = partial(self._ended, pending, how)
            task.add_done_callback(pending.ended)

    async def follow(self, pending: Pending, leader: Pending, patience: float) -> bytes | None:
        """Wait up to ``patience`` seconds for ``leader``'s stored answer and return it;
        None when this call must go upstream itself (then it may be the leader now).

        A follower whose client leaves is cancelled here; the flight goes on for the rest.
        """
        if leader.task is not None and leader.task is asyncio.current_task():
            self._lead(pending)  # an earlier call of this same task, so over: it left no word
            return None
        self.waits += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            if leader.outcome is None:
                waiters = leader.waiters
                if waiters is None:
                    waiters = leader.waiters = loop.create_future()
                # asyncio.wait, not wait_for: a follower that gives up must not cancel the future
                await asyncio.wait((waiters,), timeout=max(0.0, deadline - loop.time()))
            outcome = leader.outcome
            if outcome is None:
                self.timeouts += 1
                if self._leaders.get(pending.key) is leader:  # later arrivals follow this call
                    self._lead(pending)
                return None
            if isinstance(outcome, bytes):
                self.shared += 1
                return outcome
            if outcome != AGAIN:
                return None
            # the first follower to wake leads (or follows a call that arrived since); the
            # rest follow that one, even if it has already landed by the time they wake
            successor = leader.successor
            if successor is None:
                successor = leader.successor = self._leaders.get(pending.key)
                if successor is None:
                    self._lead(pending)
                    leader.successor = pending
                    return None
            leader = successor

    def land(self, pending: Pending, outcome: Outcome) -> None:
        """End ``pending``'s flight: its followers get ``outcome``."""
        pending.lead = False
        pending.outcome = outcome
        current = self._leaders.pop(pending.key, None)
        if current is not pending and current is not None:  # a follower took over: it stays
            self._leaders[pending.key] = current
        waiters = pending.waiters
        if waiters is not None and not waiters.done():
            waiters.set_result(None)
        task, ended = pending.task, pending.ended
        if task is not None and ended is not None:  # a stream's watch on its task: done with
            task.remove_done_callback(ended)
            pending.task = pending.ended = None

    def _ended(self, pending: Pending, how: Callable[[], Outcome], task: asyncio.Task[Any]) -> None:
        if pending.lead:
            self.land(pending, how())
