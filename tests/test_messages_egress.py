"""OpenAI-shaped answers → Anthropic Messages answers (``aiproxy.builtin.messages_egress``).

Whole answers are checked against the ``anthropic`` SDK's own ``Message`` model, stream
events against its ``RawMessageStreamEvent`` union, and every stream's event order
against the protocol (one block open at a time, indexes in order, ``message_stop`` last).
"""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from starlette.datastructures import Headers

from aiproxy import sse, wire
from aiproxy.builtin.messages_egress import MessagesEgress
from aiproxy.call import Call, Usage
from aiproxy.errors import ProxyError
from aiproxy.provider import Reply

EGRESS = MessagesEgress()
EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)


def make_call(**body: Any) -> Call:
    return Call(request_id="r1", operation="chat", body={"model": "claude-alias", **body},
                model="claude-alias", stream=bool(body.get("stream")), headers=Headers())


def completion(message: dict[str, Any], finish: str | None, usage: dict[str, Any] | None = None,
               **choice: Any) -> dict[str, Any]:
    data = wire.chat_completion(id="chatcmpl-1", model="upstream-model", message=message,
                                finish_reason=finish, usage=usage or {"prompt_tokens": 11,
                                                                      "completion_tokens": 7,
                                                                      "total_tokens": 18})
    data["choices"][0].update(choice)
    return data


def whole(data: dict[str, Any], call: Call | None = None) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(EGRESS.whole(call or make_call(), Reply(data)))
    Message.model_validate(out)
    return out


# ---------------------------------------------------------------- whole answers
def test_text_answer() -> None:
    out = whole(completion({"role": "assistant", "content": "Hello there", "refusal": None}, "stop"))
    assert out["id"].startswith("msg_") and out["type"] == "message" and out["role"] == "assistant"
    assert out["model"] == "claude-alias"  # the name the client sent, not the upstream's
    assert out["content"] == [{"type": "text", "text": "Hello there"}]
    assert (out["stop_reason"], out["stop_sequence"]) == ("end_turn", None)
    assert out["usage"] == {"input_tokens": 11, "output_tokens": 7}


@pytest.mark.parametrize(("finish", "reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
    ("content_filter", "refusal"), (None, "end_turn"), ("something_new", "end_turn"),
])
def test_stop_reasons(finish: str | None, reason: str) -> None:
    out = whole(completion({"role": "assistant", "content": "x"}, finish))
    assert out["stop_reason"] == reason


def test_stop_sequence_when_the_upstream_names_it() -> None:
    call = make_call(stop=["END", "HALT"])
    data = completion({"role": "assistant", "content": "x"}, "stop", stop_reason="HALT")
    out = whole(data, call)
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "HALT")
    other = whole(completion({"role": "assistant", "content": "x"}, "stop", stop_reason="NOT-ASKED"), call)
    assert (other["stop_reason"], other["stop_sequence"]) == ("end_turn", None)


def test_parallel_tool_calls_become_tool_use_blocks() -> None:
    message = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        {"id": "call_c", "type": "function", "function": {"name": "broken", "arguments": "{oops"}},
    ]}
    out = whole(completion(message, "tool_calls"))
    assert out["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}},
        {"type": "tool_use", "id": "call_c", "name": "broken", "input": {"_raw_arguments": "{oops"}},
    ]
    assert out["stop_reason"] == "tool_use"


def test_refusal_and_cached_usage() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103,
             "prompt_tokens_details": {"cached_tokens": 60}}
    out = whole(completion({"role": "assistant", "content": None, "refusal": "I can't help."}, "stop", usage))
    assert out["content"] == [{"type": "text", "text": "I can't help."}]
    assert out["stop_reason"] == "refusal"
    assert out["usage"] == {"input_tokens": 40, "output_tokens": 3, "cache_read_input_tokens": 60}


