"""A deterministic provider for tests, demos and benchmarks: no network, no keys.

The same request always gets the same answer. Options (provider ``options:``, model
``options:``, or per request as a ``mock`` object in the body — the OpenAI SDK's
``extra_body={"mock": {...}}``), later ones winning:

==================  ===============================================================
``latency_ms``      wait before the answer / the first chunk (default 0)
``chunk_delay_ms``  wait between stream chunks (default 0)
``tokens``          words in a reply (default 12); usage counts words as tokens
``chunk_size``      words per stream chunk (default 1)
``reply``           a fixed reply text instead of generated words
``tool_call``       false: never call tools; ``"all"``: call every tool at once;
                    default: call the first (or the chosen) tool when the request
                    has tools and its last message is not a tool result
``error``           answer with this upstream status (429, 500, 503, 529, …)
``error_rate``      that error for this fraction of calls, from a seeded RNG
``retry_after``     ``retry-after`` seconds sent with the error
``error_after``     a stream fails after this many chunks
``dimensions``      embedding size (default 64, or the request's ``dimensions``)
``models``          ids listed for a wildcard model entry (``mock-*``)
==================  ===============================================================
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from aiproxy import hookimpl, sse, wire
from aiproxy.call import Usage
from aiproxy.config import ProviderConfig
from aiproxy.errors import invalid
from aiproxy.provider import Provider, Reply
from aiproxy.upstream import upstream_error

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.router import Deployment

VOCABULARY = (
    "the gateway answers every request with words chosen from a small fixed list so that "
    "tests demos and benchmarks see stable text streams usage counts tool calls and errors "
    "without any network keys or cost while clients exercise streaming parsing retries "
    "fallbacks caching limits and logging end to end"
).split()
_DEFAULTS: dict[str, Any] = {"latency_ms": 0, "chunk_delay_ms": 0, "tokens": 12, "chunk_size": 1,
                             "dimensions": 64}
#: numeric options: type and bounds. A client may send any of them, so a bad one is a
#: 400 naming it, not a 500, and none can make the gateway build a gigantic answer.
_NUMBERS: dict[str, tuple[type, float, float]] = {
    "latency_ms": (float, 0, 600_000), "chunk_delay_ms": (float, 0, 60_000),
    "tokens": (int, 0, 100_000), "chunk_size": (int, 1, 100_000), "dimensions": (int, 1, 8192),
    "error": (int, 0, 599), "error_rate": (float, 0, 1), "retry_after": (int, 0, 86_400),
    "error_after": (int, 0, 100_000),
}


class MockProvider(Provider):
    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        self._rng = random.Random(int(config.options.get("seed", 0)))

    # ------------------------------------------------------------ options and faults
    def _options(self, call: Call, deployment: Deployment) -> dict[str, Any]:
        opts = {**_DEFAULTS, **deployment.options}
        extra = call.body.get("mock")
        if isinstance(extra, dict):
            opts.update(extra)
        for key, (kind, low, high) in _NUMBERS.items():
            value = opts.get(key)
            if value is None:
                continue
            try:
                if isinstance(value, bool) or not isinstance(value, int | float | str):
                    raise ValueError
                number = kind(value)
            except (ValueError, OverflowError):
                raise invalid(f"'mock.{key}' must be a number, got {value!r}", f"mock.{key}") from None
            if not low <= number <= high:
                raise invalid(f"'mock.{key}' must be between {low:g} and {high:g}, got {value!r}",
                              f"mock.{key}")
            opts[key] = number
        return opts

    async def _begin(self, opts: dict[str, Any]) -> None:
        if opts["latency_ms"]:
            await asyncio.sleep(float(opts["latency_ms"]) / 1000)
        status = opts.get("error")
        if status and (not opts.get("error_rate") or self._rng.random() < float(opts["error_rate"])):
            self._fail(int(status), opts)

    def _fail(self, status: int, opts: dict[str, Any]) -> None:
        headers = {"retry-after": str(opts["retry_after"])} if opts.get("retry_after") is not None else {}
        body = orjson.dumps({"error": {"message": f"mock upstream error {status}", "type": "mock_error"}})
        raise upstream_error(self.name, status, body, headers)

    # ------------------------------------------------------------ content
    def _words(self, seed_text: str, count: int, opts: dict[str, Any]) -> list[str]:
        if opts.get("reply") is not None:
            return str(opts["reply"]).split(" ")
        seed, count = zlib.crc32(seed_text.encode()), max(0, int(count))
        if count > 512:  # keep the cache small whatever clients ask for
            return list(_generated.__wrapped__(seed, count))
        return list(_generated(seed, count))

    def _tool_calls(self, call: Call, opts: dict[str, Any]) -> list[dict[str, Any]]:
        tools = call.body.get("tools") or []
        messages = call.body.get("messages") or []
        choice = call.body.get("tool_choice", "auto")
        if not tools or choice == "none" or opts.get("tool_call") is False:
            return []
        if messages and messages[-1].get("role") == "tool":
            return []
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            chosen = [t for t in tools if t["function"]["name"] == name] or tools[:1]
        elif opts.get("tool_call") == "all":
            chosen = tools
        else:
            chosen = tools[:1]
        calls = []
        for i, tool in enumerate(chosen):
            fn = tool["function"]
            args = _arguments(fn.get("parameters") or {})
            digest = hashlib.sha256(f"{call.request_id}:{i}".encode()).hexdigest()[:24]
            calls.append({"id": f"call_{digest}", "type": "function",
                          "function": {"name": fn["name"], "arguments": orjson.dumps(args).decode()}})
        return calls

    # ------------------------------------------------------------ operations
    async def chat(self, call: Call, deployment: Deployment) -> Reply:
        opts = self._options(call, deployment)
        await self._begin(opts)
        prompt_text = _chat_text(call.body)
        n = int(call.body.get("n") or 1)
        choices, completion_tokens = [], 0
        tool_calls = self._tool_calls(call, opts)
        for i in range(n):
            if tool_calls:
                message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": tool_calls}
                finish = "tool_calls"
                completion_tokens += sum(len(c["function"]["arguments"]) // 4 + 1 for c in tool_calls)
            else:
                words = self._words(f"{prompt_text}#{i}", opts["tokens"], opts)
                message, finish = {"role": "assistant", "content": " ".join(words)}, "stop"
                completion_tokens += len(words)
            message.setdefault("refusal", None)
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
        usage = _usage(_prompt_tokens(call.body), completion_tokens)
        data = {"id": wire.new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": call.upstream_model, "choices": choices, "usage": usage,
                "system_fingerprint": "fp_mock"}
        return Reply(data)

    async def chat_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        opts = self._options(call, deployment)
        await self._begin(opts)
        cid, created, model = wire.new_id("chatcmpl"), int(time.time()), call.upstream_model
        prompt_text = _chat_text(call.body)
        tool_calls = self._tool_calls(call, opts)
        delay = float(opts["chunk_delay_ms"]) / 1000
        fail_after = opts.get("error_after")
        completion_tokens = 0
        sent = 0

        async def emit(delta: dict[str, Any], finish: str | None = None) -> bytes:
            nonlocal sent
            if fail_after is not None and sent >= int(fail_after):
                self._fail(int(opts.get("error") or 502), opts)
            if sent and delay:
                await asyncio.sleep(delay)
            sent += 1
            return sse.event(wire.chat_chunk(id=cid, model=model, created=created, delta=delta,
                                             finish_reason=finish))

        yield await emit({"role": "assistant", "content": "" if not tool_calls else None})
        if tool_calls:
            for i, tc in enumerate(tool_calls):
                args = tc["function"]["arguments"]
                head = {"index": i, "id": tc["id"], "type": "function",
                        "function": {"name": tc["function"]["name"], "arguments": ""}}
                yield await emit({"tool_calls": [head]})
                half = len(args) // 2
                for piece in (args[:half], args[half:]):
                    if piece:
                        yield await emit({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                completion_tokens += len(args) // 4 + 1
            finish = "tool_calls"
        else:
            words = self._words(f"{prompt_text}#0", opts["tokens"], opts)
            size = max(1, int(opts["chunk_size"]))
            for start in range(0, len(words), size):
                piece = " ".join(words[start:start + size])
                yield await emit({"content": piece if start == 0 else " " + piece})
            completion_tokens = len(words)
            finish = "stop"
        yield await emit({}, finish)
        usage = _usage(_prompt_tokens(call.body), completion_tokens)
        call.usage = Usage.from_openai(usage)
        if call.include_usage:
            yield sse.event(wire.chat_chunk(id=cid, model=model, created=created, usage=usage))

    async def completion(self, call: Call, deployment: Deployment) -> Reply:
        opts = self._options(call, deployment)
        await self._begin(opts)
        prompt = _prompt_text(call.body.get("prompt"))
        words = self._words(prompt, opts["tokens"], opts)
        return Reply(wire.text_completion(id=wire.new_id("cmpl"), model=call.upstream_model,
                                          text=" ".join(words), finish_reason="stop",
                                          usage=_usage(len(prompt.split()), len(words))))

    async def completion_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        opts = self._options(call, deployment)
        await self._begin(opts)
        cid, created, model = wire.new_id("cmpl"), int(time.time()), call.upstream_model
        prompt = _prompt_text(call.body.get("prompt"))
        words = self._words(prompt, opts["tokens"], opts)
        delay = float(opts["chunk_delay_ms"]) / 1000
        for i, word in enumerate(words):
            if i and delay:
                await asyncio.sleep(delay)
            yield sse.event(wire.text_chunk(id=cid, model=model, created=created,
                                            text=word if i == 0 else " " + word))
        yield sse.event(wire.text_chunk(id=cid, model=model, created=created, text="",
                                        finish_reason="stop"))
        usage = _usage(len(prompt.split()), len(words))
        call.usage = Usage.from_openai(usage)
        if call.include_usage:
            yield sse.event(wire.text_chunk(id=cid, model=model, created=created, text="", usage=usage))

    async def embedding(self, call: Call, deployment: Deployment) -> Reply:
        opts = self._options(call, deployment)
        await self._begin(opts)
        raw = call.body["input"]
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        dims = int(call.body.get("dimensions") or opts["dimensions"])
        if dims > 8192:
            raise invalid(f"'dimensions' must be at most 8192 for the mock provider, got {dims}",
                          "dimensions")
        vectors = [_vector(orjson.dumps(item), dims) for item in inputs]
        tokens = sum(len(item.split()) if isinstance(item, str) else len(item) for item in inputs)
        return Reply(wire.embedding_list(model=call.upstream_model, vectors=vectors,
                                         encoding_format=call.body.get("encoding_format"),
                                         prompt_tokens=tokens))

    async def count_tokens(self, call: Call, deployment: Deployment) -> int:
        """The prompt tokens a chat call with this body would report in its usage."""
        return _prompt_tokens(call.body)

    async def list_models(self) -> list[str]:
        models = self.config.options.get("models") or []
        return [str(m) for m in models]


@functools.lru_cache(maxsize=4096)
def _generated(seed: int, count: int) -> tuple[str, ...]:
    """The words for one seed: seeding an RNG costs more than the rest of a mock call."""
    rng = random.Random(seed)
    return tuple(rng.choice(VOCABULARY) for _ in range(count))


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A chat prompt's tokens as the mock counts them: its words, and 3 per message."""
    return len(_chat_text(body).split()) + 3 * len(body.get("messages") or [])


def _chat_text(body: dict[str, Any]) -> str:
    parts = []
    for m in body.get("messages") or []:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return " ".join(parts)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(str(p) for p in prompt)
    return ""


def _vector(seed: bytes, dims: int) -> list[float]:
    """A deterministic unit vector for ``seed``."""
    out: list[float] = []
    block = 0
    while len(out) < dims:
        digest = hashlib.sha256(seed + block.to_bytes(4, "little")).digest()
        out.extend((v / 32768.0) for v in struct.unpack("<16h", digest))
        block += 1
    out = out[:dims]
    norm = sum(v * v for v in out) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in out]


def _arguments(schema: dict[str, Any]) -> dict[str, Any]:
    props = schema.get("properties") or {}
    return {name: _example(spec) for name, spec in props.items() if isinstance(spec, dict)}


def _example(spec: dict[str, Any]) -> Any:
    if spec.get("enum"):
        return spec["enum"][0]
    kind = spec.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if not isinstance(kind, str):
        return "mock"
    return {"string": "mock", "integer": 1, "number": 1.5, "boolean": True, "array": [],
            "object": _arguments(spec), "null": None}.get(kind, "mock")


@hookimpl
def aiproxy_register_providers(register: Any) -> None:
    register("mock", MockProvider)
