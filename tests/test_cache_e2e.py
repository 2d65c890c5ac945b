"""End to end: the real ``openai`` and ``anthropic`` SDKs against a started ``aiproxy serve``
with the response cache on (in process), in front of a fake OpenAI upstream (a real HTTP
server) that records every request it gets, so a hit is one request fewer there."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes import FakeOpenAI
from tests.fakes.server import spaced
from tests.helpers import started_proxy
from tests.metrics_support import Scrape

MASTER_KEY = "sk-gateway-master-cache-e2e"
OPENAI_KEY = "sk-fake-openai-key-cache"


@dataclass
class Proxy:
    url: str
    fake: FakeOpenAI
    log: Path


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("cache-e2e")
    with FakeOpenAI(api_key=OPENAI_KEY) as fake:
        config = {
            "server": {"host": "127.0.0.1", "master_key": MASTER_KEY},
            "plugins": {"dir": None},
            "providers": {"openai": {"plugin": "openai", "api_base": f"{fake.url}/v1",
                                     "api_key": OPENAI_KEY}},
            "models": [{"name": "gpt-fake", "provider": "openai", "model": "gpt-4o-mini"}],
            "cache": {"ttl_seconds": 600, "max_size": 100},
        }
        with started_proxy(config, tmp) as started:
            yield Proxy(started.url, fake, started.log)


@pytest.fixture
def client(proxy: Proxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=15.0) as c:
        yield c


def _messages() -> tuple[str, list[dict[str, Any]]]:
    marker = f"m{uuid.uuid4().hex[:12]}"
    return marker, [{"role": "user", "content": f"Tell me something, {marker}"}]


def _read(stream: Any) -> tuple[str, Any]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = next((c.usage for c in chunks if c.usage is not None), None)
    return text, usage


def test_a_stream_is_stored_then_replayed_as_a_stream(proxy: Proxy, client: openai.OpenAI) -> None:
    marker, messages = _messages()
    args: dict[str, Any] = {"model": "gpt-fake", "messages": messages, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}, "extra_body": {"fake": {"chunks": 9}}}
    first = client.chat.completions.with_raw_response.create(**args)
    assert first.headers["x-aiproxy-cache"] == "miss"
    text, usage = _read(first.parse())
    assert len(text.split()) == 9
    again = client.chat.completions.with_raw_response.create(**args)
    assert again.headers["x-aiproxy-cache"] == "hit"
    assert again.headers["content-type"].startswith("text/event-stream")
    replayed, replayed_usage = _read(again.parse())
    assert replayed == text
    assert replayed_usage is not None and usage is not None
    assert replayed_usage.model_dump() == usage.model_dump()
    whole = client.chat.completions.create(**{**args, "stream": False, "stream_options": None})
    assert whole.choices[0].message.content == text
    assert len(proxy.fake.with_text(marker)) == 1  # one upstream call served all three


def test_a_stream_the_client_left_is_not_stored(proxy: Proxy, client: openai.OpenAI) -> None:
    marker, messages = _messages()
    args: dict[str, Any] = {"model": "gpt-fake", "messages": messages, "temperature": 0, "stream": True,
                            "extra_body": {"fake": {"chunks": 30, "chunk_delay_ms": 40}}}
    with client.chat.completions.create(**args) as stream:
        next(iter(stream))
    assert proxy.fake.wait_for(lambda r: marker in r.text() and r.disconnected, timeout=10) is not None
    whole = client.chat.completions.with_raw_response.create(**args)
    assert whole.headers["x-aiproxy-cache"] == "miss"
    text, _ = _read(whole.parse())
    assert len(text.split()) == 30
    assert len(proxy.fake.with_text(marker)) == 2


def test_the_anthropic_sdk_gets_a_cached_answer_rewritten_as_a_message(proxy: Proxy) -> None:
    marker, _ = _messages()
    # this SDK has no temperature parameter: a client sends it as an extra field
    args: dict[str, Any] = {"model": "gpt-fake", "max_tokens": 100, "extra_body": {"temperature": 0},
                            "messages": [{"role": "user", "content": f"Anthropic asks, {marker}"}]}
    with anthropic.Anthropic(base_url=proxy.url, api_key=MASTER_KEY, max_retries=0, timeout=15.0) as client:
        first = client.messages.with_raw_response.create(**args)
        assert first.headers["x-aiproxy-cache"] == "miss"
        message = first.parse()
        hit = client.messages.with_raw_response.create(**args)
        assert hit.headers["x-aiproxy-cache"] == "hit"
        cached = hit.parse()
        assert cached.type == "message" and cached.model == "gpt-fake"
        assert [b.model_dump() for b in cached.content] == [b.model_dump() for b in message.content]
        assert cached.usage.input_tokens == message.usage.input_tokens > 0
        assert cached.usage.output_tokens == message.usage.output_tokens > 0
        assert cached.id != message.id
        with client.messages.stream(**args) as stream:  # the same request streamed: replayed
            final = stream.get_final_message()
        assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]
        assert final.stop_reason == message.stop_reason == "end_turn"
        assert final.usage.output_tokens == message.usage.output_tokens
    assert len(proxy.fake.with_text(marker)) == 1
    assert "Traceback" not in proxy.log.read_text()


def _flight_waits(proxy: Proxy) -> float:
    scrape = Scrape(httpx.get(f"{proxy.url}/metrics", headers={"authorization": f"Bearer {MASTER_KEY}"},
                              timeout=5).text)
    return scrape.value("aiproxy_cache_flight_waits_total") or 0.0


def _until(ready: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_identical_requests_at_once_make_one_upstream_call(proxy: Proxy, client: openai.OpenAI) -> None:
    marker, messages = _messages()
    args: dict[str, Any] = {"model": "gpt-fake", "messages": messages, "temperature": 0,
                            "extra_body": {"fake": {"latency_ms": 400}}}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.chat.completions.with_raw_response.create(**args), range(8)))
    assert len(proxy.fake.with_text(marker)) == 1
    assert sorted(a.headers["x-aiproxy-cache"] for a in answers) == ["hit"] * 7 + ["miss"]
    assert len({a.parse().choices[0].message.content for a in answers}) == 1
    assert {a.parse().usage.total_tokens for a in answers} == {answers[0].parse().usage.total_tokens}


def test_a_streaming_leader_whose_client_leaves_hands_over_to_a_follower(
        proxy: Proxy, client: openai.OpenAI) -> None:
    """The leader's client reads one event and leaves: the proxy cuts that stream (not
    stored) and one of the (whole) requests waiting for it goes upstream for the others."""
    marker, messages = _messages()
    args: dict[str, Any] = {"model": "gpt-fake", "messages": messages, "temperature": 0, "stream": True,
                            "extra_body": {"fake": {"chunks": 30, "chunk_delay_ms": 40}}}
    whole = {**args, "stream": False}
    before = _flight_waits(proxy)
    with ThreadPoolExecutor(4) as pool:
        with client.chat.completions.create(**args) as stream:
            next(iter(stream))
            followers = [pool.submit(lambda: client.chat.completions.create(**whole)) for _ in range(4)]
            _until(lambda: _flight_waits(proxy) >= before + 4)
        texts = [f.result(timeout=20).choices[0].message.content or "" for f in followers]
    assert len(set(texts)) == 1 and len(texts[0].split()) == 30
    assert len(proxy.fake.with_text(marker)) == 2  # the leader's, cut; then one for the four


def test_a_streaming_duplicate_gets_its_first_token_while_the_leader_streams(
        proxy: Proxy, client: openai.OpenAI) -> None:
    """A stream identical to one in flight does not wait for that one's whole answer (its
    first token would come with the leader's last): it makes its own upstream call."""
    marker, messages = _messages()
    args: dict[str, Any] = {"model": "gpt-fake", "messages": messages, "temperature": 0, "stream": True,
                            "extra_body": {"fake": {"chunks": 30, "chunk_delay_ms": 100}}}
    with client.chat.completions.create(**args) as leader:
        next(iter(leader))  # the leader streams: some 3 s to go upstream
        began = time.monotonic()
        with client.chat.completions.with_streaming_response.create(**args) as duplicate:
            assert duplicate.headers["x-aiproxy-cache"] == "miss"
            next(iter(duplicate.parse()))
            took = time.monotonic() - began
            (first, *_) = proxy.fake.with_text(marker)
            assert not first.completed, "the leader's upstream call is over: it was waited for"
    assert took < 2.0, took
    assert len(proxy.fake.with_text(marker)) == 2


