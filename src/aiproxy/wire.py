"""OpenAI wire objects, built by providers that translate and by the core's replays."""

from __future__ import annotations

import base64
import os
import struct
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

from aiproxy.errors import invalid


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def chat_completion(*, id: str, model: str, message: dict[str, Any], finish_reason: str | None,
                    usage: dict[str, Any] | None, created: int | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        data["usage"] = usage
    if extra:
        data.update(extra)
    return data


def chat_chunk(*, id: str, model: str, created: int, delta: dict[str, Any] | None = None,
               finish_reason: str | None = None, usage: dict[str, Any] | None = None,
               index: int = 0) -> dict[str, Any]:
    """One ``chat.completion.chunk``. With ``usage`` and no delta: the usage-only chunk."""
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    if delta is None and usage is not None:
        chunk["choices"] = []
    else:
        chunk["choices"] = [{"index": index, "delta": delta or {}, "logprobs": None,
                             "finish_reason": finish_reason}]
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def text_completion(*, id: str, model: str, text: str, finish_reason: str | None,
                    usage: dict[str, Any] | None, created: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        data["usage"] = usage
    return data


def text_chunk(*, id: str, model: str, created: int, text: str, finish_reason: str | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": id, "object": "text_completion", "created": created, "model": model}
    chunk["choices"] = [] if (usage is not None and not text and finish_reason is None) else [
        {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def embedding_list(*, model: str, vectors: Sequence[Sequence[float]], encoding_format: str | None,
                   prompt_tokens: int) -> dict[str, Any]:
    """An embeddings answer; ``base64`` packs each vector as little-endian float32, as OpenAI does."""
    as_b64 = encoding_format == "base64"
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i,
                  "embedding": pack_floats(v) if as_b64 else list(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def pack_floats(vector: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def unpack_floats(packed: str) -> list[float]:
    raw = base64.b64decode(packed)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def model_object(model_id: str, owned_by: str, created: int = 0) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


#: a message's reasoning, as upstreams name it: ``reasoning_content`` (DeepSeek, and the
#: gateway's own providers), ``reasoning`` (vLLM, OpenRouter, Ollama's OpenAI API)
REASONING = ("reasoning_content", "reasoning")
#: top-level fields of an answer that every chunk of its stream repeats
HEAD_EXTRAS = ("system_fingerprint", "service_tier")


def replay_chunks(data: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """A whole chat or text completion as the chunks a stream of it would have had: per
    choice, one delta with all of its message (reasoning, content, refusal, tool calls)
    and its logprobs, then one with its finish reason."""
    cid, model, created = data.get("id", new_id("chatcmpl")), data.get("model", ""), data.get("created", 0)
    text_mode = data.get("object") == "text_completion"
    extra = {key: data[key] for key in HEAD_EXTRAS if data.get(key) is not None}
    for choice in data.get("choices") or []:
        index = choice.get("index", 0)
        if text_mode:
            yield {"id": cid, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": index, "text": choice.get("text", ""),
                                "logprobs": choice.get("logprobs"),
                                "finish_reason": choice.get("finish_reason")}],
                   **extra}
            continue
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
        for key in REASONING:
            if message.get(key):
                delta[key] = message[key]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        if message.get("refusal"):
            delta["refusal"] = message["refusal"]
        first = chat_chunk(id=cid, model=model, created=created, delta=delta, index=index)
        if choice.get("logprobs") is not None:
            first["choices"][0]["logprobs"] = choice["logprobs"]
        yield {**first, **extra} if extra else first
        last = chat_chunk(id=cid, model=model, created=created, delta={},
                          finish_reason=choice.get("finish_reason"), index=index)
        yield {**last, **extra} if extra else last
    if include_usage and data.get("usage") is not None:
        if text_mode:
            chunk = text_chunk(id=cid, model=model, created=created, text="", usage=data["usage"])
        else:
            chunk = chat_chunk(id=cid, model=model, created=created, usage=data["usage"])
        yield {**chunk, **extra} if extra else chunk


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def tool_arguments(raw: Any, where: str) -> dict[str, Any]:
    """An OpenAI tool call's ``function.arguments`` (a JSON object encoded as a string) as
    a dict, for upstreams that take it parsed; a 400 naming ``where`` when it is not one."""
    if isinstance(raw, dict):
        return raw
    if raw is None or raw == "":
        return {}
    try:
        value = orjson.loads(raw) if isinstance(raw, str) else None
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise invalid(f"'{where}' must be a JSON object encoded as a string", where)
    return value


def assemble(events: Sequence[bytes | dict[str, Any]]) -> dict[str, Any] | None:
    """The whole answer a stream of OpenAI SSE events adds up to (the inverse of
    :func:`replay_chunks`): content, refusal, reasoning (``reasoning_content`` or
    ``reasoning``), tool calls and logprobs joined per choice, the last finish reason, the
    usage chunk's usage, and ``system_fingerprint`` / ``service_tier`` (every chunk repeats
    them: the first chunk's, else the last's). None when no event held a chunk.

    ``events`` are the gateway's outgoing events (``data: {...}\\n\\n``), or chunks it
    has decoded already; ``[DONE]`` and anything that is not a JSON object are skipped.
    The answer is shaped as a whole one is: ``content`` is null beside tool calls or a
    refusal unless there was text, and ``refusal`` is always there. ``id``, ``model`` and
    ``created`` are the first non-empty ones (Azure leads with a chunk of empty ones holding
    its prompt filter results).
    """
    first: dict[str, Any] | None = None
    head: dict[str, Any] = {}
    text_mode: bool | None = None
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    for raw in events:
        if isinstance(raw, dict):  # decoded already
            chunk = raw
        else:
            data = raw[6:] if raw.startswith(b"data: ") else raw
            if data.startswith(b"[DONE]"):
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(chunk, dict):
                continue
        if first is None:
            first = chunk
        if len(head) < 3:
            for key in ("id", "created", "model"):
                if key not in head and chunk.get(key):
                    head[key] = chunk[key]
        if text_mode is None and chunk.get("object"):
            text_mode = chunk["object"] == "text_completion"
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        listed = chunk.get("choices")
        for choice in listed if isinstance(listed, list) else ():
            if isinstance(choice, dict):
                _merge_choice(choices, choice, bool(text_mode))
    if first is None:
        return None
    out: dict[str, Any] = {"id": head.get("id", first.get("id")),
                           "object": "text_completion" if text_mode else "chat.completion",
                           "created": head.get("created", 0), "model": head.get("model", "")}
    out["choices"] = [_finish_choice(c, bool(text_mode)) for _, c in sorted(choices.items())]
    if usage is not None:
        out["usage"] = usage
    # read off two chunks, not each one: Azure's first holds only its prompt filter results
    last = chunk if isinstance(chunk, dict) else first  # the loop's last decoded one
    for key in HEAD_EXTRAS:
        value = first.get(key)
        if value is None:
            value = last.get(key)
        if value is not None:
            out[key] = value
    return out


def _merge_choice(choices: dict[int, dict[str, Any]], choice: dict[str, Any], text_mode: bool) -> None:
    index = choice.get("index", 0)
    if type(index) is not int:
        index = 0
    acc = choices.get(index)
    if acc is None:  # not setdefault: that would build a new accumulator for every chunk
        acc = choices[index] = {"index": index, "parts": [], "refusal": [], "tools": {},
                                "role": "assistant", "finish_reason": None, "last_tool": 0,
                                "reasoning": {}, "logprobs": None}
    if choice.get("finish_reason") is not None:
        acc["finish_reason"] = choice["finish_reason"]
    logprobs = choice.get("logprobs")
    if logprobs is not None:
        acc["logprobs"] = _join_logprobs(acc["logprobs"], logprobs)
    if text_mode:
        if isinstance(choice.get("text"), str):
            acc["parts"].append(choice["text"])
        return
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    content = delta.get("content")
    if type(content) is str:
        acc["parts"].append(content)
    if len(delta) == 1 and content is not None:
        return  # the usual chunk: one piece of text
    if isinstance(delta.get("role"), str):
        acc["role"] = delta["role"]
    if isinstance(delta.get("refusal"), str):
        acc["refusal"].append(delta["refusal"])
    for key in REASONING:
        piece = delta.get(key)
        if type(piece) is str and piece:  # some servers open with an empty one
            acc["reasoning"].setdefault(key, []).append(piece)
    calls = delta.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            continue
        slot = acc["last_tool"] = _tool_slot(acc, call)
        tool = acc["tools"].get(slot)
        if tool is None:
            tool = acc["tools"][slot] = {"id": None, "type": "function", "name": [], "arguments": []}
        if call.get("id"):
            tool["id"] = call["id"]
        function = call.get("function")
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                tool["name"].append(function["name"])
            if isinstance(function.get("arguments"), str):
                tool["arguments"].append(function["arguments"])


def _tool_slot(acc: dict[str, Any], call: dict[str, Any]) -> int:
    """Which tool call a fragment belongs to: its index; without one (some OpenAI-compatible
    servers), the call with its id, a new call for a new id, else the call before it."""
    index = call.get("index")
    if type(index) is int:
        return index
    tools: dict[int, dict[str, Any]] = acc["tools"]
    cid = call.get("id")
    if cid:
        for slot, tool in tools.items():
            if tool["id"] == cid:
                return slot
        return max(tools, default=-1) + 1
    return int(acc["last_tool"])


def _join_logprobs(acc: Any, more: Any) -> Any:
    """Logprobs so far and a chunk's: each list (chat: ``content``, ``refusal``; text:
    ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) joined, the rest kept."""
    if not isinstance(more, dict):
        return acc
    if not isinstance(acc, dict):  # lists copied: they grow in place from here
        return {key: list(value) if isinstance(value, list) else value for key, value in more.items()}
    for key, value in more.items():
        if isinstance(value, list) and isinstance(acc.get(key), list):
            acc[key].extend(value)
        elif isinstance(value, list):
            acc[key] = list(value)
        elif value is not None or key not in acc:
            acc[key] = value
    return acc


def _finish_choice(acc: dict[str, Any], text_mode: bool) -> dict[str, Any]:
    if text_mode:
        return {"index": acc["index"], "text": "".join(acc["parts"]), "logprobs": acc["logprobs"],
                "finish_reason": acc["finish_reason"]}
    text, refusal = "".join(acc["parts"]), "".join(acc["refusal"])
    message: dict[str, Any] = {
        "role": acc["role"],
        "content": text if text or (acc["parts"] and not acc["tools"] and not refusal) else None,
        "refusal": refusal or None}
    for key, pieces in acc["reasoning"].items():
        message[key] = "".join(pieces)
    if acc["tools"]:
        message["tool_calls"] = [
            {"id": t["id"], "type": "function",
             "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])}}
            for _, t in sorted(acc["tools"].items())]
    return {"index": acc["index"], "message": message, "logprobs": acc["logprobs"],
            "finish_reason": acc["finish_reason"]}
