"""End to end: the real ``anthropic`` SDK against a started ``aiproxy serve`` on ``/v1/messages``.

The same Anthropic-SDK code reaches three kinds of model: the built-in mock, an
OpenAI-compatible upstream and a Claude model behind the ``anthropic`` provider (both
fakes are real HTTP servers from :mod:`tests.fakes`). The SDK's ``messages.stream()``
helper checks the event order strictly and rebuilds the final message from the events.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.fakes import FakeAnthropic, FakeOpenAI
from tests.helpers import started_proxy

REPO = Path(__file__).resolve().parent.parent
MASTER_KEY = "sk-gateway-master-e2e"
OPENAI_KEY = "sk-fake-openai-key"
ANTHROPIC_KEY = "sk-ant-fake-upstream-key"
TARGETS = {"mock": "mock-claude", "openai": "gpt-fake", "anthropic": "claude-fake"}
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "required": ["city"],
                            "properties": {"city": {"type": "string"},
                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360606060"
    "0000000500010d0a2db40000000049454e44ae426082")).decode()


@dataclass
class Proxy:
    url: str
    openai_fake: FakeOpenAI
    anthropic_fake: FakeAnthropic
    log: Path


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("messages-e2e")
    with FakeOpenAI(api_key=OPENAI_KEY) as openai_fake, FakeAnthropic(api_key=ANTHROPIC_KEY) as claude_fake:
        config = {
            "server": {"host": "127.0.0.1", "access_log": False, "master_key": MASTER_KEY},
            "plugins": {"dir": None},
            "providers": {
                "mock": {"plugin": "mock"},
                "openai": {"plugin": "openai", "api_base": f"{openai_fake.url}/v1", "api_key": OPENAI_KEY},
                "anthropic": {"plugin": "anthropic", "api_base": f"{claude_fake.url}/v1",
                              "api_key": ANTHROPIC_KEY},
            },
            "models": [
                {"name": "mock-*", "provider": "mock"},
                {"name": "gpt-fake", "provider": "openai", "model": "gpt-4o-mini"},
                {"name": "claude-fake", "provider": "anthropic", "model": "claude-sonnet-4-5-20250929"},
            ],
        }
        with started_proxy(config, tmp) as started:
            yield Proxy(started.url, openai_fake, claude_fake, started.log)


@pytest.fixture
def client(proxy: Proxy) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=proxy.url, api_key=MASTER_KEY, max_retries=0, timeout=15.0) as c:
        yield c


@pytest.fixture(params=list(TARGETS))
def model(request: pytest.FixtureRequest) -> str:
    return TARGETS[request.param]


def _marker() -> str:
    return f"m{uuid.uuid4().hex[:12]}"


def _text(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def _tool_uses(message: anthropic.types.Message) -> list[anthropic.types.ToolUseBlock]:
    return [b for b in message.content if b.type == "tool_use"]


# ---------------------------------------------------------------- every target
def test_create(client: anthropic.Anthropic, model: str) -> None:
    message = client.messages.create(model=model, max_tokens=64, system="Answer briefly.",
                                     messages=[{"role": "user", "content": "Say hello to the gateway"}])
    assert isinstance(message, anthropic.types.Message)
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert message.model == model
    assert [b.type for b in message.content] == ["text"] and _text(message).strip()
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_stream_matches_create(client: anthropic.Anthropic, model: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "Tell me a deterministic story"},
                           {"role": "assistant", "content": "Once"},
                           {"role": "user", "content": [{"type": "text", "text": "Go on, please"}]}]
    whole = client.messages.create(model=model, max_tokens=64, messages=messages)
    with client.messages.stream(model=model, max_tokens=64, messages=messages) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert _text(final) == _text(whole) and _text(final)
    assert final.stop_reason == whole.stop_reason == "end_turn"
    assert final.model == model
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_tool_use_round_trip(client: anthropic.Anthropic, model: str) -> None:
    question: Any = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.messages.create(model=model, max_tokens=128, tools=[WEATHER], messages=[question])
    assert first.stop_reason == "tool_use"
    (use,) = _tool_uses(first)
    assert use.name == "get_weather" and isinstance(use.input, dict) and "city" in use.input
    marker = _marker()
    second = client.messages.create(model=model, max_tokens=128, tools=[WEATHER], messages=[
        question, first.to_param(),
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": f"18C and sunny {marker}"}]}])
    assert second.stop_reason == "end_turn"
    assert _text(second).strip() and not _tool_uses(second)
    if model != TARGETS["mock"]:  # the fakes quote the tool result back
        assert marker in _text(second)


def test_streamed_tool_call(client: anthropic.Anthropic, model: str) -> None:
    request: dict[str, Any] = {
        "model": model, "max_tokens": 128, "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [{"role": "user", "content": "Weather in Oslo?"}]}
    whole = client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = _tool_uses(final)
    (expected,) = _tool_uses(whole)
    assert use.name == "get_weather" and use.input == expected.input and use.input


def test_count_tokens(client: anthropic.Anthropic, model: str) -> None:
    messages: Any = [{"role": "user", "content": "How many tokens does this prompt take?"}]
    if model == TARGETS["openai"]:  # an OpenAI-compatible upstream has no counting endpoint
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.count_tokens(model=model, messages=messages)
        assert "does not support token counting" in str(caught.value)
        return
    counted = client.messages.count_tokens(model=model, system="Count me.", messages=messages)
    created = client.messages.create(model=model, max_tokens=16, system="Count me.", messages=messages)
    assert counted.input_tokens > 0
    assert counted.input_tokens == created.usage.input_tokens


def test_prompt_cache_usage_from_a_claude_upstream(proxy: Proxy, client: anthropic.Anthropic) -> None:
    """Anthropic's prompt-cache counts reach the client as Anthropic sent them, in a whole
    answer and in a stream's message_start and final usage: input_tokens is the uncached rest."""
    request: dict[str, Any] = {"model": TARGETS["anthropic"], "max_tokens": 32,
                               "messages": [{"role": "user", "content": f"cached prompt {_marker()}"}]}
    with proxy.anthropic_fake.configured(cache_read=1000, cache_write=200):
        whole = client.messages.create(**request)
        with client.messages.stream(**request) as stream:
            start = next(iter(stream))
            final = stream.get_final_message()
    expected = (3, 1000, 200)  # the fake counts the prompt's three words
    got = whole.usage
    assert (got.input_tokens, got.cache_read_input_tokens, got.cache_creation_input_tokens) == expected
    assert start.type == "message_start"
    got = start.message.usage
    assert (got.input_tokens, got.cache_read_input_tokens, got.cache_creation_input_tokens) == expected
    got = final.usage
    assert (got.input_tokens, got.cache_read_input_tokens, got.cache_creation_input_tokens) == expected
    assert final.usage.output_tokens == whole.usage.output_tokens > 0