# ---------------------------------------------------------------- what a replay carries
@dataclass
class Read:
    """What a client reading a chat stream's deltas gets."""

    content: str
    reasoning: str
    refusal: str
    tool_calls: list[tuple[str, str, str]]  # (id, name, arguments), by index
    logprobs: list[str]  # the tokens
    finish: list[str]
    fingerprints: set[str]
    usage: Any


def _read_all(stream: Any) -> Read:
    content, reasoning, refusal, tokens, finish = [], [], [], [], []
    calls: dict[int, list[str]] = {}
    fingerprints, usage = set(), None
    for c in stream:
        fingerprints.add(c.system_fingerprint)
        usage = c.usage or usage
        for choice in c.choices:
            d = choice.delta
            content.append(d.content or "")
            reasoning.append(getattr(d, "reasoning_content", None) or "")
            refusal.append(d.refusal or "")
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, ["", "", ""])
                slot[0] += tc.id or ""
                slot[1] += tc.function.name or "" if tc.function else ""
                slot[2] += tc.function.arguments or "" if tc.function else ""
            if choice.logprobs and choice.logprobs.content:
                tokens += [t.token for t in choice.logprobs.content]
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    return Read("".join(content), "".join(reasoning), "".join(refusal),
                [(i, n, a) for _, (i, n, a) in sorted(calls.items())], tokens, finish, fingerprints, usage)


