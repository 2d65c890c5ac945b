"""OpenAI requests as Gemini API ``generateContent`` bodies. Pure functions, no I/O.

The REST wire is camelCase JSON; ``google.genai.types`` is the field-name authority
(the tests validate what is built here against it). Answers go the other way in
:mod:`aiproxy.builtin.google_reply`.
"""

from __future__ import annotations

import binascii
import logging
import mimetypes
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from aiproxy import wire
from aiproxy.errors import invalid

log = logging.getLogger("aiproxy.google")

#: Separates a tool call id from the Gemini thought signature it carries back (see README).
SIGNATURE = "~ts~"
#: OpenAI ``reasoning_effort`` → Gemini ``thinkingBudget`` (Google's own OpenAI mapping).
THINKING = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
#: Fields turned into Gemini ones, or used by the gateway itself.
HANDLED = frozenset((
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "stop", "n", "response_format", "seed", "presence_penalty",
    "frequency_penalty", "tools", "tool_choice", "reasoning_effort", "google"))
#: Fields Gemini cannot honour and whose loss would change the answer: a 400 when set.
REJECTED = {
    "logprobs": "log probabilities are not translated by the google provider",
    "top_logprobs": "log probabilities are not translated by the google provider",
    "logit_bias": "Gemini has no logit bias",
    "audio": "audio output is not translated by the google provider",
    "functions": "use 'tools' (Gemini function declarations are built from them)",
    "function_call": "use 'tool_choice'",
    "prediction": "Gemini has no predicted outputs",
}
COMPLETION_HANDLED = (HANDLED - {"messages", "tools", "tool_choice"}) | {"prompt"}
COMPLETION_REJECTED = {**REJECTED, "suffix": "Gemini does not fill in the middle",
                       "echo": "Gemini does not echo the prompt",
                       "best_of": "Gemini does not rank several answers"}
#: Keys of the ``google`` extra-body object set verbatim on the request.
PASSED = frozenset(("safetySettings", "cachedContent", "labels"))


def model_path(model: str) -> str:
    """``models/<id>`` (or a ``tunedModels/`` name) with the id escaped for a URL path."""
    for prefix in ("models/", "tunedModels/"):
        if model.startswith(prefix):
            return prefix + quote(model[len(prefix):], safe="")
    return "models/" + quote(model, safe="")


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """A ``generateContent`` request for the OpenAI chat request ``body``."""
    _check_fields(body, HANDLED, REJECTED)
    system, contents = _contents(body["messages"])
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools = body.get("tools")
    if tools:
        out.update(_tools(tools, body.get("tool_choice")))
    return _finish(body, out)


def completion_body(body: dict[str, Any]) -> dict[str, Any]:
    """A ``generateContent`` request for a legacy text completion: the prompt as one user turn."""
    _check_fields(body, COMPLETION_HANDLED, COMPLETION_REJECTED)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise invalid("Gemini takes one text prompt: 'prompt' must be a non-empty string or an array "
                      "of one string, not token ids or a batch", "prompt")
    return _finish(body, {"contents": [{"role": "user", "parts": [{"text": prompt}]}]})


def _check_fields(body: dict[str, Any], handled: frozenset[str], rejected: dict[str, str]) -> None:
    """A 400 for a field Gemini cannot honour; a debug line for one it has no use for."""
    for key, value in body.items():
        if key in handled or value is None or value is False or value == {} or value == []:
            continue
        if key == "best_of" and value == 1:
            continue
        if key in rejected:
            raise invalid(f"'{key}' is not supported by the google provider: {rejected[key]}", key)
        log.debug("google: dropping field %r, which Gemini has no equivalent for", key)


