"""OpenAI chat requests → Anthropic Messages requests (answers: :mod:`.anthropic_reply`).

Field names follow the ``anthropic`` SDK's types (``anthropic.types.MessageCreateParams``,
``Message``, ``RawMessageStreamEvent``). What happens to each OpenAI request field is
decided in :func:`request` (and the README's "OpenAI request fields by provider" table):
translated, passed as it is (:data:`NATIVE`), refused with a 400 naming it
(:data:`REFUSED`), or, for any other field, dropped with a debug log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from aiproxy import wire
from aiproxy.errors import invalid

log = logging.getLogger("aiproxy.anthropic")

DEFAULT_MAX_TOKENS = 4096
IMAGE_TYPES = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))
#: Anthropic-only request fields an OpenAI client may send (``extra_body``), passed as they are.
NATIVE = ("top_k", "thinking")
#: Fields Anthropic has no way to honour: a 400 naming the field, unless the value asks
#: for nothing (``logprobs: false``, ``logit_bias: {}``, ``web_search_options: {}``).
REFUSED = {
    "logit_bias": "Anthropic has no logit bias",
    "logprobs": "Anthropic does not return log probabilities",
    "top_logprobs": "Anthropic does not return log probabilities",
    "audio": "Anthropic does not produce audio",
    "web_search_options": "web search is not translated to Anthropic's server tools",
    "functions": "use 'tools' instead of the deprecated 'functions'",
    "function_call": "use 'tool_choice' instead of the deprecated 'function_call'",
}
_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh"}


# ---------------------------------------------------------------- requests
def request(body: dict[str, Any], model: str, options: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The Anthropic Messages request for the OpenAI chat request ``body``.

    ``options`` are the deployment's: ``max_tokens`` (the default when the client sets
    none), ``drop_params`` (OpenAI fields to drop for this model, e.g. ``temperature``
    for models that reject it) and ``extra_fields`` (more fields passed as they are).
    """
    system, messages = translate_messages(body["messages"])
    out: dict[str, Any] = {"model": model, "messages": messages}
    if system is not None:
        out["system"] = system
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = limit if limit is not None else int(options.get("max_tokens") or DEFAULT_MAX_TOKENS)
    if stream:
        out["stream"] = True
    drop = options.get("drop_params") or ()
    extra = options.get("extra_fields") or ()
    dropped: list[str] = []
    for key, value in body.items():
        if key in _HANDLED or value is None:
            continue
        if key in drop:
            dropped.append(key)
        elif key in _TRANSLATE:
            _TRANSLATE[key](value, out, body)
        elif key in NATIVE or key in extra:
            out[key] = value
        elif key in REFUSED:
            if value not in (False, 0, {}, []):
                raise invalid(f"'{key}' is not supported by Anthropic models: {REFUSED[key]}", key)
        else:
            dropped.append(key)
    if dropped and log.isEnabledFor(logging.DEBUG):
        log.debug("fields without an Anthropic equivalent dropped: %s", ", ".join(sorted(dropped)))
    _tool_choice(body, out)
    return out


