"""Ollama's native API: ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``.

OpenAI → Ollama:

- ``messages``: ``developer`` → ``system``; content parts → text joined, ``data:`` image URLs
  → base64 ``images`` (http(s) URLs are a 400: the gateway fetches nothing); assistant
  ``tool_calls`` → ``arguments`` as an object; ``tool`` → ``tool_name`` found by call id;
- ``temperature``, ``top_p``, ``seed``, ``stop``, ``presence_penalty``, ``frequency_penalty``
  and ``max_completion_tokens``/``max_tokens`` (→ ``num_predict``) → ``options``, over a body
  ``options`` object (``extra_body``: ``num_ctx``, ``top_k``, …); ``keep_alive``, ``think`` pass;
- ``response_format`` ``json_object`` → ``format: "json"``, ``json_schema`` → its schema;
  ``tools`` as they are (``tool_choice: "none"`` drops them); ``prompt`` (one string) and
  ``suffix`` → ``/api/generate``; ``input`` and ``dimensions`` → ``/api/embed``;
- ``n`` > 1, token-id prompts or inputs: a 400 naming the field.

Ollama → OpenAI: content/``response`` → content/text, ``thinking`` → ``reasoning_content``;
``tool_calls`` get ids ``call_<hex>`` and JSON-string ``arguments``; finish ``tool_calls``
with tool calls, ``length`` when ``done_reason`` says so, else ``stop``;
``prompt_eval_count``/``eval_count`` → usage. Each NDJSON line of a stream goes out as an SSE
chunk when it arrives; an ``{"error": …}`` line ends it with a 502 error event.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import orjson

from aiproxy import hookimpl, sse, wire
from aiproxy.call import Usage
from aiproxy.errors import invalid
from aiproxy.provider import Reply
from aiproxy.upstream import HTTPProvider, invalid_response, parse_json

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.router import Deployment

_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_PASSED = ("keep_alive", "think")
_ROLES = {"developer": "system", "function": "tool"}
Chunks = Callable[[dict[str, Any]], list[dict[str, Any]]]


class OllamaProvider(HTTPProvider):
    required = ("api_base",)

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key  # a plain Ollama takes none; one behind an auth proxy may
        return {"authorization": f"Bearer {key}"} if key else {}

    # ------------------------------------------------------------ plumbing
    async def _post(self, call: Call, deployment: Deployment, path: str,
                    body: dict[str, Any]) -> dict[str, Any]:
        return (await self.post_json(call, deployment, path, body))[0]

    async def _stream(self, call: Call, deployment: Deployment, path: str, body: dict[str, Any],
                      chunks: Chunks) -> AsyncIterator[bytes]:
        """POST ``body``; relay each NDJSON line as ``chunks`` translates it, when it arrives."""
        done = False
        async with self.streaming(self.build(call, deployment, path, body)) as response:
            async for line in sse.ndjson_lines(response.aiter_bytes()):
                data = self._record(line)
                if data.get("done"):
                    done = True
                    call.usage = Usage.from_openai(_usage(data))
                for chunk in chunks(data):
                    yield sse.event(chunk)
            if not done:
                raise invalid_response(self.name, "the stream ended before its last line")

    def _record(self, line: bytes) -> dict[str, Any]:
        data = parse_json(self.name, line)
        if "error" in data:
            raise self.stream_error(str(data["error"]))
        return data

    # ------------------------------------------------------------ operations
    async def chat(self, call: Call, deployment: Deployment) -> Reply:
        data = await self._post(call, deployment, "/api/chat", _chat_body(call, stream=False))
        message = _delta(data)
        calls = message.get("tool_calls")
        out = {"role": "assistant", "content": None if calls else "", "refusal": None, **message}
        return Reply(wire.chat_completion(id=wire.new_id("chatcmpl"), model=_model(call, data),
                                          message=out, finish_reason=_finish(data, bool(calls)),
                                          usage=_usage(data)))

    def chat_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        body = _chat_body(call, stream=True)  # a bad request fails before anything is sent
        cid, created, model = wire.new_id("chatcmpl"), int(time.time()), call.upstream_model
        want_usage = call.include_usage
        sent, tools = 0, 0

        def chunks(data: dict[str, Any]) -> list[dict[str, Any]]:
            nonlocal sent, tools
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if not sent else {}
            delta.update(_delta(data))
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": tools + i, **c} for i, c in enumerate(delta["tool_calls"])]
                tools += len(delta["tool_calls"])
            out = [wire.chat_chunk(id=cid, model=model, created=created, delta=delta)] if delta else []
            if data.get("done"):
                out.append(wire.chat_chunk(id=cid, model=model, created=created, delta={},
                                           finish_reason=_finish(data, tools > 0)))
                if want_usage:
                    out.append(wire.chat_chunk(id=cid, model=model, created=created, usage=_usage(data)))
            sent += len(out)
            return out

        return self._stream(call, deployment, "/api/chat", body, chunks)

    async def completion(self, call: Call, deployment: Deployment) -> Reply:
        data = await self._post(call, deployment, "/api/generate", _generate_body(call, stream=False))
        return Reply(wire.text_completion(id=wire.new_id("cmpl"), model=_model(call, data),
                                          text=str(data.get("response") or ""),
                                          finish_reason=_finish(data, False), usage=_usage(data)))

    def completion_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        body = _generate_body(call, stream=True)
        cid, created, model = wire.new_id("cmpl"), int(time.time()), call.upstream_model
        want_usage = call.include_usage

        def chunks(data: dict[str, Any]) -> list[dict[str, Any]]:
            out = []
            if data.get("response"):
                out.append(wire.text_chunk(id=cid, model=model, created=created, text=str(data["response"])))
            if data.get("done"):
                out.append(wire.text_chunk(id=cid, model=model, created=created, text="",
                                           finish_reason=_finish(data, False)))
                if want_usage:
                    out.append(wire.text_chunk(id=cid, model=model, created=created, text="",
                                               usage=_usage(data)))
            return out

        return self._stream(call, deployment, "/api/generate", body, chunks)

    async def embedding(self, call: Call, deployment: Deployment) -> Reply:
        given = call.body.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise invalid("Ollama embeds text only: 'input' must be a string or an array of "
                          "strings, not token ids", "input")
        body: dict[str, Any] = {"model": call.upstream_model, "input": given}
        if call.body.get("dimensions") is not None:
            body["dimensions"] = call.body["dimensions"]
        data = await self._post(call, deployment, "/api/embed", _passed(call.body, body))
        vectors = data.get("embeddings")
        if not isinstance(vectors, list) or len(vectors) != len(texts) \
                or not all(isinstance(v, list) for v in vectors):
            raise invalid_response(self.name, "expected one embedding per input")
        return Reply(wire.embedding_list(model=_model(call, data), vectors=vectors,
                                         encoding_format=call.body.get("encoding_format"),
                                         prompt_tokens=_int(data.get("prompt_eval_count"))))

    async def list_models(self) -> list[str]:
        models = parse_json(self.name, (await self.send(self.build_get("/api/tags"))).content).get("models")
        if not isinstance(models, list):
            return []
        return [m["name"] for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]


# ------------------------------------------------------------ requests
def _chat_body(call: Call, stream: bool) -> dict[str, Any]:
    src = call.body
    body = _common(call, stream)
    body["messages"] = _messages(src.get("messages") or [])
    if src.get("tools") and src.get("tool_choice") != "none":
        body["tools"] = src["tools"]
    return body


def _generate_body(call: Call, stream: bool) -> dict[str, Any]:
    prompt = call.body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("Ollama takes one text prompt: 'prompt' must be a string or an array of one "
                      "string, not token ids or a batch", "prompt")
    body = _common(call, stream)
    body["prompt"] = prompt
    if isinstance(call.body.get("suffix"), str):
        body["suffix"] = call.body["suffix"]
    return body


def _common(call: Call, stream: bool) -> dict[str, Any]:
    """``model``, ``stream``, ``options``, ``format`` and pass-through fields."""
    src = call.body
    if (src.get("n") or 1) > 1:
        raise invalid("Ollama returns one choice per request: 'n' must be 1", "n")
    body: dict[str, Any] = {"model": call.upstream_model, "stream": stream}
    options = dict(src["options"]) if isinstance(src.get("options"), dict) else {}
    options.update({key: src[key] for key in _SAMPLING if src.get(key) is not None})
    stop = src.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    limit = src.get("max_completion_tokens") or src.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    if options:
        body["options"] = options
    fmt = _format(src.get("response_format"))
    if fmt is not None:
        body["format"] = fmt
    return _passed(src, body)


def _passed(src: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    return {**body, **{key: src[key] for key in _PASSED if src.get(key) is not None}}


def _format(fmt: Any) -> Any:
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return "json"
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("'response_format.json_schema.schema' must be a JSON Schema object",
                          "response_format")
        return schema
    raise invalid(f"Ollama does not support response_format type {fmt['type']!r}", "response_format")


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names: dict[Any, str] = {}  # tool call id → function name, for later tool results
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        text, images = _content(m.get("content"), f"{where}.content")
        msg: dict[str, Any] = {"role": _ROLES.get(str(role), role), "content": text}
        if images:
            msg["images"] = images
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = []
            for j, tc in enumerate(m["tool_calls"]):
                fn = tc["function"]
                names[tc.get("id")] = fn["name"]
                arguments = wire.tool_arguments(fn.get("arguments"),
                                                f"{where}.tool_calls[{j}].function.arguments")
                msg["tool_calls"].append({"function": {"name": fn["name"], "arguments": arguments}})
        name = names.get(m.get("tool_call_id")) if role == "tool" else m.get("name")
        if role in ("tool", "function") and isinstance(name, str):
            msg["tool_name"] = name
        out.append(msg)
    return out


def _content(content: Any, where: str) -> tuple[str, list[str]]:
    """A message's text and its images (bare base64), from a string or content parts."""
    if content is None or isinstance(content, str):
        return content or "", []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text") or ""))
        elif kind == "image_url":
            image = part.get("image_url")
            url = str(image.get("url") if isinstance(image, dict) else image or "")
            param = f"{where}[{j}].image_url"
            head, _, data = url.partition(",")
            if not (head.startswith("data:") and head.endswith(";base64") and data):
                raise invalid(f"'{param}' must be a data:image/...;base64,... URL: Ollama takes images "
                              f"inline and the gateway does not fetch {url[:40]!r}", param)
            images.append(data)
        else:
            raise invalid(f"Ollama does not support content parts of type {kind!r}",
                          f"{where}[{j}].type")
    return "\n".join(texts), images