def _miss_then_hit(proxy: Proxy, client: openai.OpenAI, script: list[dict[str, Any]]) -> tuple[Read, Read]:
    marker, messages = _messages()
    args: dict[str, Any] = {"model": "gpt-fake", "messages": messages, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    with proxy.fake.configured(script=script):
        first = client.chat.completions.with_raw_response.create(**args)
        assert first.headers["x-aiproxy-cache"] == "miss"
        original = _read_all(first.parse())
    again = client.chat.completions.with_raw_response.create(**args)
    assert again.headers["x-aiproxy-cache"] == "hit"
    assert len(proxy.fake.with_text(marker)) == 1
    return original, _read_all(again.parse())


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_a_replayed_stream_carries_reasoning_tool_calls_and_the_fingerprint(
        proxy: Proxy, client: openai.OpenAI) -> None:
    """DeepSeek-style reasoning deltas, text, then two tool calls whose arguments come in
    many pieces: the stream replayed from the cache reads the same."""
    first_args, second_args = '{"city": "Paris", "unit": "celsius"}', '{"tz": "Europe/Paris"}'
    script: list[dict[str, Any]] = [{"delta": {"role": "assistant", "content": "", "reasoning_content": ""}}]
    script += [{"delta": {"reasoning_content": p}} for p in spaced("The user wants weather and time".split())]
    script += [{"delta": {"content": p}} for p in spaced("Let me look both up.".split())]
    for i, (call_id, name, arguments) in enumerate([("call_w", "get_weather", first_args),
                                                     ("call_t", "get_time", second_args)]):
        script.append({"delta": {"tool_calls": [{"index": i, "id": call_id, "type": "function",
                                                 "function": {"name": name, "arguments": ""}}]}})
        script += [{"delta": {"tool_calls": [{"index": i, "function": {"arguments": p}}]}}
                   for p in _pieces(arguments, 4)]
    script.append({"delta": {}, "finish_reason": "tool_calls"})
    original, replayed = _miss_then_hit(proxy, client, script)
    assert original.reasoning == "The user wants weather and time"
    assert original.content == "Let me look both up."
    assert original.tool_calls == [("call_w", "get_weather", first_args), ("call_t", "get_time", second_args)]
    assert original.fingerprints == {"fp_fake"} and original.finish == ["tool_calls"]
    assert replayed == original


def test_a_replayed_refusal_reads_the_same(proxy: Proxy, client: openai.OpenAI) -> None:
    script: list[dict[str, Any]] = [{"delta": {"role": "assistant", "content": None, "refusal": ""}}]
    script += [{"delta": {"refusal": p}} for p in spaced("I can't help with that.".split())]
    script.append({"delta": {}, "finish_reason": "stop"})
    original, replayed = _miss_then_hit(proxy, client, script)
    assert original.refusal == "I can't help with that." and original.content == ""
    assert replayed == original


def test_a_long_reasoning_stream_folded_on_the_way_replays_whole(proxy: Proxy, client: openai.OpenAI) -> None:
    """Far past the gateway's fold (every 128 events): the stored answer is all of it."""
    thoughts = [f"thought{n} " for n in range(400)]
    words = [f"word{n} " for n in range(300)]
    script: list[dict[str, Any]] = [{"delta": {"role": "assistant", "content": ""}}]
    script += [{"delta": {"reasoning_content": t}} for t in thoughts]
    script += [{"delta": {"content": w}} for w in words]
    script.append({"delta": {}, "finish_reason": "stop"})
    original, replayed = _miss_then_hit(proxy, client, script)
    assert (original.reasoning, original.content) == ("".join(thoughts), "".join(words))
    assert replayed == original


def test_the_anthropic_sdk_gets_replayed_reasoning_as_thinking(proxy: Proxy) -> None:
    """Through translation and the cache: a client that turned thinking on reads the same
    thinking and text blocks from the replayed stream as from the original."""
    marker, _ = _messages()
    script: list[dict[str, Any]] = [{"delta": {"role": "assistant", "content": ""}}]
    script += [{"delta": {"reasoning_content": p}} for p in spaced("First I consider it".split())]
    script += [{"delta": {"content": p}} for p in spaced("The answer is 4.".split())]
    script.append({"delta": {}, "finish_reason": "stop"})
    args: dict[str, Any] = {"model": "gpt-fake", "max_tokens": 2000, "extra_body": {"temperature": 0},
                            "thinking": {"type": "enabled", "budget_tokens": 1024},
                            "messages": [{"role": "user", "content": f"Think, {marker}"}]}
    with anthropic.Anthropic(base_url=proxy.url, api_key=MASTER_KEY, max_retries=0, timeout=15.0) as client:
        with proxy.fake.configured(script=script), client.messages.stream(**args) as stream:
            original = stream.get_final_message()
        with client.messages.stream(**args) as stream:
            replayed = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in original.content] == [
        ("thinking", "First I consider it"), ("text", "The answer is 4.")]
    assert [b.model_dump() for b in replayed.content] == [b.model_dump() for b in original.content]
    assert len(proxy.fake.with_text(marker)) == 1