# ---------------------------------------------------------------- what reaches the upstream
def test_image_and_sampling_reach_an_openai_upstream(proxy: Proxy, client: anthropic.Anthropic) -> None:
    marker = _marker()
    message = client.messages.create(
        model=TARGETS["openai"], max_tokens=2, stop_sequences=["STOP"], metadata={"user_id": "user-7"},
        extra_body={"temperature": 0.2, "top_k": 5},  # this SDK no longer lists sampling fields
        messages=[{"role": "user", "content": [
            {"type": "text", "text": f"Describe {marker}"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}])
    assert message.stop_reason == "max_tokens"  # the fake stops at max_tokens words
    assert len(_text(message).split()) == 2
    (sent,) = proxy.openai_fake.with_text(marker)
    assert sent.body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": f"Describe {marker}"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]
    assert (sent.body["max_tokens"], sent.body["temperature"], sent.body["stop"], sent.body["user"]) == \
        (2, 0.2, ["STOP"], "user-7")
    assert "top_k" not in sent.body  # OpenAI has none
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"  # the gateway's key, not the client's


def test_image_reaches_a_claude_upstream(proxy: Proxy, client: anthropic.Anthropic) -> None:
    marker = _marker()
    message = client.messages.create(
        model=TARGETS["anthropic"], max_tokens=32, system=f"System {marker}", stop_sequences=["STOP"],
        extra_body={"top_k": 5},
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "text", "text": "What is this?"}]}])
    assert message.stop_reason == "end_turn"
    (sent,) = proxy.anthropic_fake.with_text(marker)
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert (sent.body["top_k"], sent.body["stop_sequences"]) == (5, ["STOP"])
    content = sent.body["messages"][0]["content"]
    assert {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}} in content


