"""End to end: a started ``aiproxy serve``, driven by the real ``openai`` SDK.

Three upstreams stand behind it: the built-in mock provider, a fake OpenAI-compatible
server and a fake Ollama (both real HTTP servers from :mod:`tests.fakes`). Streaming
timing and client-disconnect cancellation are only observable here, through sockets.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes import FakeOllama, FakeOpenAI
from tests.helpers import started_proxy, streamed_tool_call

REPO = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-fake-upstream-key"
TAG = "e2e-tag"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "required": ["location"], "properties": {
            "location": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}},
    },
}


@dataclass(frozen=True)
class Upstream:
    kind: str
    chat: str  # the model name a client sends for chat and completions
    embed: str
    dims: int  # embedding size it answers with
    listed: frozenset[str]  # names /v1/models must include for it
    owner: str


UPSTREAMS = {
    "mock": Upstream("mock", "mock-gpt", "mock-embed", 64, frozenset({"mock-gpt", "mock-extra"}), "mock"),
    "openai": Upstream("openai", "gpt-fake", "embed-fake", 16,
                       frozenset({"gpt-fake", "embed-fake", "openai/gpt-4o-mini"}), "openai"),
    "ollama": Upstream("ollama", "llama-fake", "nomic-fake", 16,
                       frozenset({"llama-fake", "nomic-fake", "ollama/llama3.2:latest",
                                  "ollama/nomic-embed-text:latest"}), "ollama"),
}


@dataclass
class Proxy:
    url: str
    openai_fake: FakeOpenAI
    ollama_fake: FakeOllama
    process: subprocess.Popen[bytes]
    log: Path

    def fake(self, kind: str) -> FakeOpenAI | FakeOllama:
        return self.openai_fake if kind == "openai" else self.ollama_fake


def _config(openai_fake: FakeOpenAI, ollama_fake: FakeOllama) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "access_log": False},
        "plugins": {"dir": str(REPO / "plugins")},
        "providers": {
            "mock": {"plugin": "mock", "options": {"models": ["mock-gpt", "mock-extra"]}},
            "openai": {"plugin": "openai", "api_base": f"{openai_fake.url}/v1", "api_key": UPSTREAM_KEY},
            "ollama": {"plugin": "ollama", "api_base": ollama_fake.url},
        },
        "models": [
            {"name": "mock-*", "provider": "mock"},
            {"name": "gpt-fake", "provider": "openai", "model": "gpt-4o-mini"},
            {"name": "gpt-impatient", "provider": "openai", "model": "gpt-4o-mini",
             "timeout": {"read": 0.3}},
            {"name": "embed-fake", "provider": "openai", "model": "text-embedding-3-small"},
            {"name": "openai/*", "provider": "openai", "model": "*"},
            {"name": "llama-fake", "provider": "ollama", "model": "llama3.2"},
            {"name": "nomic-fake", "provider": "ollama", "model": "nomic-embed-text"},
            {"name": "ollama/*", "provider": "ollama", "model": "*"},
        ],
        "request_tag": {"header": "x-aiproxy-tag", "value": TAG},
    }


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("e2e")
    with FakeOpenAI(api_key=UPSTREAM_KEY) as openai_fake, FakeOllama() as ollama_fake:
        with started_proxy(_config(openai_fake, ollama_fake), tmp) as started:
            yield Proxy(started.url, openai_fake, ollama_fake, started.process, started.log)


@pytest.fixture
def client(proxy: Proxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="anything", max_retries=0,
                       timeout=15.0) as c:
        yield c


@pytest.fixture(params=list(UPSTREAMS))
def upstream(request: pytest.FixtureRequest) -> Upstream:
    return UPSTREAMS[request.param]


def _marker() -> str:
    """A unique word to find this test's request among those a fake recorded."""
    return f"m{uuid.uuid4().hex[:12]}"


