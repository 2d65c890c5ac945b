"""aiproxy.sse: splitting upstream byte streams into events, however the bytes are chunked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
import pytest

from aiproxy import sse
from aiproxy.sse import DONE, data_events, event, ndjson_lines


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def events(*parts: bytes) -> list[bytes]:
    return [data async for data in data_events(_chunks(parts))]


async def lines(*parts: bytes) -> list[bytes]:
    return [line async for line in ndjson_lines(_chunks(parts))]


STREAM = (
    b": OPENROUTER PROCESSING\n"
    b"\n"
    b'data: {"n":1}\n'
    b"\n"
    b"event: ping\n"
    b"id: 7\n"
    b"retry: 100\n"
    b"\n"
    b'data: {"n":2}\n'
    b"\n"
    b"data:first\n"
    b"data: second\n"
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)
EXPECTED = [b'{"n":1}', b'{"n":2}', b"first\nsecond", b"[DONE]"]


async def test_events_comments_and_other_fields_dropped():
    assert await events(STREAM) == EXPECTED


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_every_two_chunk_split_gives_the_same_events(newline):
    stream = STREAM.replace(b"\n", newline)
    for cut in range(len(stream) + 1):
        got = await events(stream[:cut], stream[cut:])
        assert got == EXPECTED, f"split at byte {cut}: {stream[:cut]!r} | {stream[cut:]!r}"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_byte_by_byte_gives_the_same_events(newline):
    stream = STREAM.replace(b"\n", newline)
    assert await events(*(stream[i:i + 1] for i in range(len(stream)))) == EXPECTED


async def test_cr_only_events_in_separate_chunks_stay_separate():
    # Each chunk ends in "\r": the parser must not wait for a "\n" that never comes,
    # nor merge the events at the end of the stream.
    assert await events(b"data: a\r\r", b"data: b\r\r") == [b"a", b"b"]
    assert await events(b"data: a\r\rdata: b\r\r") == [b"a", b"b"]


async def test_each_event_is_yielded_before_the_next_chunk_arrives():
    seen: list[bytes] = []

    async def upstream() -> AsyncIterator[bytes]:
        for part, expect_before in ((b"data: 1\n\n", []), (b"data: 2\r\n\r\n", [b"1"]),
                                    (b"data: 3\r\r", [b"1", b"2"]),
                                    (b"data: 4\n\n", [b"1", b"2", b"3"])):
            assert seen == expect_before
            yield part

    async for data in data_events(upstream()):
        seen.append(data)
    assert seen == [b"1", b"2", b"3", b"4"]


async def test_crlf_split_between_cr_and_lf_is_one_line_end():
    # "\r" | "\n" is one line end; treating it as two would end the event after "a".
    assert await events(b"data: a\r", b"\ndata: b\r\n\r\n") == [b"a\nb"]
    assert await events(b"data: a\r\n\r", b"\ndata: b\r\n\r\n") == [b"a", b"b"]


async def test_lf_after_cr_is_swallowed_only_once():
    # "\r" "\n" "\n": the first \n belongs to the \r; the second ends the event.
    assert await events(b"data: a\r", b"\n", b"\n", b"data: b\n\n") == [b"a", b"b"]


async def test_multi_line_data_joined_with_newline_and_optional_space():
    assert await events(b"data: {\ndata:  \"a\": 1\ndata:}\n\n") == [b'{\n "a": 1\n}']


async def test_comment_only_and_empty_events_are_dropped():
    assert await events(b": keep-alive\n\n\n\n: ping\n\n", b"data: x\n\n") == [b"x"]


async def test_events_with_blank_data_are_dropped():
    # A keep-alive like "event: ping\ndata: " must not reach an OpenAI SDK, which would
    # try to parse its empty data as JSON.
    stream = b"event: ping\ndata: \n\ndata:\n\ndata:\ndata: \n\ndata: 1\n\n"
    assert await events(stream) == [b"1"]


async def test_data_is_not_reencoded():
    payload = b'{"b":1,  "a":"\\u00e9"}'
    assert await events(b"data: " + payload + b"\n\n") == [payload]


async def test_unterminated_last_event_is_still_yielded():
    assert await events(b"data: 1\n\n", b"data: 2") == [b"1", b"2"]
    assert await events(b"data: 1\r\n\r\ndata: 2\r\n") == [b"1", b"2"]


async def test_empty_chunks_are_ignored():
    assert await events(b"", b"data: 1", b"", b"\n", b"", b"\n") == [b"1"]


def test_event_and_done_framing():
    assert event({"a": [1, "é"]}) == b"data: " + orjson.dumps({"a": [1, "é"]}) + b"\n\n"
    assert DONE == b"data: [DONE]\n\n"


async def test_ndjson_lines_split_across_chunks():
    assert await lines(b'{"a":', b'1}\n{"b"', b":2}\n") == [b'{"a":1}', b'{"b":2}']


async def test_ndjson_blank_lines_and_crlf_dropped():
    assert await lines(b'{"a":1}\r\n\r\n\n  \n{"b":2}\r\n') == [b'{"a":1}', b'{"b":2}']


async def test_ndjson_last_line_without_newline():
    assert await lines(b'{"a":1}\n{"done":true}') == [b'{"a":1}', b'{"done":true}']


async def test_ndjson_byte_by_byte():
    stream = b'{"x":"1"}\n{"x":"2"}\n\n{"x":"3"}'
    assert await lines(*(stream[i:i + 1] for i in range(len(stream)))) == \
        [b'{"x":"1"}', b'{"x":"2"}', b'{"x":"3"}']


async def test_event_stream_runs_the_relays_cleanup_when_the_head_cannot_be_sent() -> None:
    cleaned: list[str] = []

    async def relay() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        finally:
            cleaned.append("closed")

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never leaves
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("the connection broke before the head went out")

    with pytest.raises(OSError):
        await sse.EventStream(relay(), {})({"type": "http"}, receive, send)
    assert cleaned == ["closed"]


async def test_event_stream_sends_head_events_and_end_in_order() -> None:
    async def relay() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield sse.DONE

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await sse.EventStream(relay(), {"x-request-id": "r1"})({"type": "http"}, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert (b"x-request-id", b"r1") in sent[0]["headers"]
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", sse.DONE, b""]
    assert sent[-1]["more_body"] is False


@pytest.mark.parametrize("raw", [
    b'data: {"n":1}\n\n', STREAM, b'data: {"n":1}\r\n\r\ndata: {"n":2}\r\n\r\n', b"data: a\ndata: b\n\n",
    b": keep-alive\n\n", b"data: [DONE]\n\n", b'event: x\ndata: {"n":3}\n\n',
])
async def test_payloads_of_whole_events_are_what_data_events_reads(raw: bytes) -> None:
    assert sse.payloads(raw) == await events(raw)