# ---------------------------------------------------------------- errors, as the SDK raises them
def test_wrong_key_is_an_authentication_error(proxy: Proxy) -> None:
    with anthropic.Anthropic(base_url=proxy.url, api_key="sk-not-this-one", max_retries=0) as c, \
            pytest.raises(anthropic.AuthenticationError) as caught:
        c.messages.create(model="mock-claude", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 401
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_unknown_model_and_invalid_fields(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=8,
                               messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(missing.value)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="mock-claude", max_tokens=8, extra_body={"temperature": 1.5},
                               messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["error"] == {  # type: ignore[index]
        "type": "invalid_request_error", "message": "temperature: must be between 0 and 1, got 1.5"}


def test_upstream_failure_mid_stream_raises(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="mock-claude", max_tokens=64,
                                messages=[{"role": "user", "content": "fail after two"}],
                                extra_body={"mock": {"error_after": 2}}) as stream, \
            pytest.raises(anthropic.APIStatusError) as caught:
        for _ in stream:
            pass
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]


# ---------------------------------------------------------------- streaming over sockets
def _fake(proxy: Proxy, kind: str) -> FakeOpenAI | FakeAnthropic:
    return proxy.openai_fake if kind == "openai" else proxy.anthropic_fake


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_message_start_goes_out_with_the_first_upstream_event(proxy: Proxy, client: anthropic.Anthropic,
                                                               kind: str) -> None:
    """Nothing is buffered: the client has ``message_start`` while the upstream is still
    sending (five words 300 ms apart)."""
    fake, marker = _fake(proxy, kind), _marker()
    slow = {"chunks": 5, "chunk_delay_ms": 300}
    with fake.configured(**slow), client.messages.stream(
            model=TARGETS[kind], max_tokens=64, messages=[{"role": "user", "content": f"slowly {marker}"}],
            extra_body={"fake": slow} if kind == "openai" else None) as stream:
        first = next(iter(stream))
        record = fake.wait_for(lambda r: marker in r.text(), timeout=2)
        assert first.type == "message_start"
        assert record is not None and not record.completed, "message_start waited for the whole upstream"
        text = "".join(stream.text_stream)
    assert len(text.split()) == 5
    assert record.done.wait(5) and record.completed


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_client_disconnect_cancels_upstream(proxy: Proxy, client: anthropic.Anthropic, kind: str) -> None:
    """A client that leaves mid-stream: the gateway closes the upstream stream at once."""
    fake, marker = _fake(proxy, kind), _marker()
    slow = {"chunks": 100, "chunk_delay_ms": 100}  # 10 s if nobody cancels it
    with fake.configured(**slow):
        with client.messages.stream(
                model=TARGETS[kind], max_tokens=500,
                messages=[{"role": "user", "content": f"long story {marker}"}],
                extra_body={"fake": slow} if kind == "openai" else None) as stream:
            for event in stream:
                if event.type == "content_block_delta":
                    break
        record = fake.wait_for(lambda r: marker in r.text(), timeout=2)
        assert record is not None and record.streamed
        assert record.done.wait(4), "the upstream stream went on after the client left"
    assert record.disconnected and not record.completed
    assert record.chunks_sent < record.chunks_total
