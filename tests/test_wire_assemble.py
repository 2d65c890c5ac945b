"""wire.assemble: the whole answer a stream of OpenAI SSE events adds up to — the inverse of
wire.replay_chunks, and of streams split the way upstreams split them."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiproxy import sse, wire

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o"}


def chunk(*choices: dict[str, Any], usage: dict[str, Any] | None = None, **head: Any) -> bytes:
    body: dict[str, Any] = {**HEAD, **head, "choices": list(choices)}
    if usage is not None:
        body["usage"] = usage
    return sse.event(body)


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish}


def test_content_is_joined_and_the_head_and_last_finish_reason_kept():
    events = [chunk(delta(role="assistant", content="")), chunk(delta(content="Hel")),
              chunk(delta(content="lo")), chunk(delta(content=", world")), chunk(delta(finish="stop")),
              sse.DONE]
    assert wire.assemble(events) == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, world", "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}]}


def test_tool_call_arguments_split_over_chunks_and_parallel_calls():
    events = [
        chunk(delta(role="assistant", content=None, tool_calls=[
            {"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "weather", "arguments": ""}}])),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"ci'}}])),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": 'ty":"Paris"}'}}])),
        chunk(delta(tool_calls=[
            {"index": 1, "id": "call_b", "type": "function",
             "function": {"name": "time", "arguments": '{"tz"'}}])),
        chunk(delta(tool_calls=[{"index": 1, "function": {"arguments": ':"CET"}'}}])),
        chunk(delta(finish="tool_calls")),
    ]
    [choice] = wire.assemble(events)["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": '{"tz":"CET"}'}}]}


def test_a_refusal_is_joined_and_its_content_is_null():
    events = [chunk(delta(role="assistant", content="", refusal="")), chunk(delta(refusal="I can't ")),
              chunk(delta(refusal="help with that.")), chunk(delta(finish="stop"))]
    message = wire.assemble(events)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": "I can't help with that."}


def test_reasoning_deltas_are_joined_and_replayed():
    """DeepSeek (and the gateway's Ollama, Gemini, Anthropic providers) stream the reasoning
    as reasoning_content deltas; vLLM and OpenRouter as reasoning."""
    for key in ("reasoning_content", "reasoning"):
        events = [chunk(delta(role="assistant", content="", **{key: ""})),
                  chunk(delta(**{key: "Two plus "})), chunk(delta(**{key: "two is four."})),
                  chunk(delta(content="4")), chunk(delta(finish="stop"))]
        answer = wire.assemble(events)
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": "4", "refusal": None,
                                                   key: "Two plus two is four."}
        replayed = [c["choices"][0]["delta"] for c in wire.replay_chunks(answer, False)]
        assert replayed[0] == {"role": "assistant", "content": "4", key: "Two plus two is four."}


def test_logprobs_and_system_fingerprint_are_kept():
    tokens = [{"token": t, "logprob": -0.5, "bytes": None, "top_logprobs": []} for t in ("Hel", "lo", "!")]
    first = {**delta(role="assistant", content="Hel"), "logprobs": {"content": tokens[:1], "refusal": None}}
    events = [sse.event({**HEAD, "system_fingerprint": "fp_1", "choices": [first]}),
              sse.event({**HEAD, "system_fingerprint": "fp_1", "choices": [
                  {**delta(content="lo!"), "logprobs": {"content": tokens[1:], "refusal": None}}]}),
              sse.event({**HEAD, "system_fingerprint": "fp_1", "choices": [delta(finish="stop")]})]
    answer = wire.assemble(events)
    assert answer["system_fingerprint"] == "fp_1"
    assert answer["choices"][0]["logprobs"] == {"content": tokens, "refusal": None}
    replayed = list(wire.replay_chunks(answer, False))
    assert {c["system_fingerprint"] for c in replayed} == {"fp_1"}
    assert replayed[0]["choices"][0]["logprobs"] == {"content": tokens, "refusal": None}
    text = [sse.event({**wire.text_chunk(id="cmpl-1", model="m", created=1, text=t),
                       "system_fingerprint": "fp_2"}) for t in ("a", "b")]
    for i, event in enumerate(text):  # a text completion's logprobs: parallel lists
        data = orjson.loads(event[6:])
        data["choices"][0]["logprobs"] = {"tokens": ["ab"[i]], "token_logprobs": [-1.0 * i],
                                          "top_logprobs": [{}], "text_offset": [i]}
        text[i] = sse.event(data)
    answer = wire.assemble(text)
    assert answer["choices"][0]["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-0.0, -1.0],
                                                "top_logprobs": [{}, {}], "text_offset": [0, 1]}
    assert answer["system_fingerprint"] == "fp_2"


def test_the_fingerprint_of_a_stream_that_opens_without_one():
    """Azure opens with a chunk of its prompt filter results alone; the others carry the
    fingerprint (decoded chunks, as the gateway's relay keeps them, beside events)."""
    azure = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
             "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    events = [azure, chunk(delta(role="assistant", content="hi"), system_fingerprint="fp_az"),
              orjson.loads(chunk(delta(finish="stop"), system_fingerprint="fp_az")[6:]), sse.DONE]
    answer = wire.assemble(events)
    assert answer["system_fingerprint"] == "fp_az" and "service_tier" not in answer
    assert answer["choices"][0]["message"]["content"] == "hi"


def test_several_choices_by_index_interleaved_and_the_usage_chunk():
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    events = [chunk(delta(1, role="assistant", content="")), chunk(delta(0, role="assistant", content="")),
              chunk(delta(1, content="B1 ")), chunk(delta(0, content="A1 ")), chunk(delta(0, content="A2")),
              chunk(delta(1, content="B2")), chunk(delta(1, finish="length")), chunk(delta(0, finish="stop")),
              chunk(usage=usage), sse.DONE]
    answer = wire.assemble(events)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in answer["choices"]] == [
        (0, "A1 A2", "stop"), (1, "B1 B2", "length")]
    assert answer["usage"] == usage


