"""End to end: a started ``aiproxy serve`` in front of a fake Gemini API (a real HTTP server,
:class:`tests.fakes.google.FakeGemini`), driven by the real ``openai`` SDK."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes.google import FakeGemini, signature
from tests.helpers import started_proxy

KEY = "AIza-e2e-upstream-key-789"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}


@dataclass
class Proxy:
    url: str
    fake: FakeGemini
    log: Path


def _config(fake: FakeGemini) -> dict[str, Any]:
    def model(name: str, upstream: str, provider: str = "google") -> dict[str, Any]:
        return {"name": name, "provider": provider, "model": upstream, "retries": 0}

    google = {"plugin": "google", "api_base": f"{fake.url}/v1beta", "api_key": KEY}
    return {
        "server": {"host": "127.0.0.1", "access_log": True, "log_level": "debug"},
        "plugins": {"dir": None},
        "providers": {"google": google, "google-wrong-key": {**google, "api_key": "AIza-not-the-key"}},
        "models": [model("gemini-fake", "gemini-2.5-flash"), model("gemini-embed", "gemini-embedding-001"),
                   model("google/*", "*"), model("gemini-wrong-key", "gemini-2.5-flash", "google-wrong-key")],
    }


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("google-e2e")
    with FakeGemini(api_key=KEY) as fake:
        assert isinstance(fake, FakeGemini)
        with started_proxy(_config(fake), tmp) as started:
            yield Proxy(started.url, fake, started.log)


@pytest.fixture
def client(proxy: Proxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="anything", max_retries=0, timeout=15.0) as c:
        yield c


def _marker() -> str:
    return f"m{uuid.uuid4().hex[:12]}"


def _sent(proxy: Proxy, marker: str) -> dict[str, Any]:
    found = proxy.fake.with_text(marker)
    assert len(found) == 1, found
    assert found[0].headers["x-goog-api-key"] == KEY and "key=" not in found[0].path
    return found[0].body  # type: ignore[no-any-return]


def test_chat_with_system_instruction_and_usage(proxy: Proxy, client: openai.OpenAI) -> None:
    marker = _marker()
    r = client.chat.completions.create(model="gemini-fake", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say hello {marker}"}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-fake-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    # the fake counts words: "Be brief." and "Say hello <marker>" in, its six words out
    assert r.usage is not None and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == 11
    body = _sent(proxy, marker)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": f"Say hello {marker}"}]}]


def test_stream_matches_the_whole_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Tell me a deterministic story"}]
    whole = client.chat.completions.create(model="gemini-fake", messages=messages)
    with client.chat.completions.create(model="gemini-fake", messages=messages, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_whole_and_streamed(client: openai.OpenAI) -> None:
    r = client.completions.create(model="gemini-fake", prompt="Once upon a time")
    assert r.object == "text_completion" and r.choices[0].text.strip()
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 6
    with client.completions.create(model="gemini-fake", prompt="Once upon a time", stream=True,
                                   stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_max_tokens_and_sampling_reach_gemini(proxy: Proxy, client: openai.OpenAI) -> None:
    marker = _marker()
    r = client.chat.completions.create(model="gemini-fake", messages=[{"role": "user", "content": marker}],
                                       max_tokens=2, temperature=0.25, top_p=0.5, seed=7, stop=["END"],
                                       user="someone")
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 2
    assert _sent(proxy, marker)["generationConfig"] == {
        "maxOutputTokens": 2, "temperature": 0.25, "topP": 0.5, "seed": 7, "stopSequences": ["END"]}


def test_tool_call_round_trip(proxy: Proxy, client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="gemini-fake", messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "fake-location", "unit": "celsius"}

    marker = _marker()
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"marker": marker})})
    second = client.chat.completions.create(model="gemini-fake", messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert marker in (second.choices[0].message.content or "")  # the fake quotes the result it got
    body = _sent(proxy, marker)
    assert body["contents"][1]["parts"] == [{  # the thought signature came back through the SDK
        "functionCall": {"name": "get_weather", "args": {"location": "fake-location", "unit": "celsius"}},
        "thoughtSignature": signature("get_weather")}]
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"marker": marker}}}]


def test_parallel_tool_calls_streamed(proxy: Proxy, client: openai.OpenAI) -> None:
    with proxy.fake.configured(tool_calls="all"), client.chat.completions.create(
            model="gemini-fake", messages=[{"role": "user", "content": "Weather and time in Oslo?"}],
            tools=[WEATHER, CLOCK], stream=True) as stream:
        chunks = list(stream)
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            mine = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            mine["id"] += tc.id or ""
            mine["name"] += (tc.function.name or "") if tc.function else ""
            mine["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert sorted(calls) == [0, 1]
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert json.loads(calls[1]["arguments"]) == {"zone": "fake-zone"}
    assert calls[0]["id"] != calls[1]["id"] and all(v["id"].startswith("call_") for v in calls.values())
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6)
                                    for x, y in zip(a, b, strict=True))


def test_embeddings_one_and_many_float_and_base64(proxy: Proxy, client: openai.OpenAI) -> None:
    texts = ["first text", "second text"]
    packed = client.embeddings.create(model="gemini-embed", input=texts)  # the SDK asks for base64
    plain = client.embeddings.create(model="gemini-embed", input=texts, encoding_format="float")
    assert [d.index for d in plain.data] == [0, 1] and all(len(d.embedding) == 16 for d in plain.data)
    for a, b in zip(packed.data, plain.data, strict=True):
        assert _close(list(a.embedding), list(b.embedding)), "base64 and float answers must agree"
    assert plain.data[0].embedding != plain.data[1].embedding
    marker = _marker()
    one = client.embeddings.create(model="gemini-embed", input=f"first text {marker}", dimensions=8,
                                   encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8
    assert _sent(proxy, marker) == {"content": {"parts": [{"text": f"first text {marker}"}]},
                                    "outputDimensionality": 8}


def test_models_list_includes_what_gemini_lists(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"gemini-fake", "google/gemini-2.5-flash", "google/gemini-embedding-001"} <= ids
    assert client.models.retrieve("google/gemini-2.5-flash").owned_by == "google"


def test_rate_limit_with_retry_delay(proxy: Proxy, client: openai.OpenAI) -> None:
    with proxy.fake.configured(error=429, retry_after=3), pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gemini-fake", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 429
    # from the body's RetryInfo: Gemini sends no retry-after header
    assert info.value.response.headers["retry-after"] == "3"


def test_unknown_upstream_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="google/gemini-0-nope",
                                       messages=[{"role": "user", "content": "x"}])
    assert "gemini-0-nope" in str(info.value.message)


def test_a_wrong_key_is_the_gateways_problem(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gemini-wrong-key", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and info.value.code == "upstream_auth_failed"


def test_first_chunk_is_not_buffered(proxy: Proxy, client: openai.OpenAI) -> None:
    """Five words 300 ms apart: the first chunk must reach the client long before the last."""
    with proxy.fake.configured(chunks=5, chunk_delay_ms=300):
        start, first, count = time.monotonic(), math.inf, 0
        with client.chat.completions.create(model="gemini-fake", stream=True,
                                            messages=[{"role": "user", "content": "slowly"}]) as stream:
            for _ in stream:
                count += 1
                if count == 1:
                    first = time.monotonic() - start
        total = time.monotonic() - start
    assert count >= 6
    assert total >= 1.2, "the fake sends its events 300 ms apart"
    assert first < total - 0.9, f"first chunk after {first:.2f}s of {total:.2f}s: buffered"


def test_server_logged_no_key_and_no_traceback(proxy: Proxy) -> None:
    """Runs last: at debug level, nothing above may have put the key or a traceback in the log."""
    log = proxy.log.read_text()
    assert "dropping field 'user'" in log  # debug lines are there: the test above sent a user
    assert "Traceback" not in log and not re.search(r"\bERROR\b", log), log[-4000:]
    assert KEY not in log


@pytest.mark.parametrize(("body", "says"), [
    ({"contents": [{"role": "user", "parts": [{"text": "a"}]}, {"role": "user", "parts": [{"text": "b"}]}]},
     "alternate"),
    ({"contents": [{"role": "user", "parts": [{"text": "a"}]},
                   {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}},
                                               {"functionCall": {"name": "g", "args": {}}}]},
                   {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
     "number of function response parts"),
    ({"contents": [{"role": "user", "parts": [{"text": "a"}]},
                   {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                   {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
     "thought_signature"),
    ({"contents": [{"role": "user", "parts": [{"text": "a"}]}], "generationConfig": {"maxTokens": 3}},
     "generationConfig"),
    ({"contents": [{"role": "user", "parts": [{"text": "a"}]}], "max_tokens": 3},
     'Unknown name "max_tokens"'),
    ({"systemInstruction": {"parts": [{"text": "a"}]}}, "contents is not specified"),
])
def test_the_fake_refuses_what_gemini_refuses(body: dict[str, Any], says: str) -> None:
    """The e2e tests above prove something only if the fake is as strict as Gemini."""
    problem = FakeGemini.check(body)
    assert problem is not None and says in problem
