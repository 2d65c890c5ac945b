"""Token counts before the upstream has said: estimates for limits, quotas and cost.

Rate limits and quotas need a call's size before it runs, and a stream cut short
needs the size of what was produced. Where the model is an OpenAI one that tiktoken
knows and its encoding file is on this machine, the count is tiktoken's; otherwise it
is an approximation: one token per 4 bytes of UTF-8 text (rounded up), plus 3 tokens
per message and 3 for the reply's priming, as OpenAI documents for chat. The upstream's
real usage always replaces an estimate once it is known.

tiktoken is never allowed to download: an encoding is used only when its file is in
``TIKTOKEN_CACHE_DIR`` (or tiktoken's default cache folder), so a gateway with no
internet access never waits on one. Put the files there to get exact counts offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from functools import lru_cache
from typing import Any

log = logging.getLogger("aiproxy.tokens")

PER_MESSAGE = 3  # OpenAI's chat framing: <|start|>{role}\n{content}<|end|>
REPLY_PRIMING = 3
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def approximate(text: str) -> int:
    """Tokens in ``text`` by the documented approximation: ceil(UTF-8 bytes / 4)."""
    if not text:
        return 0
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    return (size + 3) // 4


def _cache_dir() -> str:
    return (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
            or os.path.join(tempfile.gettempdir(), "data-gym-cache"))


@lru_cache(maxsize=64)
def _encoder(model: str) -> Any | None:
    """tiktoken's encoding for ``model`` when it knows the model and the file is local."""
    try:
        import tiktoken
        import tiktoken.model
    except ImportError:  # pragma: no cover - tiktoken is a dependency
        return None
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return None
    cached = os.path.join(_cache_dir(), hashlib.sha1(_BLOB.format(name).encode()).hexdigest())
    if not os.path.exists(cached):
        _say_once(name)
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # a damaged cache file: approximate rather than fail calls
        log.warning("tokens: the tiktoken encoding %s could not be loaded; approximating", name)
        return None


@lru_cache(maxsize=None)
def _say_once(name: str) -> None:
    log.info("tokens: tiktoken's %s file is not in %s; counting by approximation "
             "(set TIKTOKEN_CACHE_DIR to a folder holding it for exact counts)", name, _cache_dir())


def count(text: str, model: str = "") -> int:
    """Tokens in ``text`` for ``model``: tiktoken's count where available, else approximate."""
    if not text:
        return 0
    encoder = _encoder(model) if model else None
    if encoder is None:
        return approximate(text)
    return len(encoder.encode(text, disallowed_special=()))


def _text_of(content: Any) -> str:
    """The text in a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt(body: dict[str, Any], model: str = "") -> int:
    """Estimated prompt tokens of an OpenAI request body (chat, completion or embedding)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = REPLY_PRIMING
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += PER_MESSAGE + count(_text_of(message.get("content")), model)
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        total += count(str(function.get("name", "")), model)
                        total += count(str(function.get("arguments", "")), model)
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            import orjson
            total += count(orjson.dumps(tools).decode(), model)
        return total
    value = body.get("prompt", body.get("input"))
    if isinstance(value, str):
        return count(value, model)
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)  # already tokens
        return sum(count(v, model) if isinstance(v, str) else
                   len(v) if isinstance(v, list) else 0 for v in value)
    return 0


def completion(response: dict[str, Any] | None, model: str = "") -> int:
    """Estimated tokens of the text and tool calls in an OpenAI-shaped answer."""
    if not response:
        return 0
    total = 0
    for choice in response.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            total += count(choice["text"], model)
        message = choice.get("message")
        if isinstance(message, dict):
            total += count(_text_of(message.get("content")), model)
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    total += count(str(function.get("name", "")), model)
                    total += count(str(function.get("arguments", "")), model)
    return total


def max_completion(body: dict[str, Any], default: int = 0) -> int:
    """The completion tokens a request may produce at most, as it says (else ``default``)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if type(value) is int and value > 0:
            return value
    return default
