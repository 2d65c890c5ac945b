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


def replay_chunks(data: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """A whole chat or text completion as the chunks a stream of it would have had."""
    cid, model, created = data.get("id", new_id("chatcmpl")), data.get("model", ""), data.get("created", 0)
    text_mode = data.get("object") == "text_completion"
    for choice in data.get("choices") or []:
        index = choice.get("index", 0)
        if text_mode:
            yield {"id": cid, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": index, "text": choice.get("text", ""), "logprobs": None,
                                "finish_reason": choice.get("finish_reason")}]}
            continue
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        if message.get("refusal"):
            delta["refusal"] = message["refusal"]
        yield chat_chunk(id=cid, model=model, created=created, delta=delta, index=index)
        yield chat_chunk(id=cid, model=model, created=created, delta={},
                         finish_reason=choice.get("finish_reason"), index=index)
    if include_usage and data.get("usage") is not None:
        if text_mode:
            yield text_chunk(id=cid, model=model, created=created, text="", usage=data["usage"])
        else:
            yield chat_chunk(id=cid, model=model, created=created, usage=data["usage"])


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
