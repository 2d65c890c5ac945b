"""Single flight: identical cacheable misses at the same time share one upstream call.

The fake upstream holds chosen calls until the test lets them go, so the others arrive
while the first is in flight; every call is numbered ("answer n"), so a shared answer is
told from a second upstream call.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.cache_support import (
    DET,
    KEYS,
    Upstream,
    auth,
    config,
    content,
    gateway,
    lined_up,
    post_then_leave,
    start,
    streamed_text,
    until,
)
from tests.conftest import make_config

N = 12  # identical requests at once


async def test_concurrent_identical_misses_share_one_upstream_call() -> None:
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream()
        calls = [start(g, DET) for _ in range(N)]
        await until(lambda: up.calls == 1 and g.cache.flights.waits == N - 1)
        assert up.calls == 1  # the others wait, they do not call
        up.gate.set()
        answers = await asyncio.gather(*calls)
        assert g.chat.call_count == 1
        assert {content(r) for r in answers} == {"answer 1"}
        assert sorted(r.headers["x-aiproxy-cache"] for r in answers) == ["hit"] * (N - 1) + ["miss"]
        assert len({r.json()["id"] for r in answers}) == N  # each answer its own id, as a hit has
        for r in answers:  # the followers are hits: the stored usage, priced as a hit is
            assert r.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        stats = g.cache.aiproxy_stats()
        assert stats["aiproxy_cache_hits_total"] == N - 1 and stats["aiproxy_cache_misses_total"] == 1
        assert stats["aiproxy_cache_flight_shared_total"] == N - 1 and stats["aiproxy_cache_flights"] == 0
        later = await g.post(DET, "a2")  # and it is stored, as any answer is
        assert content(later) == "answer 1" and later.headers["x-aiproxy-cache"] == "hit"


async def test_single_flight_false_lets_every_miss_call_the_upstream() -> None:
    async with gateway(config({"single_flight": False})) as g:
        g.chat.side_effect = up = Upstream(hold=range(1, N + 1))
        calls = [start(g, DET) for _ in range(N)]
        await until(lambda: up.calls == N)
        up.gate.set()
        answers = await asyncio.gather(*calls)
        assert sorted(content(r) for r in answers) == sorted(f"answer {n}" for n in range(1, N + 1))
        assert {r.headers["x-aiproxy-cache"] for r in answers} == {"miss"}


async def test_tenants_never_share_a_flight() -> None:
    """Keys of one tenant share one call; another tenant, a key of no tenant, and anonymous
    callers each make their own."""
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream(hold=range(1, 6))
        names = ["a1", "a2", "b1", "solo1", "solo2", None] * 3
        calls = [start(g, DET, name) for name in names]
        await until(lambda: up.calls == 5)  # tenant-a, tenant-b, solo1, solo2, anonymous
        await until(lambda: g.cache.flights.waits == len(names) - 5)
        up.gate.set()
        got: dict[str | None, set[str]] = {}
        for name, r in zip(names, await asyncio.gather(*calls), strict=True):
            got.setdefault(KEYS[name][1] or name if name else None, set()).add(content(r))
        assert g.chat.call_count == 5
        assert all(len(answers) == 1 for answers in got.values()), got  # one answer per scope
        assert len(set().union(*got.values())) == 5, got  # and no scope got another's


@pytest.mark.parametrize("stream", [False, True])
async def test_a_leader_that_fails_leaves_its_followers_to_call_upstream_themselves(stream: bool) -> None:
    """The leader whole or streamed; its followers whole (a stream does not follow)."""
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream(fail=[1])
        leader, followers = await lined_up(g, up, {**DET, "stream": stream}, N - 1)
        up.gate.set()
        assert (await leader).status_code >= 500
        answers = await asyncio.gather(*followers)
        # each went upstream itself, at once (not one after another's failure)
        assert sorted(content(r) for r in answers) == sorted(f"answer {n}" for n in range(2, N + 1))
        assert {r.headers["x-aiproxy-cache"] for r in answers} == {"miss"}
        assert g.chat.call_count == N and g.cache.aiproxy_stats()["aiproxy_cache_flights"] == 0


async def test_a_stream_cut_short_is_not_shared_its_followers_call_upstream_themselves() -> None:
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream(cut=[1])
        body = {**DET, "stream": True}
        leader, followers = await lined_up(g, up, body, 3)
        up.gate.set()
        assert streamed_text(await leader) == "streamed answer 1"  # the client got what came
        answers = await asyncio.gather(*followers)
        assert sorted(content(r) for r in answers) == [f"answer {n}" for n in (2, 3, 4)]
        assert g.chat.call_count == 4


async def test_a_streaming_leader_answers_its_whole_followers() -> None:
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream()
        stream = {**DET, "stream": True, "stream_options": {"include_usage": True}}
        leader, wholes = await lined_up(g, up, stream, 4)
        wholes += [start(g, DET, "a2") for _ in range(4)]
        await until(lambda: g.cache.flights.waits == 8)
        up.gate.set()
        assert streamed_text(await leader) == "streamed answer 1"
        for r in await asyncio.gather(*wholes):
            assert r.headers["x-aiproxy-cache"] == "hit"
            assert content(r) == "streamed answer 1" and r.json()["usage"]["total_tokens"] == 8
        assert g.chat.call_count == 1


@pytest.mark.parametrize("leader_streams", [True, False])
async def test_a_streaming_duplicate_does_not_wait_for_the_leader(leader_streams: bool) -> None:
    """Replaying the leader's answer would bring a stream's first token only with the
    leader's last: a streaming duplicate goes upstream at once, as a miss, while the leader
    is still held there; the leader stays, and its whole followers still get its answer."""
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream()
        stream = {**DET, "stream": True, "stream_options": {"include_usage": True}}
        leader, wholes = await lined_up(g, up, stream if leader_streams else DET, 2)
        own = await asyncio.wait_for(start(g, stream, "a2"), timeout=5)  # the leader still held
        assert not leader.done() and not any(w.done() for w in wholes)
        assert own.headers["x-aiproxy-cache"] == "miss"
        assert own.headers["content-type"].startswith("text/event-stream")
        assert streamed_text(own) == "streamed answer 2" and up.calls == 2
        again = await start(g, stream)  # and, a plain miss, it was stored
        assert again.headers["x-aiproxy-cache"] == "hit" and streamed_text(again) == "streamed answer 2"
        stats = g.cache.aiproxy_stats()
        assert stats["aiproxy_cache_flight_waits_total"] == 2 and stats["aiproxy_cache_flights"] == 1
        up.gate.set()
        first = "streamed answer 1" if leader_streams else "answer 1"
        read = streamed_text if leader_streams else content
        assert read(await leader) == first
        assert [content(r) for r in await asyncio.gather(*wholes)] == [first] * 2  # the leader's
        assert g.cache.aiproxy_stats()["aiproxy_cache_flights"] == 0


async def test_a_streaming_leader_cancelled_outright_hands_the_flight_to_one_follower() -> None:
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream()
        leader, followers = await lined_up(g, up, {**DET, "stream": True}, N - 1)
        leader.cancel()  # as at shutdown: no 499, no on-error, the task just ends
        answers = await asyncio.gather(*followers)
        assert up.cancelled == 1
        # one new leader; the rest its hits
        assert {content(r) for r in answers} == {"answer 2"}
        assert sorted(r.headers["x-aiproxy-cache"] for r in answers) == ["hit"] * (N - 2) + ["miss"]
        assert up.calls == 2


async def test_a_whole_leader_cancelled_outright_hands_the_flight_to_one_follower() -> None:
    """Cancelled as at shutdown: the gateway still runs on-error for it (503
    gateway_shutting_down, so its reservations are given back), and the cache hands its
    flight on at once rather than leaving its followers to wait out their patience."""
    async with gateway(config({"single_flight_wait": 30})) as g:
        g.chat.side_effect = up = Upstream()
        leader, followers = await lined_up(g, up, DET, 3)
        leader.cancel()
        began = time.monotonic()
        answers = await asyncio.gather(*followers)
        assert time.monotonic() - began < 5  # not the 30 s of patience
        assert [content(r) for r in answers] == ["answer 2"] * 3
        assert sorted(r.headers["x-aiproxy-cache"] for r in answers) == ["hit", "hit", "miss"]
        assert up.calls == 2
        assert g.cache.aiproxy_stats()["aiproxy_cache_flights"] == 0


async def test_a_stream_not_stored_does_not_hold_up_the_next_call_of_its_task() -> None:
    """In one task (an in-process client), a streaming leader that ended with neither store
    nor on-error is over once the next call of that task comes: that one does not wait."""
    async with gateway(config()) as g:
        g.chat.side_effect = Upstream(hold=(), cut=[1])
        assert streamed_text(await g.post({**DET, "stream": True})) == "streamed answer 1"
        began = time.monotonic()
        r = await g.post(DET)
        assert content(r) == "answer 2" and r.headers["x-aiproxy-cache"] == "miss"
        assert time.monotonic() - began < 1.5
        assert content(await g.post(DET)) == "answer 2"  # which leads, and is stored
        assert g.cache.aiproxy_stats()["aiproxy_cache_flights"] == 0


async def test_a_leader_whose_client_leaves_hands_the_flight_to_one_follower() -> None:
    async with gateway(config()) as g:
        g.chat.side_effect = up = Upstream()
        leave = asyncio.Event()
        leader = asyncio.ensure_future(post_then_leave(g.app, DET, auth("a1"), leave))
        await until(lambda: up.calls == 1)
        followers = [start(g, DET, "a2") for _ in range(N - 1)]
        await until(lambda: g.cache.flights.waits == N - 1)
        leave.set()
        assert await leader == 499
        answers = await asyncio.gather(*followers)
        assert up.cancelled == 1  # the leader's upstream call was cut: nobody waits for it now
        assert {content(r) for r in answers} == {"answer 2"}
        assert up.calls == 2


async def test_a_follower_waits_no_longer_than_single_flight_wait() -> None:
    async with gateway(config({"single_flight_wait": 0.2})) as g:
        g.chat.side_effect = up = Upstream()
        leader, followers = await lined_up(g, up, DET, 3)
        began = time.monotonic()
        answers = await asyncio.gather(*followers)
        took = time.monotonic() - began
        assert 0.15 < took < 1.5, took
        assert sorted(content(r) for r in answers) == ["answer 2", "answer 3", "answer 4"]
        assert g.cache.aiproxy_stats()["aiproxy_cache_flight_timeouts_total"] == 3
        # a call arriving now follows one of those, not the stuck first one
        late = start(g, DET)
        await until(lambda: g.cache.flights.waits == 4 or late.done())
        assert content(await late) in {"answer 2", "answer 3", "answer 4", "answer 5"}
        up.gate.set()
        assert content(await leader) == "answer 1"


async def test_a_follower_waits_no_longer_than_its_own_timeout() -> None:
    """Its deployment's read timeout bounds a follower's wait (60 s by default); the fake
    upstream does not apply it, so the leader held there waits on."""
    models = [{"name": "gpt-test", "provider": "openai", "model": "gpt-4o-mini", "timeout": {"read": 0.2}}]
    cfg = make_config(keys={"declared": [{"name": "a1", "key": KEYS["a1"][0], "tenant": "tenant-a"}]},
                      models=models)
    async with gateway(cfg) as g:
        g.chat.side_effect = up = Upstream()
        leader, [whole] = await lined_up(g, up, DET, 1)
        began = time.monotonic()
        assert content(await whole) == "answer 2"
        assert 0.15 < time.monotonic() - began < 1.5
        assert g.cache.aiproxy_stats()["aiproxy_cache_flight_timeouts_total"] == 1
        up.gate.set()
        assert content(await leader) == "answer 1"