PROMPT_CACHED = {"prompt_tokens": 1210, "completion_tokens": 3, "total_tokens": 1213,
                 "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 200}}
#: Anthropic's usage for PROMPT_CACHED: input_tokens is what neither read nor wrote the cache
ANTHROPIC_CACHED = {"input_tokens": 10, "output_tokens": 3, "cache_creation_input_tokens": 200,
                    "cache_read_input_tokens": 1000}


def test_prompt_cache_reads_and_writes_in_a_whole_answer() -> None:
    out = whole(completion({"role": "assistant", "content": "ok"}, "stop", PROMPT_CACHED))
    assert out["usage"] == ANTHROPIC_CACHED
    writes_only = {**PROMPT_CACHED, "prompt_tokens_details": {"cache_write_tokens": 200}}
    out = whole(completion({"role": "assistant", "content": "ok"}, "stop", writes_only))
    assert out["usage"] == {"input_tokens": 1010, "output_tokens": 3, "cache_creation_input_tokens": 200}


def test_usage_round_trips_cache_writes_through_the_openai_shape() -> None:
    usage = Usage(1210, 3, 1213, 1000, 200)
    assert usage.to_openai() == PROMPT_CACHED
    assert Usage.from_openai(usage.to_openai()) == usage
    assert Usage(10, 3, 13, 0, 200).to_openai()["prompt_tokens_details"] == {
        "cached_tokens": 0, "cache_write_tokens": 200}
    assert "prompt_tokens_details" not in Usage(10, 3, 13).to_openai()


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "invalid_request_error"), (429, "rate_limit_error"),
    (500, "api_error"), (502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"),
    (529, "overloaded_error"),
])
def test_errors_in_anthropic_shape(status: int, kind: str) -> None:
    body = orjson.loads(EGRESS.error(ProxyError(status, "what went wrong")))
    assert body == {"type": "error", "error": {"type": kind, "message": "what went wrong"}}


# ---------------------------------------------------------------- streams
def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          usage: dict[str, Any] | None = None) -> bytes:
    return sse.event(wire.chat_chunk(id="c1", model="upstream-model", created=1, delta=delta,
                                     finish_reason=finish, usage=usage))


USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


async def run(events: list[bytes], call: Call | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The Anthropic events for the gateway's OpenAI ``events`` (decoded, as the gateway
    hands them to the writer), each checked against the SDK's types."""
    writer = EGRESS.writer(call or make_call(stream=True))
    raw = b"".join(writer.end() if e == sse.DONE else writer.feed(orjson.loads(e.removeprefix(b"data: ")))
                   for e in events)
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        name, data = name_line.removeprefix("event: "), orjson.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        if name != "error":
            EVENT.validate_python(data)
        out.append((name, data))
    return out


def check_order(events: list[tuple[str, dict[str, Any]]]) -> None:
    """The protocol: message_start; blocks opened and closed one at a time, in index order;
    message_delta; message_stop."""
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    open_index, next_index = None, 0
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == next_index, names
            open_index, next_index = data["index"], next_index + 1
        elif name == "content_block_delta":
            assert data["index"] == open_index, names
        elif name == "content_block_stop":
            assert data["index"] == open_index, names
            open_index = None
        else:
            raise AssertionError(f"unexpected {name} inside the message: {names}")
    assert open_index is None, names


async def test_text_stream() -> None:
    events = await run([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                        chunk({"content": "lo"}), chunk({}, "stop"), chunk(usage=USAGE), sse.DONE])
    check_order(events)
    start = events[0][1]["message"]
    assert start["model"] == "claude-alias" and start["content"] == [] and start["stop_reason"] is None
    assert [e[1]["delta"]["text"] for e in events if e[0] == "content_block_delta"] == ["Hel", "lo"]
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 9, "output_tokens": 4}  # the usage chunk, not a delta