def _finish(body: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """``generationConfig`` and the ``google`` extra-body object."""
    config = _generation(body)
    extra = body.get("google")
    if extra is not None:
        config = _extra(extra, out, config)
    if config:
        out["generationConfig"] = config
    return out


# ------------------------------------------------------------ messages
def _contents(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(systemInstruction parts, contents); same-role turns merged, as Gemini alternates."""
    names: dict[str, str] = {}  # tool call id → function name, for later tool results
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m["role"]
        if role in ("system", "developer"):
            parts = _parts(m.get("content"), f"{where}.content")
            if any("text" not in p for p in parts):
                raise invalid(f"'{where}.content' of a {role} message must be text for Gemini",
                              f"{where}.content")
            system.extend(parts)
            continue
        if role == "assistant":
            turn, parts = "model", _assistant(m, where, names)
        elif role == "user":
            turn, parts = "user", _parts(m.get("content"), f"{where}.content")
        else:  # tool, function
            turn, parts = "user", [_tool_result(m, where, names)]
        if not parts:
            continue
        if out and out[-1]["role"] == turn:
            out[-1]["parts"].extend(parts)
        else:
            out.append({"role": turn, "parts": parts})
    if not out:
        raise invalid("'messages' must hold at least one user or assistant message with content "
                      "(Gemini takes system messages as an instruction, not a turn)", "messages")
    return system, out


def _assistant(m: dict[str, Any], where: str, names: dict[str, str]) -> list[dict[str, Any]]:
    parts = _parts(m.get("content"), f"{where}.content", assistant=True)
    for j, tc in enumerate(m.get("tool_calls") or []):
        fn = tc["function"]
        call_id = tc.get("id")
        if isinstance(call_id, str):
            names[call_id] = fn["name"]
        part: dict[str, Any] = {"functionCall": {
            "name": fn["name"],
            "args": wire.tool_arguments(fn.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")}}
        if isinstance(call_id, str) and SIGNATURE in call_id:
            part["thoughtSignature"] = call_id.split(SIGNATURE, 1)[1]
        parts.append(part)
    return parts


def _tool_result(m: dict[str, Any], where: str, names: dict[str, str]) -> dict[str, Any]:
    """A ``functionResponse`` part: the name from the call it answers, an object response."""
    if m["role"] == "tool":
        name = names.get(m["tool_call_id"])
        if name is None:
            raise invalid(f"'{where}.tool_call_id' {m['tool_call_id']!r} matches no tool call of an "
                          "earlier assistant message; Gemini needs the function's name",
                          f"{where}.tool_call_id")
    else:
        name = m.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{where}.name' is required for role 'function'", f"{where}.name")
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text") or "") for p in content if p.get("type") == "text")
    text = content if isinstance(content, str) else ""
    try:
        value: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = text
    return {"functionResponse": {"name": name,
                                 "response": value if isinstance(value, dict) else {"result": value}}}


def _parts(content: Any, where: str, assistant: bool = False) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind, at = part["type"], f"{where}[{j}]"
        if kind == "text" or (assistant and kind == "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise invalid(f"'{at}.{kind}' must be a string", f"{at}.{kind}")
            if text:
                parts.append({"text": text})
        elif kind == "image_url" and not assistant:
            image = part.get("image_url")
            parts.append(_media(image.get("url") if isinstance(image, dict) else image, f"{at}.image_url"))
        elif kind == "input_audio" and not assistant:
            audio = part.get("input_audio")
            data = audio.get("data") if isinstance(audio, dict) else None
            fmt = audio.get("format") if isinstance(audio, dict) else None
            if not isinstance(data, str) or not isinstance(fmt, str) or not data:
                raise invalid(f"'{at}.input_audio' must hold base64 'data' and a 'format'",
                              f"{at}.input_audio")
            _base64(data, f"{at}.input_audio.data")
            parts.append({"inlineData": {"mimeType": f"audio/{fmt}", "data": data}})
        elif kind == "file" and not assistant:
            file = part.get("file")
            parts.append(_media(file.get("file_data") if isinstance(file, dict) else None, f"{at}.file",
                                remote=False))
        else:
            raise invalid(f"the google provider does not support {'assistant ' if assistant else ''}"
                          f"content parts of type {kind!r}", f"{at}.type")
    return parts


def _base64(data: str, param: str) -> None:
    """Gemini refuses inline data that is not base64 with a 400 of its own; say it first
    (standard or URL-safe alphabet, padded)."""
    try:
        binascii.a2b_base64(data.translate(_URLSAFE).encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise invalid(f"'{param}' is not valid base64", param) from None


_URLSAFE = str.maketrans("-_", "+/")


def _media(url: Any, param: str, remote: bool = True) -> dict[str, Any]:
    """``inlineData`` for a base64 ``data:`` URL, ``fileData`` for an http(s) or gs:// URL."""
    what = "a data: URL or an http(s) URL" if remote else "a data: URL in 'file_data'"
    if not isinstance(url, str) or not url:
        raise invalid(f"'{param}' must be {what}", param)
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        mime = head[5:].removesuffix(";base64")
        if not head.endswith(";base64") or not data or not mime:
            raise invalid(f"'{param}' must be a data:<type>;base64,<data> URL", param)
        _base64(data, param)
        return {"inlineData": {"mimeType": mime, "data": data}}
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https", "gs") or not remote:
        raise invalid(f"'{param}' must be {what}, not {url[:40]!r}", param)
    file: dict[str, Any] = {"fileUri": url}
    guessed = mimetypes.guess_type(urlsplit(url).path)[0]
    if guessed:
        file["mimeType"] = guessed
    return {"fileData": file}


# ------------------------------------------------------------ tools and generation config
def _tools(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any]:
    declarations = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function":
            raise invalid(f"the google provider supports function tools only, got {tool.get('type')!r}",
                          f"tools[{i}].type")
        fn = tool["function"]
        declaration: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description"):
            declaration["description"] = fn["description"]
        if fn.get("parameters") is not None:
            declaration["parametersJsonSchema"] = fn["parameters"]
        declarations.append(declaration)
    config: dict[str, Any] | None = None
    if choice in ("none", "auto", "required"):
        config = {"mode": {"none": "NONE", "auto": "AUTO", "required": "ANY"}[choice]}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        listed = allowed.get("tools") if isinstance(allowed, dict) else None
        if not isinstance(allowed, dict) or not isinstance(listed, list):
            raise invalid("'tool_choice.allowed_tools' must be {\"mode\": ..., \"tools\": [...]}",
                          "tool_choice.allowed_tools")
        wanted = {_chosen(t, declarations, "tool_choice.allowed_tools.tools") for t in listed}
        declarations = [d for d in declarations if d["name"] in wanted]
        config = {"mode": "ANY" if allowed.get("mode") == "required" else "AUTO"}
    elif isinstance(choice, dict):
        config = {"mode": "ANY",
                  "allowedFunctionNames": [_chosen(choice, declarations, "tool_choice")]}
    out: dict[str, Any] = {"tools": [{"functionDeclarations": declarations}]}
    if config is not None:
        out["toolConfig"] = {"functionCallingConfig": config}
    return out


def _chosen(choice: Any, declarations: list[dict[str, Any]], param: str) -> str:
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not any(d["name"] == name for d in declarations):
        raise invalid(f"'{param}' must name a function in 'tools', got {name!r}", param)
    return str(name)


def _generation(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None:
        config["maxOutputTokens"] = limit
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
                         ("presence_penalty", "presencePenalty"),
                         ("frequency_penalty", "frequencyPenalty")):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    if (body.get("n") or 1) > 1:
        config["candidateCount"] = body["n"]
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt["type"] != "text":
        if fmt["type"] not in ("json_object", "json_schema"):
            raise invalid(f"the google provider does not support response_format type {fmt['type']!r}",
                          "response_format.type")
        config["responseMimeType"] = "application/json"
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise invalid("'response_format.json_schema.schema' must be a JSON Schema object",
                              "response_format.json_schema.schema")
            config["responseJsonSchema"] = schema
    effort = body.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in THINKING:
            raise invalid(f"'reasoning_effort' must be one of {', '.join(THINKING)}, got {effort!r}",
                          "reasoning_effort")
        config["thinkingConfig"] = {"thinkingBudget": THINKING[effort]}
    return config


def _extra(extra: Any, out: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The ``google`` extra-body object: ``generationConfig`` merged, PASSED keys set."""
    if not isinstance(extra, dict):
        raise invalid("'google' must be an object of Gemini request fields", "google")
    for key, value in extra.items():
        if key == "generationConfig" and isinstance(value, dict):  # one level deep: thinkingConfig
            config = {**config, **{k: {**config[k], **v} if isinstance(v, dict) and isinstance(
                config.get(k), dict) else v for k, v in value.items()}}
        elif key in PASSED:
            out[key] = value
        else:
            raise invalid(f"'google.{key}' is not a Gemini request field the gateway passes on "
                          f"(generationConfig, {', '.join(sorted(PASSED))})", f"google.{key}")
    return config


def embed_parts(body: dict[str, Any]) -> list[str]:
    """The texts of an OpenAI embeddings request; token ids are a 400 (Gemini takes text)."""
    given = body.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise invalid("Gemini embeds text only: 'input' must be a non-empty string or an array of "
                      "non-empty strings, not token ids", "input")
    return texts