def count_tokens_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The ``/messages/count_tokens`` request: what the prompt is, nothing of the answer."""
    full = request(body, model, {}, stream=False)
    return {k: v for k, v in full.items() if k in _COUNTED}


_HANDLED = frozenset(("model", "messages", "max_tokens", "max_completion_tokens", "stream",
                      "tool_choice", "parallel_tool_calls"))
_COUNTED = frozenset(("model", "messages", "system", "tools", "tool_choice", "thinking", "output_config"))


def _temperature(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    if value > 1:
        raise invalid(f"'temperature' must be between 0 and 1 for Anthropic models, got {value!r}",
                      "temperature")
    out["temperature"] = value


def _top_p(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    out["top_p"] = value


def _n(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    if value != 1:
        raise invalid("Anthropic models return one choice per request: 'n' must be 1", "n")


def _stop(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    stops = [value] if isinstance(value, str) else list(value)
    if stops:
        out["stop_sequences"] = stops


def _user(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    out["metadata"] = {"user_id": value}


def _response_format(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    kind = value.get("type")
    if kind == "text":
        return
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("'response_format.json_schema.schema' must be a JSON Schema object",
                          "response_format")
        out.setdefault("output_config", {})["format"] = {"type": "json_schema", "schema": schema}
        return
    if kind == "json_object":
        raise invalid("Anthropic models have no schema-less JSON mode: use response_format "
                      "{'type': 'json_schema', ...} with a schema", "response_format")
    raise invalid(f"response_format type {kind!r} is not supported by Anthropic models", "response_format")


def _reasoning_effort(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    if value == "none":
        return
    effort = _EFFORT.get(value) if isinstance(value, str) else None
    if effort is None:
        raise invalid(f"'reasoning_effort' must be one of none, minimal, low, medium, high, xhigh; "
                      f"got {value!r}", "reasoning_effort")
    out.setdefault("output_config", {})["effort"] = effort


def _modalities(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    if not isinstance(value, list) or any(m != "text" for m in value):
        raise invalid("Anthropic models answer in text only: 'modalities' may only be ['text']",
                      "modalities")


def _tools(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    tools = []
    for i, tool in enumerate(value):
        if tool.get("type", "function") != "function":
            raise invalid(f"tool type {tool.get('type')!r} is not supported by Anthropic models; "
                          f"only 'function' tools are", f"tools[{i}].type")
        fn = tool["function"]
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        out_tool: dict[str, Any] = {"name": fn["name"], "input_schema": schema}
        if fn.get("description"):
            out_tool["description"] = fn["description"]
        if fn.get("strict") is True:
            out_tool["strict"] = True
        tools.append(out_tool)
    if tools:
        out["tools"] = tools


def _skip(value: Any, out: dict[str, Any], body: dict[str, Any]) -> None:
    """Fields that pass validation here and mean nothing upstream: dropped silently."""


_TRANSLATE: dict[str, Callable[[Any, dict[str, Any], dict[str, Any]], None]] = {
    "temperature": _temperature, "top_p": _top_p, "n": _n, "stop": _stop, "user": _user,
    "response_format": _response_format, "reasoning_effort": _reasoning_effort,
    "modalities": _modalities, "tools": _tools, "stream_options": _skip,
}


def _tool_choice(body: dict[str, Any], out: dict[str, Any]) -> None:
    """``tool_choice`` and ``parallel_tool_calls`` → Anthropic ``tool_choice`` (with tools only)."""
    if "tools" not in out:
        return
    choice = body.get("tool_choice")
    mapped: dict[str, Any]
    if choice is None or choice == "auto":
        mapped = {"type": "auto"}
    elif choice == "none":
        mapped = {"type": "none"}
    elif choice == "required":
        mapped = {"type": "any"}
    else:
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise invalid("'tool_choice' must name a function: {\"type\": \"function\", "
                          "\"function\": {\"name\": ...}}", "tool_choice")
        mapped = {"type": "tool", "name": name}
    if body.get("parallel_tool_calls") is False and mapped["type"] != "none":
        mapped["disable_parallel_tool_use"] = True
    if choice is not None or len(mapped) > 1:
        out["tool_choice"] = mapped


# ---------------------------------------------------------------- messages
def translate_messages(messages: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """(``system``, ``messages``): system and developer messages become the top-level
    ``system``; tool results become ``tool_result`` blocks in a user turn; consecutive
    turns of one role are merged, since Anthropic wants them alternating."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m["role"]
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system.extend(_blocks(m.get("content"), f"{where}.content", text_only=True))
            continue
        if role == "user":
            _append(out, "user", _blocks(m.get("content"), f"{where}.content"), where)
        elif role == "assistant":
            blocks = _blocks(m.get("content"), f"{where}.content", text_only=True)
            for j, tc in enumerate(m.get("tool_calls") or []):
                blocks.append(_tool_use(tc, f"{where}.tool_calls[{j}]"))
            if blocks:
                _append(out, "assistant", blocks, where)
        elif role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id(m["tool_call_id"])}
            content = m.get("content")
            result["content"] = content if isinstance(content, str) else \
                _blocks(content, f"{where}.content")
            _append(out, "user", [result], where)
        else:
            raise invalid(f"'{where}.role' {role!r} is not supported by Anthropic models; send tool "
                          f"results as role 'tool' with a tool_call_id", f"{where}.role")
    if not out:
        raise invalid("'messages' must hold a user or assistant message for Anthropic models, "
                      "not only system ones", "messages")
    if not system:
        return None, out
    if len(system) == 1 and set(system[0]) == {"type", "text"}:
        return system[0]["text"], out
    return system, out