# ------------------------------------------------------------ answers
def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Ollama tool calls in OpenAI shape, with new ids and ``arguments`` as a JSON string."""
    calls = message.get("tool_calls")
    out = []
    for tc in calls if isinstance(calls, list) else []:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        out.append({"id": f"call_{os.urandom(12).hex()}", "type": "function",
                    "function": {"name": str(fn.get("name") or ""),
                                 "arguments": args if isinstance(args, str)
                                 else orjson.dumps(args if args is not None else {}).decode()}})
    return out


def _delta(data: dict[str, Any]) -> dict[str, Any]:
    """The ``content``, ``reasoning_content`` and ``tool_calls`` of an answer, where present."""
    message: dict[str, Any] = data["message"] if isinstance(data.get("message"), dict) else {}
    out: dict[str, Any] = {}
    if message.get("content"):
        out["content"] = str(message["content"])
    if message.get("thinking"):
        out["reasoning_content"] = str(message["thinking"])
    calls = _tool_calls(message)
    if calls:
        out["tool_calls"] = calls
    return out


def _finish(data: dict[str, Any], tool_calls: bool) -> str:
    return "tool_calls" if tool_calls else "length" if data.get("done_reason") == "length" else "stop"


def _usage(data: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = _int(data.get("prompt_eval_count")), _int(data.get("eval_count"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def _model(call: Call, data: dict[str, Any]) -> str:
    return call.upstream_model or str(data.get("model") or "")


@hookimpl
def aiproxy_register_providers(register: Any) -> None:
    register("ollama", OllamaProvider)
