"""End to end: the real ``openai`` SDK against Claude models through a started ``aiproxy serve``,
with Anthropic's Messages API faked at the HTTP level (:class:`tests.fakes.FakeAnthropic`)."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.fakes import FakeAnthropic
from tests.helpers import started_proxy, streamed_tool_call

UPSTREAM_KEY = "sk-ant-fake-upstream-key-0042"
WRONG_KEY = "sk-ant-wrong-key-0099"
MODEL = "claude-sonnet-4-5-20250929"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}


@dataclass
class Proxy:
    url: str
    fake: FakeAnthropic
    log: Path


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("anthropic-e2e")
    with FakeAnthropic(api_key=UPSTREAM_KEY) as fake:
        base = f"{fake.url}/v1"
        config = {
            "server": {"host": "127.0.0.1", "access_log": False},
            "plugins": {"dir": None},
            "providers": {
                "anthropic": {"plugin": "anthropic", "api_base": base, "api_key": UPSTREAM_KEY,
                              "options": {"extra_fields": ["fake"], "max_tokens": 512}},
                "anthropic-wrong": {"plugin": "anthropic", "api_base": base, "api_key": WRONG_KEY},
            },
            "models": [
                {"name": "claude-fake", "provider": "anthropic", "model": MODEL, "retries": 0},
                {"name": "claude-*", "provider": "anthropic", "retries": 0},
                {"name": "claude-wrong-key", "provider": "anthropic-wrong", "model": MODEL, "retries": 0},
            ],
        }
        with started_proxy(config, tmp, "--log-level", "debug") as started:
            yield Proxy(started.url, fake, started.log)


@pytest.fixture
def client(proxy: Proxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="client-key", max_retries=0, timeout=15.0) as c:
        yield c


def _marker() -> str:
    return f"m{uuid.uuid4().hex[:12]}"


def test_chat(proxy: Proxy, client: openai.OpenAI) -> None:
    marker = _marker()
    r = client.chat.completions.create(model="claude-fake", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Hello {marker}"}])
    assert r.id.startswith("chatcmpl-msg_fake") and r.object == "chat.completion" and r.created > 0
    assert r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == 11
    record = proxy.fake.with_text(marker)[0]
    assert record.headers["x-api-key"] == UPSTREAM_KEY and record.headers["anthropic-version"] == "2023-06-01"
    assert "client-key" not in json.dumps(record.headers)
    assert record.body["system"] == "You are terse." and record.body["max_tokens"] == 512


def test_stream_matches_whole_answer_with_usage(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Tell me a deterministic story"}]
    whole = client.chat.completions.create(model="claude-fake", messages=messages)
    with client.chat.completions.create(model="claude-fake", messages=messages, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_cached_prompt_tokens(proxy: Proxy, client: openai.OpenAI) -> None:
    with proxy.fake.configured(cache_read=100):
        r = client.chat.completions.create(model="claude-fake",
                                           messages=[{"role": "user", "content": "one two"}])
    assert r.usage is not None and r.usage.prompt_tokens == 102
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 100


def test_prompt_cache_writes_in_openai_usage(proxy: Proxy, client: openai.OpenAI) -> None:
    """Tokens written to Anthropic's prompt cache are in prompt_tokens and, apart, in
    ``prompt_tokens_details.cache_write_tokens`` (the openai SDK's own field), whole and streamed."""
    messages: Any = [{"role": "user", "content": "one two"}]
    with proxy.fake.configured(cache_read=100, cache_write=40):
        whole = client.chat.completions.create(model="claude-fake", messages=messages)
        chunks = list(client.chat.completions.create(model="claude-fake", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
    streamed = chunks[-1].usage
    for usage in (whole.usage, streamed):
        assert usage is not None and usage.prompt_tokens == 142
        details = usage.prompt_tokens_details
        assert details is not None and (details.cached_tokens, details.cache_write_tokens) == (100, 40)


def test_tool_call_round_trip(proxy: Proxy, client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="claude-fake", messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1 and calls[0].id.startswith("toolu_fake")
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "fake-location", "unit": "celsius"}

    marker = _marker()
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"marker": marker})})
    second = client.chat.completions.create(model="claude-fake", messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    assert second.choices[0].finish_reason == "stop"
    assert marker in (second.choices[0].message.content or "")
    sent = proxy.fake.with_text(marker)[0].body
    assert sent["messages"][1]["content"][-1] == {"type": "tool_use", "id": call.id, "name": "get_weather",
                                                  "input": json.loads(call.function.arguments)}
    assert sent["messages"][2]["content"][0]["type"] == "tool_result"


def test_tool_call_streamed(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
            model="claude-fake", messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER], stream=True) as stream:  # type: ignore[list-item]
        chunks = list(stream)
    name, arguments, ids = streamed_tool_call(chunks)
    assert name == "get_weather" and len(ids) == 1
    assert json.loads(arguments) == {"location": "fake-location", "unit": "celsius"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        ["tool_calls"]


def test_first_event_reaches_the_client_before_the_upstream_goes_on(proxy: Proxy,
                                                                    client: openai.OpenAI) -> None:
    """The upstream sends message_start, then waits: the client must already have its first chunk."""
    gate = threading.Event()
    marker = _marker()
    try:
        with proxy.fake.configured(gate=gate):
            stream = client.chat.completions.create(
                model="claude-fake", messages=[{"role": "user", "content": f"gated {marker}"}], stream=True)
            with stream:
                it = iter(stream)
                first = next(it)
                record = proxy.fake.with_text(marker)[0]
                sent_then = record.chunks_sent
                gate.set()
                rest = list(it)
    finally:
        gate.set()
    assert first.choices[0].delta.role == "assistant"
    assert sent_then == 1, f"the client got its first chunk only after {sent_then} upstream events"
    assert record.completed and rest


def test_overloaded_upstream_is_a_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="claude-fake", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"fake": {"error": 529}})
    assert info.value.status_code == 503
    assert info.value.code == "upstream_unavailable"
    assert UPSTREAM_KEY not in info.value.response.text