def _stream_text(stream: Any) -> tuple[str, list[Any]]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---------------------------------------------------------------- the basics, per upstream
def test_chat(client: openai.OpenAI, upstream: Upstream) -> None:
    r = client.chat.completions.create(model=upstream.chat,
                                       messages=[{"role": "user", "content": "Say hello to the proxy"}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_whole_answer(client: openai.OpenAI, upstream: Upstream) -> None:
    messages = [{"role": "user", "content": "Tell me a deterministic story"}]
    whole = client.chat.completions.create(model=upstream.chat, messages=messages)
    with client.chat.completions.create(model=upstream.chat, messages=messages, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        text, chunks = _stream_text(stream)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, "the last chunk must carry usage"
    assert whole.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion(client: openai.OpenAI, upstream: Upstream) -> None:
    r = client.completions.create(model=upstream.chat, prompt="Once upon a time")
    assert r.object == "text_completion"
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 0
    with client.completions.create(model=upstream.chat, prompt="Once upon a time", stream=True,
                                   stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6)
                                    for x, y in zip(a, b, strict=True))


def test_embeddings_base64_and_float(client: openai.OpenAI, upstream: Upstream) -> None:
    texts = ["first text", "second text"]
    packed = client.embeddings.create(model=upstream.embed, input=texts)  # the SDK asks for base64
    plain = client.embeddings.create(model=upstream.embed, input=texts, encoding_format="float")
    for r in (packed, plain):
        assert [d.index for d in r.data] == [0, 1]
        assert all(len(d.embedding) == upstream.dims for d in r.data)
        assert all(isinstance(v, float) for d in r.data for v in d.embedding)
    assert abs(sum(v * v for v in plain.data[0].embedding) - 1.0) < 1e-3
    for a, b in zip(packed.data, plain.data, strict=True):
        assert _close(list(a.embedding), list(b.embedding)), "base64 and float answers must agree"
    assert plain.data[0].embedding != plain.data[1].embedding
    assert plain.usage.prompt_tokens > 0


def test_models_list_and_retrieve(client: openai.OpenAI, upstream: Upstream) -> None:
    ids = {m.id for m in client.models.list()}
    assert upstream.listed <= ids, f"missing: {sorted(upstream.listed - ids)}"
    for name in sorted(upstream.listed):
        model = client.models.retrieve(name)
        assert model.id == name
        assert model.owned_by == upstream.owner


def test_tool_call_round_trip(proxy: Proxy, client: openai.OpenAI, upstream: Upstream) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=upstream.chat, messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)  # a JSON string, as OpenAI sends it
    assert isinstance(arguments, dict) and isinstance(arguments["location"], str)

    marker = _marker()
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": 21, "marker": marker})})
    second = client.chat.completions.create(model=upstream.chat, messages=messages, tools=[WEATHER_TOOL])
    answer = second.choices[0]
    assert answer.finish_reason == "stop"
    assert not answer.message.tool_calls
    assert answer.message.content and answer.message.content.strip()
    if upstream.kind != "mock":  # the fakes quote the tool result they were sent
        assert marker in answer.message.content
    if upstream.kind == "ollama":  # Ollama wants arguments as an object, not a JSON string
        sent = proxy.ollama_fake.with_text(marker)[0].body
        assistant = next(m for m in sent["messages"] if m.get("tool_calls"))
        assert assistant["tool_calls"][0]["function"]["arguments"] == arguments


def test_tool_call_streamed(client: openai.OpenAI, upstream: Upstream) -> None:
    with client.chat.completions.create(
            model=upstream.chat, messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER_TOOL], stream=True) as stream:
        chunks = list(stream)
    name, arguments, ids = streamed_tool_call(chunks)
    assert name == "get_weather"
    assert len(ids) == 1
    assert isinstance(json.loads(arguments)["location"], str)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == ["tool_calls"]


async def test_async_client_streams(proxy: Proxy, upstream: Upstream) -> None:
    messages = [{"role": "user", "content": "Async hello"}]
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="anything", max_retries=0,
                                  timeout=15.0) as client:
        whole = await client.chat.completions.create(model=upstream.chat, messages=messages)
        stream = await client.chat.completions.create(model=upstream.chat, messages=messages,
                                                      stream=True)
        async with stream:
            chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) >= 3
    assert all(c.usage is None for c in chunks), "no usage chunk unless include_usage is asked for"


@pytest.mark.parametrize("kind", ["openai", "ollama"])  # the mock sizes replies by its own option
def test_max_tokens_and_sampling_reach_the_upstream(proxy: Proxy, client: openai.OpenAI, kind: str) -> None:
    upstream = UPSTREAMS[kind]
    marker = _marker()
    r = client.chat.completions.create(
        model=upstream.chat, messages=[{"role": "user", "content": f"Count {marker}"}],
        max_tokens=2, temperature=0.25, top_p=0.5, seed=7, stop=["END"])
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 2
    assert len((r.choices[0].message.content or "").split()) == 2
    sent = proxy.fake(upstream.kind).with_text(marker)[0].body
    if upstream.kind == "ollama":
        assert sent.get("stream") is False
        options = sent["options"]
        assert options["num_predict"] == 2
        assert (options["temperature"], options["top_p"], options["seed"]) == (0.25, 0.5, 7)
        assert options["stop"] == ["END"]
    else:
        assert (sent["max_tokens"], sent["temperature"], sent["model"]) == (2, 0.25, "gpt-4o-mini")


# ---------------------------------------------------------------- errors through the SDK
def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize("model", ["openai/no-such-model", "ollama/no-such-model"])
def test_model_unknown_upstream_is_not_found(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(info.value.message)


def test_out_of_range_temperature_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="mock-gpt", temperature=5,
                                       messages=[{"role": "user", "content": "x"}])
    assert info.value.param == "temperature"
    assert isinstance(info.value.body, dict) and "temperature" in info.value.body["message"]


