"""Anthropic Messages requests → the gateway's OpenAI chat shape, checked on the way.

One pass over the body both validates it (a 400 naming the field in Anthropic's dotted
style, ``messages.1.content.0.source``) and builds the OpenAI chat request:

- ``system`` (a string or text blocks) → a first ``system`` message; a ``system`` turn
  inside ``messages`` → a ``system`` message in place;
- ``text`` blocks → text parts; ``image`` blocks (``base64`` or ``url`` source) →
  ``image_url`` parts (a ``data:`` URL for base64); ``document`` blocks: a base64 PDF
  → a ``file`` part, plain text → a text part;
- assistant ``tool_use`` blocks → ``tool_calls`` (``input`` as JSON ``arguments``);
  user ``tool_result`` blocks → ``role: tool`` messages, placed before the rest of that
  turn; images inside a tool result follow as a user message (tool messages carry text);
- ``thinking`` / ``redacted_thinking`` blocks and ``cache_control`` are dropped;
- ``tools`` (client tools, ``input_schema``) → function tools; ``tool_choice`` auto /
  any / tool / none → ``auto`` / ``required`` / a named function / ``none``, and
  ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``;
- ``output_config``: ``format`` (a JSON schema) → ``response_format`` ``json_schema``,
  ``effort`` → ``reasoning_effort`` (``max`` → ``xhigh``);
- ``max_tokens``, ``temperature``, ``top_p``, ``stop_sequences`` (→ ``stop``),
  ``metadata.user_id`` (→ ``user``) and ``stream`` (which also asks for stream usage)
  carry over; ``top_k``, ``thinking`` and Anthropic-only options are dropped (a debug
  log line names them); fields Anthropic does not define pass through untouched, as
  they do on ``/v1/chat/completions`` (``extra_body``).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from aiproxy.errors import ProxyError, invalid

log = logging.getLogger("aiproxy.messages")

ROLES = ("user", "assistant", "system")
#: Anthropic request fields with no OpenAI counterpart: dropped, with a debug log line.
DROPPED = frozenset((
    "top_k", "thinking", "cache_control", "container", "diagnostics", "inference_geo",
    "service_tier", "speed", "user_profile_id", "workspace_id", "mcp_servers",
    "context_management", "betas",
))
#: Anthropic fields this module translates; every other field passes through.
HANDLED = frozenset(("model", "messages", "max_tokens", "system", "stop_sequences", "stream",
                     "temperature", "top_p", "tools", "tool_choice", "metadata",
                     "output_config")) | DROPPED
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "xhigh"}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
MAX_STOP = 4  # what OpenAI-compatible upstreams accept


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _bad(where: str, message: str) -> ProxyError:
    return invalid(f"{where}: {message}", where)


def _string(obj: dict[str, Any], key: str, where: str, *, empty: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        raise _bad(f"{where}.{key}" if where else key, "Field required")
    if not isinstance(value, str) or (not empty and not value):
        raise _bad(f"{where}.{key}" if where else key,
                   f"must be a {'non-empty ' if not empty else ''}string, got {_kind(value)}")
    return value


def _number(body: dict[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(key, f"must be a number, got {_kind(value)}")
    if not low <= value <= high:
        raise _bad(key, f"must be between {low:g} and {high:g}, got {value!r}")


def model_of(body: dict[str, Any]) -> str:
    return _string(body, "model", "", empty=False)


# ---------------------------------------------------------------- the request
def to_chat(body: dict[str, Any], *, count_only: bool = False) -> dict[str, Any]:
    """The OpenAI chat request for an Anthropic Messages request (or a count_tokens one)."""
    out: dict[str, Any] = {"model": model_of(body)}
    if not count_only:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise _bad("max_tokens", "Field required")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _bad("max_tokens", f"must be an integer of at least 1, got {max_tokens!r}")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _system_text(system, "system")})
    given = body.get("messages")
    if given is None:
        raise _bad("messages", "Field required")
    if not isinstance(given, list) or not given:
        raise _bad("messages", "must be a non-empty array of messages")
    for i, message in enumerate(given):
        messages.extend(_message(message, f"messages.{i}"))
    out["messages"] = messages
    if not count_only:
        out["max_tokens"] = body["max_tokens"]
        _sampling(body, out)
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        _tool_choice(choice, out)
    if body.get("output_config") is not None:
        _output_config(body["output_config"], out)
    dropped = []
    for key, value in body.items():
        if key not in HANDLED:
            out[key] = value
        elif key in DROPPED:
            dropped.append(key)
    if dropped:
        log.debug("messages: dropped %s (no OpenAI-shaped counterpart)", ", ".join(sorted(dropped)))
    return out


def _sampling(body: dict[str, Any], out: dict[str, Any]) -> None:
    _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise _bad("top_k", f"must be a non-negative integer, got {top_k!r}")
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences", "must be an array of strings")
        if len(stops) > MAX_STOP:
            raise _bad("stop_sequences", f"at most {MAX_STOP} sequences pass through this gateway, "
                                         f"got {len(stops)}")
        if stops:
            out["stop"] = list(stops)
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata", f"must be an object, got {_kind(metadata)}")
        user = metadata.get("user_id")
        if user is not None:
            if not isinstance(user, str):
                raise _bad("metadata.user_id", f"must be a string, got {_kind(user)}")
            out["user"] = user
    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise _bad("stream", f"must be a boolean, got {_kind(stream)}")
        out["stream"] = stream
        if stream:
            out["stream_options"] = {"include_usage": True}


def _system_text(system: Any, where: str) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _bad(where, f"must be a string or an array of text blocks, got {_kind(system)}")
    texts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"{where}.{j}", "must be a text block ({\"type\": \"text\", \"text\": ...})")
        texts.append(_string(block, "text", f"{where}.{j}"))
    return "\n".join(texts)


# ---------------------------------------------------------------- messages
def _message(message: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise _bad(where, f"must be an object, got {_kind(message)}")
    role = message.get("role")
    if role not in ROLES:
        if role is None:
            raise _bad(f"{where}.role", "Field required")
        raise _bad(f"{where}.role", f"must be 'user' or 'assistant' (or 'system'), got {role!r}")
    content = message.get("content")
    if content is None:
        raise _bad(f"{where}.content", "Field required")
    if role == "system":
        return [{"role": "system", "content": _system_text(content, f"{where}.content")}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content",
                   f"must be a string or an array of content blocks, got {_kind(content)}")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(f"{where}.content.{j}", "must be a content block with a string 'type'")
    if role == "assistant":
        return [_assistant(content, where)]
    return _user(content, where)


def _assistant(content: list[dict[str, Any]], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at, kind = f"{where}.content.{j}", block["type"]
        if kind == "text":
            texts.append(_string(block, "text", at))
        elif kind == "tool_use":
            arguments = block.get("input")
            if not isinstance(arguments, dict):
                raise _bad(f"{at}.input", f"must be an object, got {_kind(arguments)}")
            calls.append({"id": _string(block, "id", at, empty=False), "type": "function",
                          "function": {"name": _string(block, "name", at, empty=False),
                                       "arguments": orjson.dumps(arguments).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # another model cannot use Claude's signed reasoning
        else:
            raise _unsupported(at, kind, "an assistant turn", ("text", "tool_use", "thinking"))
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _user(content: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    result_images: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at, kind = f"{where}.content.{j}", block["type"]
        if kind == "tool_result":
            text, images = _tool_result(block, at)
            results.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", at, empty=False),
                            "content": text})
            result_images.extend(images)
        else:
            parts.append(_part(block, at, kind))
    out = results
    if result_images:  # a tool message carries text only; its images follow it
        out.append({"role": "user", "content": result_images})
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)
                        if len(parts) == 1 else parts})
        else:
            out.append({"role": "user", "content": parts})
    elif not results:
        out.append({"role": "user", "content": ""})
    return out


def _part(block: dict[str, Any], at: str, kind: str) -> dict[str, Any]:
    if kind == "text":
        return {"type": "text", "text": _string(block, "text", at)}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _image_url(block.get("source"), f"{at}.source")}}
    if kind == "document":
        return _document(block, at)
    raise _unsupported(at, kind, "a user turn", ("text", "image", "document", "tool_result"))


def _unsupported(at: str, kind: str, where: str, known: tuple[str, ...]) -> ProxyError:
    return _bad(f"{at}.type", f"content blocks of type {kind!r} are not supported in {where} "
                              f"through this gateway (supported: {', '.join(known)})")


def _image_url(source: Any, at: str) -> str:
    if not isinstance(source, dict):
        raise _bad(at, f"must be an object with a 'type' (base64 or url), got {_kind(source)}")
    kind = source.get("type")
    if kind == "base64":
        media = _string(source, "media_type", at)
        if media not in IMAGE_TYPES:
            raise _bad(f"{at}.media_type", f"must be one of {', '.join(IMAGE_TYPES)}, got {media!r}")
        return f"data:{media};base64,{_string(source, 'data', at, empty=False)}"
    if kind == "url":
        url = _string(source, "url", at, empty=False)
        if not url.startswith(("http://", "https://")):
            raise _bad(f"{at}.url", "must be an http(s) URL")
        return url
    raise _bad(f"{at}.type", f"image sources of type {kind!r} are not supported through this gateway "
                             "(supported: base64, url)")


def _document(block: dict[str, Any], at: str) -> dict[str, Any]:
    source = block.get("source")
    where = f"{at}.source"
    if not isinstance(source, dict):
        raise _bad(where, f"must be an object, got {_kind(source)}")
    kind = source.get("type")
    if kind == "text":
        return {"type": "text", "text": _string(source, "data", where)}
    if kind == "base64" and source.get("media_type") == "application/pdf":
        title = block.get("title")
        name = title if isinstance(title, str) and title else "document.pdf"
        data = _string(source, "data", where, empty=False)
        return {"type": "file",
                "file": {"filename": name, "file_data": f"data:application/pdf;base64,{data}"}}
    raise _bad(f"{where}.type", f"document sources of type {kind!r} are not supported through this "
                                "gateway (supported: base64 application/pdf, text)")


def _tool_result(block: dict[str, Any], at: str) -> tuple[str, list[dict[str, Any]]]:
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for k, part in enumerate(content):
            where = f"{at}.content.{k}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(_string(part, "text", where))
            elif kind == "image":
                images.append({"type": "image_url",
                               "image_url": {"url": _image_url(part.get("source"), f"{where}.source")}})
            else:
                raise _bad(where, "must be a text or image block")
    elif content is not None:
        raise _bad(f"{at}.content", f"must be a string or an array of blocks, got {_kind(content)}")
    text = "\n".join(texts)
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    return text, images


# ---------------------------------------------------------------- tools
def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("tools", f"must be an array, got {_kind(tools)}")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad(at, f"must be an object, got {_kind(tool)}")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _bad(f"{at}.type", f"server tools ({kind!r}) are not supported through this gateway; "
                                     "only client tools with an input_schema are")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"{at}.input_schema", f"must be a JSON Schema object, got {_kind(schema)}")
        fn: dict[str, Any] = {"name": _string(tool, "name", at, empty=False), "parameters": schema}
        description = tool.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise _bad(f"{at}.description", f"must be a string, got {_kind(description)}")
            fn["description"] = description
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function",
                              "function": {"name": _string(choice, "name", "tool_choice", empty=False)}}
    else:
        raise _bad("tool_choice", "must be an object whose 'type' is auto, any, tool or none")
    if kind != "none" and choice.get("disable_parallel_tool_use") is True and out.get("tools"):
        out["parallel_tool_calls"] = False


def _output_config(config: Any, out: dict[str, Any]) -> None:
    """``format`` (a JSON schema) → ``response_format``; ``effort`` → ``reasoning_effort``."""
    if not isinstance(config, dict):
        raise _bad("output_config", f"must be an object, got {_kind(config)}")
    fmt = config.get("format")
    if fmt is not None:
        schema = fmt.get("schema") if isinstance(fmt, dict) else None
        if not isinstance(schema, dict) or fmt.get("type") != "json_schema":
            raise _bad("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "output", "schema": schema}}
    effort = config.get("effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in EFFORTS:
            raise _bad("output_config.effort", f"must be one of {', '.join(EFFORTS)}, got {effort!r}")
        out["reasoning_effort"] = EFFORTS[effort]