def test_rate_limited_upstream_passes_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="claude-fake", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"fake": {"error": 429, "retry_after": 3}})
    assert info.value.response.headers["retry-after"] == "3"


def test_overloaded_mid_stream_ends_the_stream_with_an_error(client: openai.OpenAI) -> None:
    received = []
    with pytest.raises(openai.APIError) as info:
        with client.chat.completions.create(
                model="claude-fake", messages=[{"role": "user", "content": "x y"}], stream=True,
                extra_body={"fake": {"stream_error": "overloaded_error"}}) as stream:
            received.extend(stream)
    assert received and received[0].choices[0].delta.role == "assistant"
    assert "overloaded" in str(info.value.message).lower()


def test_invalid_request_passes_the_upstreams_message(client: openai.OpenAI) -> None:
    """A tool result whose call is not in the turn before: the upstream's own 400."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="claude-fake", messages=[
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "toolu_unknown", "content": "1"}])
    assert "tool_use_id" in str(info.value.message)


def test_wrong_upstream_key_is_a_502_naming_neither_key(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="claude-wrong-key", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and info.value.code == "upstream_auth_failed"
    text = info.value.response.text + json.dumps(dict(info.value.response.headers))
    assert WRONG_KEY not in text and UPSTREAM_KEY not in text


def test_models_are_listed_from_the_upstream(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"claude-fake", "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001"} <= ids
    answer = client.chat.completions.create(model="claude-haiku-4-5-20251001",
                                            messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "claude-haiku-4-5-20251001"


def test_anthropic_sdk_through_the_gateway(proxy: Proxy) -> None:
    """An Anthropic SDK client on /v1/messages, a Claude model behind: both translations in a row."""
    marker = _marker()
    with anthropic.Anthropic(base_url=proxy.url, api_key="client-key", max_retries=0, timeout=15.0) as sdk:
        whole = sdk.messages.create(model="claude-fake", max_tokens=100, system="Be terse.",
                                    messages=[{"role": "user", "content": f"Hello {marker}"}])
        with sdk.messages.stream(model="claude-fake", max_tokens=100, tools=[{
                "name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
                messages=[{"role": "user", "content": "Weather in Rome?"}]) as stream:
            streamed = stream.get_final_message()
    assert whole.content[0].type == "text" and whole.content[0].text and whole.stop_reason == "end_turn"
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (4, 6)
    sent = proxy.fake.with_text(marker)[0]
    assert sent.body["system"] == "Be terse." and sent.body["max_tokens"] == 100
    assert sent.headers["x-api-key"] == UPSTREAM_KEY
    tool_use = [b for b in streamed.content if b.type == "tool_use"]
    assert streamed.stop_reason == "tool_use" and len(tool_use) == 1
    assert tool_use[0].name == "get_weather" and tool_use[0].input == {"location": "fake-location",
                                                                        "unit": "celsius"}


def test_server_logged_no_key_and_no_traceback(proxy: Proxy) -> None:
    """Runs last, at DEBUG: neither provider key appears in the gateway's log."""
    log = proxy.log.read_text()
    assert UPSTREAM_KEY not in log and WRONG_KEY not in log
    assert "Traceback" not in log and not re.search(r"\bERROR\b", log), log[-4000:]
