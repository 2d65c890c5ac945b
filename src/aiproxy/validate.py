"""Checks on client requests, each failure a 400 that names the field and says why.

Only what the gateway itself relies on, or what no upstream could accept, is checked;
fields it does not know pass through to the provider, which decides.
"""

from __future__ import annotations

from typing import Any

from aiproxy.errors import invalid

ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))
_NUMBER = (int, float)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _number(body: dict[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        raise invalid(f"'{key}' must be a number, got {_type_name(value)}", key)
    if not low <= value <= high:
        raise invalid(f"'{key}' must be between {low:g} and {high:g}, got {value!r}", key)


def _integer(body: dict[str, Any], key: str, low: int, high: int | None = None) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{key}' must be an integer, got {_type_name(value)}", key)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise invalid(f"'{key}' must be {bound}, got {value}", key)


def _boolean(body: dict[str, Any], key: str) -> None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean, got {_type_name(value)}", key)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise invalid("'model' is required", "model")
    if not isinstance(model, str) or not model.strip():
        raise invalid(f"'model' must be a non-empty string, got {_type_name(model)}", "model")
    return model


def _sampling(body: dict[str, Any]) -> None:
    _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid(f"'stream_options' must be an object, got {_type_name(options)}", "stream_options")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _integer(body, "n", 1, 128)
    _integer(body, "max_tokens", 1)
    _integer(body, "max_completion_tokens", 1)
    _integer(body, "seed", -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid("'stop' must be a string or an array of strings", "stop")
        if len(stop) > 4:
            raise invalid(f"'stop' may hold at most 4 sequences, got {len(stop)}", "stop")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid(f"'user' must be a string, got {_type_name(user)}", "user")


def chat(body: dict[str, Any]) -> str:
    """Validate a chat completion request; return its model."""
    model = _model(body)
    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of message objects", "messages")
    for i, message in enumerate(messages):
        _message(message, i)
    _sampling(body)
    _tools(body)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str)):
        raise invalid("'response_format' must be an object with a string 'type'", "response_format")
    return model


def _message(message: Any, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(f"'{where}' must be an object, got {_type_name(message)}", where)
    role = message.get("role")
    if role not in ROLES:
        if role is None:
            raise invalid(f"'{where}.role' is required", f"{where}.role")
        raise invalid(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}; got {role!r}",
                      f"{where}.role")
    content = message.get("content")
    if content is None:
        if role != "assistant":  # an assistant turn may be only tool calls or a refusal
            raise invalid(f"'{where}.content' is required for role '{role}'", f"{where}.content")
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"'{where}.content[{j}]' must be an object with a string 'type'",
                              f"{where}.content[{j}]")
    elif not isinstance(content, str):
        raise invalid(f"'{where}.content' must be a string or an array of content parts, "
                      f"got {_type_name(content)}", f"{where}.content")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise invalid(f"'{where}.tool_call_id' is required for role 'tool'", f"{where}.tool_call_id")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise invalid(f"'{where}.tool_calls' must be an array", f"{where}.tool_calls")
        for j, call in enumerate(tool_calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise invalid(f"'{where}.tool_calls[{j}]' must have a function with a name",
                              f"{where}.tool_calls[{j}]")


def _tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid(f"'tools' must be an array, got {_type_name(tools)}", "tools")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise invalid(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": ...}}}}", f"tools[{i}]")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise invalid(f"'tools[{i}].function.parameters' must be a JSON Schema object",
                              f"tools[{i}].function.parameters")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, dict) and choice not in ("none", "auto", "required"):
        raise invalid("'tool_choice' must be 'none', 'auto', 'required' or an object naming a function",
                      "tool_choice")


def completion(body: dict[str, Any]) -> str:
    model = _model(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("'prompt' is required", "prompt")
    if not _text_or_tokens(prompt):
        raise invalid("'prompt' must be a string, an array of strings, an array of token ids "
                      "or an array of token-id arrays", "prompt")
    _sampling(body)
    _integer(body, "best_of", 1, 20)
    _integer(body, "logprobs", 0, 5)
    _boolean(body, "echo")
    return model


def embedding(body: dict[str, Any]) -> str:
    model = _model(body)
    value = body.get("input")
    if value is None:
        raise invalid("'input' is required", "input")
    if not _text_or_tokens(value) or value == "" or value == []:
        raise invalid("'input' must be a non-empty string, array of strings, array of token ids "
                      "or array of token-id arrays", "input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise invalid(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    _integer(body, "dimensions", 1)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid(f"'user' must be a string, got {_type_name(user)}", "user")
    return model


def _text_or_tokens(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list):
        return False
    if all(isinstance(v, str) for v in value):
        return True
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return True
    return all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
               for v in value)