async def test_text_then_parallel_tool_calls_get_one_block_each() -> None:
    events = await run([
        chunk({"role": "assistant", "content": "Let me look."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"), chunk(usage=USAGE), sse.DONE])
    check_order(events)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts == [{"type": "text", "text": ""},
                      {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}},
                      {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}]
    json_parts: dict[int, str] = {}
    for name, data in events:
        if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta":
            json_parts[data["index"]] = json_parts.get(data["index"], "") + data["delta"]["partial_json"]
    assert {i: orjson.loads(v) for i, v in json_parts.items()} == {1: {"city": "Paris"}, 2: {}}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_a_replayed_whole_answer_streams_the_same() -> None:
    """A cached answer replayed as chunks (content null beside tool calls, usage known up front)."""
    data = completion({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
        "tool_calls")
    call = make_call(stream=True)
    call.usage = Usage.from_openai(data["usage"])
    events = await run([sse.event(c) for c in wire.replay_chunks(data, True)] + [sse.DONE], call)
    check_order(events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 11
    assert [n for n, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["usage"] == {"input_tokens": 11, "output_tokens": 7}


async def test_prompt_cache_usage_in_message_start_and_message_delta() -> None:
    """An upstream that counts the prompt before its first event (Anthropic's message_start):
    message_start carries the prompt's split, message_delta the usage chunk's."""
    call = make_call(stream=True)
    call.usage = Usage(1210, 1, 1211, 1000, 200)
    events = await run([chunk({"role": "assistant", "content": "ok"}), chunk({}, "stop"),
                        chunk(usage=PROMPT_CACHED), sse.DONE], call)
    check_order(events)
    assert events[0][1]["message"]["usage"] == {**ANTHROPIC_CACHED, "output_tokens": 0}
    assert events[-2][1]["usage"] == ANTHROPIC_CACHED
    # no usage chunk (the client's include_usage was off upstream): the call's own usage
    call.usage = Usage(1210, 3, 1213, 1000, 200)
    events = await run([chunk({"role": "assistant", "content": "ok"}), chunk({}, "stop"), sse.DONE], call)
    assert events[-2][1]["usage"] == ANTHROPIC_CACHED


async def test_length_and_empty_streams() -> None:
    cut = await run([chunk({"content": "a"}), chunk({}, "length"), sse.DONE])
    check_order(cut)
    assert cut[-2][1]["delta"]["stop_reason"] == "max_tokens"
    empty = await run([sse.DONE])
    check_order(empty)
    assert [n for n, _ in empty] == ["message_start", "message_delta", "message_stop"]


@pytest.mark.parametrize(("error", "kind"), [
    (ProxyError(502, "upstream broke"), "api_error"),
    (ProxyError(503, "busy"), "overloaded_error"),
    (ProxyError(429, "slow down"), "rate_limit_error"),
    (ProxyError(504, "too slow"), "timeout_error"),
])
async def test_an_error_after_the_first_event_ends_the_stream(error: ProxyError, kind: str) -> None:
    events = await run([chunk({"content": "par"}), sse.error_event(error.body())])
    assert [n for n, _ in events] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": kind, "message": error.message}}


# ---------------------------------------------------------------- thinking
def thinking_call(**body: Any) -> Call:
    call = make_call(**body)
    call.state["messages"] = {"thinking": {"type": "enabled", "budget_tokens": 2048}}
    return call


def test_reasoning_becomes_a_thinking_block_only_when_asked() -> None:
    data = completion({"role": "assistant", "content": "42", "reasoning_content": "6 times 7"}, "stop")
    asked = whole(data, thinking_call())
    assert asked["content"] == [{"type": "thinking", "thinking": "6 times 7", "signature": ""},
                                {"type": "text", "text": "42"}]
    assert whole(data)["content"] == [{"type": "text", "text": "42"}]


async def test_streamed_reasoning_then_text() -> None:
    events = [chunk({"role": "assistant", "reasoning_content": "six"}),
              chunk({"reasoning_content": " sevens"}),
              chunk({"content": "42"}), chunk({}, "stop"), chunk(usage=USAGE), sse.DONE]
    asked = await run(events, thinking_call(stream=True))
    check_order(asked)
    starts = [d["content_block"]["type"] for n, d in asked if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [(d["index"], d["delta"]) for n, d in asked if n == "content_block_delta"]
    assert deltas == [(0, {"type": "thinking_delta", "thinking": "six"}),
                      (0, {"type": "thinking_delta", "thinking": " sevens"}),
                      (1, {"type": "text_delta", "text": "42"})]
    plain = await run(events)
    assert [d["content_block"]["type"] for n, d in plain if n == "content_block_start"] == ["text"]


async def test_tool_calls_with_finish_stop_still_say_tool_use() -> None:
    """Some servers (Ollama among them) finish with "stop" beside tool calls."""
    call = {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    out = whole(completion({"role": "assistant", "content": None, "tool_calls": [call]}, "stop"))
    assert out["stop_reason"] == "tool_use"
    events = await run([chunk({"tool_calls": [{"index": 0, **call}]}), chunk({}, "stop"), sse.DONE])
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