def _append(out: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]], where: str) -> None:
    if not blocks:
        raise invalid(f"'{where}.content' must not be empty for Anthropic models", f"{where}.content")
    if out and out[-1]["role"] == role:
        content = out[-1]["content"]
        if blocks[0]["type"] == "tool_result":  # tool results go first in a user turn
            at = next((k for k, b in enumerate(content) if b["type"] != "tool_result"), len(content))
            content[at:at] = blocks
        else:
            content.extend(blocks)
    else:
        out.append({"role": role, "content": blocks})


def _blocks(content: Any, where: str, *, text_only: bool = False) -> list[dict[str, Any]]:
    """OpenAI content (a string or parts) as Anthropic content blocks; empty text is left out."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for j, part in enumerate(content):
        kind = part["type"]
        here = f"{where}[{j}]"
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise invalid(f"'{here}.{kind}' must be a string", f"{here}.{kind}")
            if text:
                blocks.append(_cached({"type": "text", "text": text}, part))
        elif text_only:
            raise invalid(f"'{here}' of type {kind!r} is not allowed here: only text", f"{here}.type")
        elif kind == "image_url":
            blocks.append(_cached(_image(part.get("image_url"), f"{here}.image_url"), part))
        elif kind == "file":
            blocks.append(_cached(_document(part.get("file"), f"{here}.file"), part))
        else:
            raise invalid(f"content parts of type {kind!r} are not supported by Anthropic models",
                          f"{here}.type")
    return blocks


def _cached(block: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Keep a part's Anthropic ``cache_control`` marker (prompt caching)."""
    if isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a ``data:<type>;base64,<data>`` URL, else None."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64") or not data:
        return None
    return head[5:-7].split(";")[0].lower(), data


def _image(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise invalid(f"'{where}.url' must be a string", f"{where}.url")
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    parsed = _data_url(url)
    if parsed is None:
        raise invalid(f"'{where}.url' must be an http(s) URL or a data:image/...;base64,... URL",
                      f"{where}.url")
    media_type, data = parsed
    if media_type not in IMAGE_TYPES:
        raise invalid(f"Anthropic models take {', '.join(sorted(IMAGE_TYPES))} images, "
                      f"not {media_type!r}", f"{where}.url")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _document(file: Any, where: str) -> dict[str, Any]:
    data_url = file.get("file_data") if isinstance(file, dict) else None
    parsed = _data_url(data_url) if isinstance(data_url, str) else None
    if parsed is None or parsed[0] != "application/pdf":
        raise invalid(f"'{where}' must carry file_data as a data:application/pdf;base64,... URL "
                      f"(Anthropic models take PDFs inline; file ids are not supported)", where)
    block: dict[str, Any] = {"type": "document",
                             "source": {"type": "base64", "media_type": parsed[0], "data": parsed[1]}}
    if isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


def _tool_use(tc: dict[str, Any], where: str) -> dict[str, Any]:
    fn = tc["function"]
    arguments = wire.tool_arguments(fn.get("arguments"), f"{where}.function.arguments")
    call_id = tc.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise invalid(f"'{where}.id' is required: Anthropic matches tool results to calls by id",
                      f"{where}.id")
    return {"type": "tool_use", "id": tool_id(call_id), "name": fn["name"], "input": arguments}


def tool_id(call_id: str) -> str:
    """A tool call id as Anthropic accepts it (``[a-zA-Z0-9_-]+``): ids another provider
    made (after a fallback) have other characters replaced, the same way in a call and
    in its result."""
    return _ID_CHARS.sub("_", call_id) if _ID_CHARS.search(call_id) else call_id