def test_rate_limit_passes_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"mock": {"error": 429, "retry_after": 1}})
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.response.headers.get("x-request-id")


def test_upstream_rate_limit_passes_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"fake": {"error": 429, "retry_after": 3}})
    assert info.value.response.headers["retry-after"] == "3"


# ---------------------------------------------------------------- streaming over sockets
def _timed_stream(create: Any) -> tuple[float, float, int]:
    """(seconds to the first chunk, seconds to the end, chunk count) of the stream ``create()``
    opens, both counted from before the request was sent."""
    start = time.monotonic()
    first = math.inf
    count = 0
    with create() as stream:
        for _ in stream:
            count += 1
            if count == 1:
                first = time.monotonic() - start
    return first, time.monotonic() - start, count


@pytest.mark.parametrize("kind", ["mock", "openai", "ollama"])
def test_first_chunk_is_not_buffered(proxy: Proxy, client: openai.OpenAI, kind: str) -> None:
    """Five words 300 ms apart: the first chunk must reach the client long before the last."""
    if kind == "mock":
        slow, configured = {"mock": {"chunk_delay_ms": 300, "tokens": 5}}, contextlib.nullcontext()
    else:
        options = {"chunks": 5, "chunk_delay_ms": 300}
        slow, configured = {"fake": options}, proxy.fake(kind).configured(**options)
    with configured:
        first, total, count = _timed_stream(lambda: client.chat.completions.create(
            model=UPSTREAMS[kind].chat, messages=[{"role": "user", "content": "slowly"}], stream=True,
            extra_body=slow))
    assert count >= 6  # at least the 5 words and a finish
    assert total >= 1.2, "the upstream sends its chunks 300 ms apart"
    assert first < total - 0.9, f"first chunk after {first:.2f}s of {total:.2f}s: buffered"


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_client_disconnect_cancels_upstream(proxy: Proxy, client: openai.OpenAI, kind: str) -> None:
    fake = proxy.fake(kind)
    model = UPSTREAMS[kind].chat
    marker = _marker()
    slow = {"chunks": 100, "chunk_delay_ms": 100}  # 10 s if nobody cancels it
    with fake.configured(**slow):
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"long story {marker}"}],
            stream=True, extra_body={"fake": slow})
        with stream:
            next(iter(stream))
        record = fake.wait_for(lambda r: marker in r.text(), timeout=2)
        assert record is not None and record.streamed
        assert record.done.wait(4), "the upstream stream went on after the client left"
    assert record.disconnected and not record.completed
    assert record.chunks_sent < record.chunks_total


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_streams_reuse_the_upstream_connection(proxy: Proxy, client: openai.OpenAI, kind: str) -> None:
    marker = _marker()
    for _ in range(3):
        with client.chat.completions.create(
                model=UPSTREAMS[kind].chat, messages=[{"role": "user", "content": f"again {marker}"}],
                stream=True) as stream:
            assert _stream_text(stream)[0]
    records = proxy.fake(kind).with_text(marker)
    assert len(records) == 3 and all(r.completed for r in records)
    ports = {r.client_port for r in records}
    assert len(ports) == 1, f"each stream opened a new upstream connection: ports {ports}"


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_plugin_header_reaches_upstream_and_client(proxy: Proxy, client: openai.OpenAI, kind: str) -> None:
    marker = _marker()
    raw = client.chat.completions.with_raw_response.create(
        model=UPSTREAMS[kind].chat, messages=[{"role": "user", "content": f"tag {marker}"}],
        extra_headers={"x-request-id": f"req-{marker}"})
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-aiproxy-tag"] == TAG
    assert raw.headers["x-request-id"] == f"req-{marker}"
    record = proxy.fake(kind).with_text(marker)[0]
    assert record.headers.get("x-aiproxy-tag") == TAG
    assert "anything" not in record.headers.get("authorization", ""), "client key leaked upstream"
    if kind == "openai":
        assert record.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_a_models_read_timeout_is_enforced_as_504(proxy: Proxy) -> None:
    """The per-model timeout reaches the shared upstream client: a slow upstream is cut off."""
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="anything", max_retries=0) as client:
        began = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="gpt-impatient",
                                           messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"fake": {"latency_ms": 3000}})
        took = time.monotonic() - began
        fast = client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}],
                                              extra_body={"fake": {"latency_ms": 600}})
    assert info.value.status_code == 504
    assert info.value.code == "upstream_timeout"
    assert took < 2.5
    assert fast.choices[0].message.content  # the provider's own, longer timeout still applies elsewhere


def test_server_logged_no_traceback(proxy: Proxy) -> None:
    """Runs last: nothing above may have made the gateway log an unexpected failure."""
    log = proxy.log.read_text()
    assert "Traceback" not in log and not re.search(r"\bERROR\b", log), log[-4000:]
    assert UPSTREAM_KEY not in log
