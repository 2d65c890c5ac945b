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
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiproxy.call import Call

log = logging.getLogger("aiproxy.tokens")

PER_MESSAGE = 3  # OpenAI's chat framing: <|start|>{role}\n{content}<|end|>
REPLY_PRIMING = 3
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
#: encoding → (the file it is built from, that file's sha256 as tiktoken pins it). tiktoken
#: deletes a cached file whose hash is wrong and downloads it again, so the hash is checked
#: here first and tiktoken is only ever handed a file it will accept. An encoding not
#: listed (gpt2's data-gym files, one a newer tiktoken adds) is approximated.
ENCODING_FILES = {
    "r50k_base": ("r50k_base", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "p50k_base": ("p50k_base", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
    "p50k_edit": ("p50k_base", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
    "cl100k_base": ("cl100k_base", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("o200k_base", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "o200k_harmony": ("o200k_base", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}


def approximate(text: str) -> int:
    """Tokens in ``text`` by the documented approximation: ceil(UTF-8 bytes / 4)."""
    if not text:
        return 0
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    return (size + 3) // 4


def _cache_dir() -> str:
    """The folder tiktoken reads, chosen as tiktoken chooses it ("": tiktoken caches nothing)."""
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            return os.environ[name]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def cache_path(encoding: str) -> str | None:
    """Where tiktoken looks for the file of ``encoding``; None when it would not look (an
    encoding not supported offline, or caching turned off: tiktoken would download)."""
    known = ENCODING_FILES.get(encoding)
    if known is None or not _cache_dir():
        return None
    return os.path.join(_cache_dir(), hashlib.sha1(_BLOB.format(known[0]).encode()).hexdigest())


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
    path = cache_path(name)
    if path is None:
        _say_once(name)
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        _say_once(name)
        return None
    except OSError as exc:
        log.warning("tokens: the tiktoken file %s of %s cannot be read (%s); approximating",
                    path, name, exc.strerror)
        return None
    if hashlib.sha256(data).hexdigest() != ENCODING_FILES[name][1]:
        log.warning("tokens: the tiktoken file %s of %s is damaged (its sha256 is not the "
                    "published one); approximating", path, name)
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # pragma: no cover - a verified file that tiktoken still refuses
        log.warning("tokens: the tiktoken encoding %s could not be loaded; approximating", name)
        return None


@cache
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


def prompt_of(call: Call) -> int:
    """:func:`prompt` for ``call``'s body and model, counted once per call however many
    stages ask (rate limits, quotas, the gateway's estimate); counted again if a stage
    replaced the body."""
    held = call.state.get("tokens.prompt")
    if held is not None and held[0] is call.body:
        return int(held[1])
    n = prompt(call.body, call.upstream_model or call.model)
    call.state["tokens.prompt"] = (call.body, n)
    return n


def completion(response: dict[str, Any] | None, model: str = "") -> int:
    """Estimated tokens of the text, reasoning and tool calls in an OpenAI-shaped answer
    (reasoning is billed as completion tokens)."""
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
            # the same text under either name: vLLM has sent it as both at once
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if isinstance(reasoning, str):
                total += count(reasoning, model)
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    total += count(str(function.get("name", "")), model)
                    total += count(str(function.get("arguments", "")), model)
    return total


def max_completion(body: dict[str, Any], default: int = 0) -> int:
    """The completion tokens a request may produce at most, as it says (else ``default``),
    for all its choices: ``n`` (or ``best_of``, for completions) of them each may be that long."""
    most = default
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if type(value) is int and value > 0:
            most = value
            break
    choices = max((v for v in (body.get("n"), body.get("best_of")) if type(v) is int and v > 1), default=1)
    return most * choices
