"""The end of every stream (Gateway._settle_stream): usage estimated when the upstream never
gave it, the answer assembled for a stage that set call.collect, and cache-store called
once for a stream that completed — never for one that failed, was cut, or came from the cache."""

from __future__ import annotations

import asyncio
import copy
import json
import textwrap
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from aiproxy import hookimpl, sse, tokens, wire
from aiproxy.app import create_app
from aiproxy.call import Call, Usage
from aiproxy.provider import Reply
from tests.conftest import CHAT, OPENAI_BASE, make_config
from tests.helpers import started_proxy, with_plugins

CHAT_URL = f"{OPENAI_BASE}/chat/completions"
PROMPT = 3 + 3 + 2  # CHAT by approximation: priming, one message, "Say hi" (6 bytes)
SSE_HEADERS = {"content-type": "text/event-stream"}
UPSTREAM_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
HEAD = {"id": "chatcmpl-up", "model": "gpt-4o-mini", "created": 1700000000}


@pytest.fixture(autouse=True)
def approximate_tokens(monkeypatch, tmp_path):
    """Estimates by the approximation whatever tiktoken files this machine has."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-tiktoken-files"))
    tokens._encoder.cache_clear()
    yield
    tokens._encoder.cache_clear()


def chunks(*deltas: dict[str, Any], finish: str | None = "stop", usage: dict | None = None,
           done: bool = True) -> bytes:
    """An upstream SSE body: one chunk per delta, a finish chunk, a usage chunk, [DONE]."""
    events = [wire.chat_chunk(**HEAD, delta=d) for d in deltas]
    if finish is not None:
        events.append(wire.chat_chunk(**HEAD, delta={}, finish_reason=finish))
    if usage is not None:
        events.append(wire.chat_chunk(**HEAD, usage=usage))
    return b"".join(sse.event(e) for e in events) + (sse.DONE if done else b"")


class Stage:
    """A test stage: asks for the answer (collect) if told, records what the hooks see."""

    def __init__(self, collect: bool = False, hit: dict[str, Any] | None = None) -> None:
        self.collect, self.hit = collect, hit
        self.after: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.stored: list[dict[str, Any]] = []

    @staticmethod
    def seen(call: Call) -> dict[str, Any]:
        return {"usage": copy.copy(call.usage), "response": copy.deepcopy(call.response),
                "metadata": dict(call.metadata), "cached": call.cached, "call": call}

    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        if self.collect:
            call.collect = True

    @hookimpl
    async def aiproxy_cache_lookup(self, call: Call) -> Reply | None:
        if self.hit is not None:
            call.collect = True  # careless, but a hit must still not be stored again
            return Reply(copy.deepcopy(self.hit))
        return None

    @hookimpl
    async def aiproxy_cache_store(self, call: Call, reply: Reply) -> None:
        self.stored.append(copy.deepcopy(reply.data))

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        self.after.append(self.seen(call))

    @hookimpl
    def aiproxy_on_error(self, call: Call, error: Any) -> None:
        self.errors.append({**self.seen(call), "error": error})


async def stream(gateway, stage: Stage, upstream_body: bytes | None, **request: Any) -> httpx.Response:
    cfg = make_config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, settle_stage=stage)) as (http, upstream):
        route = upstream.post(CHAT_URL)
        if upstream_body is not None:
            route.respond(200, content=upstream_body, headers=SSE_HEADERS)
        else:
            route.respond(500)
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True, **request})
    assert r.status_code == 200, r.text
    return r


def content_of(r: httpx.Response) -> str:
    out = []
    for event in r.text.strip().split("\n\n"):
        data = event.removeprefix("data: ")
        if data != "[DONE]":
            out += [c["delta"].get("content") or "" for c in orjson.loads(data).get("choices", [])]
    return "".join(out)


# ---------------------------------------------------------------- usage

async def test_a_silent_upstream_gets_its_usage_estimated(gateway):
    stage = Stage()
    body = chunks({"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": " there, friend"})
    r = await stream(gateway, stage, body)
    assert content_of(r) == "Hello there, friend"  # 19 bytes: 5 tokens
    [seen] = stage.after
    assert seen["usage"] == Usage(PROMPT, 5, PROMPT + 5)
    assert seen["metadata"]["usage_estimated"] is True
    assert seen["response"]["choices"][0]["message"]["content"] == "Hello there, friend"
    assert stage.stored == []  # nobody asked for the answer


async def test_an_upstream_that_reports_usage_is_taken_at_its_word(gateway):
    stage = Stage()
    body = chunks({"role": "assistant", "content": "Hello"}, usage=UPSTREAM_USAGE)
    r = await stream(gateway, stage, body)
    assert '"usage"' not in r.text  # asked for by the provider, not by the client
    [seen] = stage.after
    assert seen["usage"] == Usage.from_openai(UPSTREAM_USAGE)
    assert "usage_estimated" not in seen["metadata"]
    assert seen["response"] is None  # nothing to assemble: nobody asked and usage is known


# ---------------------------------------------------------------- collect and cache-store

async def test_collect_assembles_the_answer_and_stores_a_completed_stream_once(gateway):
    stage = Stage(collect=True)
    body = chunks({"role": "assistant", "content": ""}, {"content": "Bonjour"}, {"content": " !"},
                  usage=UPSTREAM_USAGE)
    await stream(gateway, stage, body)
    answer = {"id": "chatcmpl-up", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "Bonjour !", "refusal": None}}],
              "usage": UPSTREAM_USAGE}  # the usage the client did not see is still the answer's
    assert stage.stored == [answer]
    [seen] = stage.after
    assert seen["response"] == answer and seen["usage"] == Usage.from_openai(UPSTREAM_USAGE)


async def test_collect_keeps_tool_calls_and_the_usage_chunk_the_client_asked_for(gateway):
    stage = Stage(collect=True)
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    body = chunks({"role": "assistant", "content": None, "tool_calls": [call]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
                  finish="tool_calls", usage=UPSTREAM_USAGE)
    r = await stream(gateway, stage, body, stream_options={"include_usage": True})
    assert '"usage"' in r.text
    [stored] = stage.stored
    assert stored["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]
    assert stored["choices"][0]["message"]["content"] is None
    assert stored["usage"] == UPSTREAM_USAGE


async def test_a_stream_that_fails_midway_is_never_stored_and_its_usage_is_estimated(gateway):
    stage = Stage(collect=True)
    body = (chunks({"role": "assistant", "content": "abcd"}, {"content": "efgh"}, finish=None, done=False)
            + b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    r = await stream(gateway, stage, body)
    assert content_of(r) == "abcdefgh" and '"error"' in r.text
    assert stage.stored == [] and stage.after == []
    [seen] = stage.errors
    assert seen["usage"] == Usage(PROMPT, 2, PROMPT + 2)
    assert seen["metadata"]["usage_estimated"] is True


async def test_a_stream_the_upstream_ended_without_finishing_is_not_stored(gateway):
    # the body stops mid-answer: no finish_reason, no [DONE]. The client's stream ends,
    # but a truncated answer in the cache would be served to everyone who asks next.
    stage = Stage(collect=True)
    r = await stream(gateway, stage, chunks({"role": "assistant", "content": "The answer is"},
                                            finish=None, done=False))
    assert content_of(r) == "The answer is"
    assert stage.stored == []
    [seen] = stage.after
    assert seen["usage"] == Usage(PROMPT, 4, PROMPT + 4)  # 13 bytes


CACHED = {"id": "chatcmpl-cached", "object": "chat.completion", "created": 7, "model": "gpt-4o-mini",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the cache"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}


async def test_a_cache_hit_replayed_as_a_stream_is_not_stored_again(gateway):
    stage = Stage(hit=CACHED)
    r = await stream(gateway, stage, None)  # the upstream would fail: it is not asked
    assert content_of(r) == "from the cache"
    assert stage.stored == []
    [seen] = stage.after
    assert seen["cached"] and seen["usage"] == Usage(3, 3, 6)
    assert "usage_estimated" not in seen["metadata"]


# ---------------------------------------------------------------- a client that leaves

class Dribble:
    """An upstream stream that sends some chunks, then waits (for a client that is gone)."""

    def __init__(self, *texts: str) -> None:
        self.texts = texts
        self.closed = asyncio.Event()

    async def handler(self, request: httpx.Request) -> httpx.Response:
        async def body():
            try:
                for i, text in enumerate(self.texts):
                    delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
                    yield sse.event(wire.chat_chunk(**HEAD, delta=delta))
                await asyncio.Event().wait()  # more would come, much later
            finally:
                self.closed.set()
        return httpx.Response(200, headers=SSE_HEADERS, content=body())


async def _leave_after(app, body: dict[str, Any], chunks_seen: int,
                       path: str = "/v1/chat/completions") -> list[dict]:
    """Drive the ASGI app as a server would; the client leaves after ``chunks_seen`` body chunks."""
    raw = orjson.dumps(body)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "state": {}}
    request = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict] = []
    enough = asyncio.Event()

    async def receive() -> dict:
        if request:
            return request.pop()
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if sum(1 for m in sent if m.get("body")) >= chunks_seen:
            enough.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_client_that_leaves_midstream_is_charged_for_what_was_sent(path: str):
    """/v1/messages too: its Anthropic events are written by the same relay, whose cleanup
    (the upstream closed, the settle step, the after-call stages) runs when the client leaves."""
    upstream = Dribble("aaaa", "bbbb", "cccc")
    stage = Stage(collect=True)
    cfg = make_config()
    app = create_app(cfg, transport=httpx.MockTransport(upstream.handler),
                     plugin_manager=with_plugins(cfg, settle_stage=stage))
    body = {**CHAT, "stream": True, **({"max_tokens": 100} if path == "/v1/messages" else {})}
    async with app.router.lifespan_context(app):
        sent = await _leave_after(app, body, chunks_seen=3, path=path)
        await asyncio.wait_for(upstream.closed.wait(), 5)  # the upstream was closed, not left running
    bodies = [m["body"] for m in sent if m.get("body")]
    assert len(bodies) == 3 and sse.DONE not in bodies and b"message_stop" not in b"".join(bodies)
    [seen] = stage.after
    assert seen["metadata"]["client_disconnected"] is True
    assert seen["metadata"]["usage_estimated"] is True
    prompt = seen["usage"].prompt_tokens  # the Anthropic request translated counts its own
    assert prompt > 0 and seen["usage"] == Usage(prompt, 3, prompt + 3)  # "aaaabbbbcccc": only what went out
    assert seen["response"]["choices"][0]["message"]["content"] == "aaaabbbbcccc"
    assert stage.stored == []  # a cut answer is never stored


# ---------------------------------------------------------------- end to end

PROBE = '''
import json
from aiproxy import hookimpl

@hookimpl
def aiproxy_after_call(call, settings):
    with open(settings["path"], "a") as f:
        f.write(json.dumps({"stream": call.stream, "usage": [call.usage.prompt_tokens,
            call.usage.completion_tokens, call.usage.total_tokens] if call.usage else None,
            "estimated": call.metadata.get("usage_estimated", False),
            "disconnected": call.metadata.get("client_disconnected", False)}) + "\\n")
'''


def test_a_real_client_that_stops_reading_gets_an_estimate_of_what_it_was_sent(tmp_path: Path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "settle_probe.py").write_text(textwrap.dedent(PROBE))
    log = tmp_path / "calls.jsonl"
    config = {"plugins": {"dir": str(plugins)}, "providers": {"mock": {"plugin": "mock"}},
              "models": [{"name": "mock-chat", "provider": "mock",
                          "options": {"tokens": 60, "chunk_delay_ms": 50}}],
              "settle_probe": {"path": str(log)}}
    messages = [{"role": "user", "content": "Say hi"}]
    with started_proxy(config, tmp_path) as started:
        client = openai.OpenAI(base_url=f"{started.url}/v1", api_key="unused", max_retries=0, timeout=10)
        whole = client.chat.completions.create(model="mock-chat", messages=messages)
        full = whole.choices[0].message.content or ""
        received = ""
        with client.chat.completions.create(model="mock-chat", messages=messages, stream=True) as events:
            for n, event in enumerate(events):
                received += event.choices[0].delta.content or ""
                if n == 4:
                    break
        records = _records(log, 2)
    streamed = [r for r in records if r["stream"]]
    assert len(streamed) == 1, records
    [record] = streamed
    assert record["estimated"] and record["disconnected"]
    prompt, completion, total = record["usage"]
    assert prompt == PROMPT and total == prompt + completion
    assert received and full.startswith(received)  # the mock answers the same text both ways
    assert tokens.approximate(received) <= completion < tokens.approximate(full)
    [plain] = [r for r in records if not r["stream"]]
    assert not plain["estimated"] and plain["usage"][1] == 60  # the mock's own count


def _records(log: Path, count: int, within: float = 10.0) -> list[dict]:
    """The after-call records the server's probe wrote, once there are ``count`` (bounded wait)."""
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)
    raise AssertionError(f"the probe wrote {log.read_text() if log.exists() else 'nothing'}")