def test_text_completions():
    head = {"id": "cmpl-1", "created": 5, "model": "davinci"}
    events = [sse.event(wire.text_chunk(**head, text="Once")),
              sse.event(wire.text_chunk(**head, text=" upon")),
              sse.event(wire.text_chunk(**head, text="", finish_reason="length")),
              sse.event(wire.text_chunk(**head, text="", usage={"prompt_tokens": 1, "completion_tokens": 2,
                                                                "total_tokens": 3})), sse.DONE]
    assert wire.assemble(events) == {
        "id": "cmpl-1", "object": "text_completion", "created": 5, "model": "davinci",
        "choices": [{"index": 0, "text": "Once upon", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def test_what_is_not_a_chunk_is_skipped():
    assert wire.assemble([]) is None
    assert wire.assemble([sse.DONE, b"data: not json\n\n", b"data: [1, 2]\n\n"]) is None
    events = [b"data: oops\n\n", chunk(delta(content="x")), b'data: "str"\n\n',
              chunk({"index": 0, "delta": "not a dict"}, "junk"), sse.event({**HEAD, "choices": None}),
              sse.event({**HEAD, "choices": {"index": 0, "delta": {"content": "y"}}})]
    assert wire.assemble(events[:2])["choices"][0]["message"]["content"] == "x"
    assert wire.assemble(events)["choices"][0]["message"]["content"] == "x"
    raw = orjson.dumps({**HEAD, "choices": [delta(content="z")]})  # no "data: " framing
    assert wire.assemble([raw])["choices"][0]["message"]["content"] == "z"


def test_odd_tool_call_indexes_do_not_break_it():
    # relayed as the upstream sent them: a missing or non-integer index must neither raise
    # nor lose the arguments (a continuation without index belongs to the call before it)
    events = [chunk(delta(tool_calls=[{"id": "a", "type": "function",
                                       "function": {"name": "f", "arguments": "{"}}])),
              chunk(delta(tool_calls=[{"function": {"arguments": "}"}}])),
              chunk(delta(tool_calls=[{"index": "x", "id": "b",
                                       "function": {"name": "g", "arguments": "[]"}}])),
              chunk(delta(finish="tool_calls"))]
    calls = wire.assemble(events)["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("a", "f", "{}"), ("b", "g", "[]")]


def test_a_leading_chunk_without_id_or_model_does_not_blank_them():
    # Azure sends prompt_filter_results first, in a chunk with empty id, model and object
    first = sse.event({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                       "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]})
    answer = wire.assemble([first, chunk(delta(role="assistant", content="hi")), chunk(delta(finish="stop"))])
    assert (answer["id"], answer["model"], answer["created"], answer["object"]) == \
        ("chatcmpl-1", "gpt-4o", 1700000000, "chat.completion")
    text = sse.event(wire.text_chunk(id="cmpl-2", model="m", created=3, text="abc"))
    answer = wire.assemble([first, text])
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"] == "abc"


# ---------------------------------------------------------------- round trips

_text = st.text(max_size=40)
_name = st.text(st.characters(categories=("L", "N")), min_size=1, max_size=12)
_usage = st.fixed_dictionaries({"prompt_tokens": st.integers(0, 10**6),
                                "completion_tokens": st.integers(0, 10**6),
                                "total_tokens": st.integers(0, 2 * 10**6)})
_tool_call = st.fixed_dictionaries({"id": _name.map("call_".__add__), "type": st.just("function"),
                                    "function": st.fixed_dictionaries({"name": _name, "arguments": _text})})


_token = st.fixed_dictionaries({"token": _text, "logprob": st.floats(-20, 0), "bytes": st.none(),
                                "top_logprobs": st.just([])})
_extras = st.fixed_dictionaries({}, optional={"system_fingerprint": _name.map("fp_".__add__),
                                              "service_tier": st.sampled_from(["default", "flex"])})


@st.composite
def _message(draw: st.DrawFn) -> dict[str, Any]:
    tools = draw(st.lists(_tool_call, max_size=3))
    refusal = draw(st.none() | st.text(min_size=1, max_size=30))
    # a whole answer's content is null beside tool calls or a refusal, unless it has text
    content = draw(_text.filter(bool) | st.none()) if tools or refusal else draw(_text | st.none())
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    reasoning = draw(st.none() | st.text(min_size=1, max_size=40))
    if reasoning:  # DeepSeek's name, or vLLM's and OpenRouter's
        message[draw(st.sampled_from(wire.REASONING))] = reasoning
    if tools:
        message["tool_calls"] = tools
    return message


@st.composite
def chat_answers(draw: st.DrawFn) -> dict[str, Any]:
    indexes = draw(st.permutations(range(draw(st.integers(1, 3)))))
    choices = [{"index": i, "message": draw(_message()),
                "logprobs": draw(st.none() | st.fixed_dictionaries({"content": st.lists(_token, max_size=4),
                                                                    "refusal": st.none()})),
                "finish_reason": draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))}
               for i in indexes]
    answer = {"id": draw(_name.map("chatcmpl-".__add__)), "object": "chat.completion",
              "created": draw(st.integers(0, 2**31)), "model": draw(_name), "choices": choices,
              **draw(_extras)}
    if draw(st.booleans()):
        answer["usage"] = draw(_usage)
    return answer


@st.composite
def _text_logprobs(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 4))
    return {"tokens": draw(st.lists(_text, min_size=n, max_size=n)),
            "token_logprobs": draw(st.lists(st.floats(-20, 0), min_size=n, max_size=n)),
            "top_logprobs": [{} for _ in range(n)], "text_offset": list(range(n))}


@st.composite
def text_answers(draw: st.DrawFn) -> dict[str, Any]:
    indexes = draw(st.permutations(range(draw(st.integers(1, 3)))))
    answer = {"id": draw(_name.map("cmpl-".__add__)), "object": "text_completion",
              "created": draw(st.integers(0, 2**31)), "model": draw(_name),
              "choices": [{"index": i, "text": draw(_text), "logprobs": draw(st.none() | _text_logprobs()),
                           "finish_reason": draw(st.sampled_from(["stop", "length"]))} for i in indexes],
              **draw(_extras)}
    if draw(st.booleans()):
        answer["usage"] = draw(_usage)
    return answer


def expected(answer: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    out = copy.deepcopy(answer)
    out["choices"].sort(key=lambda c: c["index"])
    if not include_usage:
        out.pop("usage", None)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=chat_answers() | text_answers(), include_usage=st.booleans())
def test_assemble_inverts_replay(answer, include_usage):
    events = [sse.event(c) for c in wire.replay_chunks(answer, include_usage)] + [sse.DONE]
    assert wire.assemble(events) == expected(answer, include_usage)


def _pieces(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=4))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[dict[str, Any], list[bytes]]:
    """A chat answer and a stream of it as an upstream sends one: content, refusal and
    each tool call's arguments cut into pieces, the choices' chunks interleaved."""
    answer = draw(chat_answers())
    head = {k: answer[k] for k in ("id", "created", "model")}
    extras = {k: answer[k] for k in wire.HEAD_EXTRAS if k in answer}
    per_choice: list[list[dict[str, Any]]] = []
    for choice in answer["choices"]:
        i, message = choice["index"], choice["message"]
        opening = "" if message["content"] is not None else None
        parts: list[dict[str, Any]] = [{"role": "assistant", "content": opening}]
        for key in wire.REASONING:  # reasoning first, as reasoning models send it
            parts += [{key: p} for p in _pieces(draw, message.get(key) or "") if p]
        parts += [{"content": p} for p in _pieces(draw, message["content"] or "") if p]
        parts += [{"refusal": p} for p in _pieces(draw, message["refusal"] or "") if p]
        for n, call in enumerate(message.get("tool_calls") or []):
            args = _pieces(draw, call["function"]["arguments"]) or [""]
            name = call["function"]["name"]
            parts.append({"tool_calls": [{"index": n, "id": call["id"], "type": "function",
                                          "function": {"name": name, "arguments": args[0]}}]})
            parts += [{"tool_calls": [{"index": n, "function": {"arguments": a}}]} for a in args[1:]]
        chunks = [wire.chat_chunk(**head, delta=d, index=i) for d in parts]
        chunks.append(wire.chat_chunk(**head, delta={}, finish_reason=choice["finish_reason"], index=i))
        if choice["logprobs"] is not None:  # each chunk's tokens' logprobs, in order
            tokens = choice["logprobs"]["content"]
            cuts = sorted(draw(st.lists(st.integers(0, len(tokens)), min_size=len(chunks) - 1,
                                        max_size=len(chunks) - 1)))
            for c, a, b in zip(chunks, [0, *cuts], [*cuts, len(tokens)], strict=True):
                c["choices"][0]["logprobs"] = {"content": tokens[a:b], "refusal": None}
        for c in chunks:
            c.update(extras)
        per_choice.append(chunks)
    stream: list[dict[str, Any]] = []
    while any(per_choice):
        queue = draw(st.sampled_from([q for q in per_choice if q]))
        stream.append(queue.pop(0))
    if "usage" in answer:
        stream.append({**wire.chat_chunk(**head, usage=answer["usage"]), **extras})
    return answer, [sse.event(c) for c in stream] + [sse.DONE]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=split_streams())
def test_assemble_joins_a_stream_split_anywhere(case):
    answer, events = case
    assert wire.assemble(events) == expected(answer, include_usage=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=split_streams(), data=st.data())
def test_folding_a_stream_as_it_goes_changes_nothing_it_adds_up_to(case, data):
    """The gateway folds a long stream's sent events every FOLD_AT; wherever the folds
    fall, and however often, the answer assembled at the end is the same."""
    from aiproxy.relay import fold

    answer, events = case
    cuts = sorted(data.draw(st.sets(st.integers(1, len(events)), max_size=4)))
    held: list[bytes] = []
    last = 0
    for cut in cuts:
        held = fold(held + events[last:cut])
        last = cut
    held += events[last:]
    assert wire.assemble(held) == wire.assemble(events) == expected(answer, include_usage=True)


def test_a_long_stream_holds_a_bounded_number_of_events():
    from aiproxy.relay import FOLD_AT, fold

    head = {"id": "c1", "created": 1, "model": "m"}
    held: list[bytes] = []
    for n in range(5 * FOLD_AT):
        held.append(sse.event(wire.chat_chunk(**head, delta={"content": f"{n} "})))
        if len(held) >= FOLD_AT:
            held[:] = fold(held)
        assert len(held) < FOLD_AT
    held.append(sse.event(wire.chat_chunk(**head, delta={}, finish_reason="stop")))
    got = wire.assemble(held)
    assert got is not None
    assert got["choices"][0]["message"]["content"] == "".join(f"{n} " for n in range(5 * FOLD_AT))
    assert got["choices"][0]["finish_reason"] == "stop"
