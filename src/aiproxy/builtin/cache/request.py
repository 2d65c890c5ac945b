"""What a request is to the cache: whose it is (scope), its key, whether it may be cached,
and what the client asked of the cache in its headers."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson

from aiproxy.errors import ProxyError

if TYPE_CHECKING:
    from aiproxy.call import Call, Principal

TTL_HEADER = "x-aiproxy-cache-ttl"
#: request fields that do not change the answer: who asked, how it is delivered, what the
#: upstream keeps of it. Everything else (messages, tools, sampling, response_format, …,
#: and any field the gateway does not know) is part of the key: an unknown field costs a
#: miss at worst, never someone else's answer.
IGNORED = frozenset(("user", "safety_identifier", "stream", "stream_options", "metadata", "store",
                     "prompt_cache_key", "service_tier"))
# numbers a client may send as 0 or 0.0, 1 or 1.0: one spelling in the key
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_SORTED = orjson.OPT_SORT_KEYS


def scope(principal: Principal | None) -> str:
    """Whose cache a call reads and writes: its tenant's, else its key's own, else anonymous.

    The kind is part of the name, so tenant ``x`` and a key with id ``x`` never share.
    """
    if principal is None or principal.kind == "anonymous":
        return "anonymous"
    if principal.tenant:
        return f"tenant:{principal.tenant}"
    return f"{principal.kind}:{principal.id}"


def cache_key(call: Call) -> str | None:
    """The hex digest naming ``call``'s answer; None if its body cannot be keyed."""
    body = call.body
    picked = {k: v for k, v in body.items() if k not in IGNORED}
    for name in _FLOATS:
        value = picked.get(name)
        if type(value) is int:
            picked[name] = float(value)
    if picked.get("n") == 1:
        del picked["n"]
    try:
        blob = orjson.dumps([scope(call.principal), call.operation, call.upstream_model, picked],
                            option=_SORTED)
    except (orjson.JSONEncodeError, TypeError):  # a stage put something that is not JSON in the body
        return None
    return hashlib.sha256(blob).hexdigest()  # OpenSSL: faster here than blake2b


def deterministic(call: Call) -> bool:
    """Is the answer the same every time? Embeddings are; a chat or text completion only
    with ``temperature`` given as 0 (greedy decoding: top_p, n and seed then change nothing).

    No temperature is NOT 0: OpenAI's and Anthropic's default is 1. ``seed`` does not make
    a sampled call deterministic (OpenAI calls it best effort; other upstreams ignore it).
    """
    if call.operation == "embedding":
        return True
    temperature: Any = call.body.get("temperature")
    return temperature == 0 and not isinstance(temperature, bool)


def replayable(body: dict[str, Any]) -> bool:
    """Can a stored answer stand for this request's? Not when it asks for logprobs or audio:
    a streamed answer is assembled, and a hit replayed as a stream, without either (an
    answer stored that way would then answer a request that asked for them)."""
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:  # chat: true; completions: a number
        return False
    if body.get("audio") is not None:
        return False
    modalities = body.get("modalities")
    return not (isinstance(modalities, list) and "audio" in modalities)


def directives(value: str | None) -> tuple[bool, bool]:
    """(no_cache, no_store) from a ``Cache-Control`` request header."""
    if not value:
        return False, False
    names = {part.split("=", 1)[0].strip().lower() for part in value.split(",")}
    return "no-cache" in names, "no-store" in names


def ttl_override(value: str | None, most: float) -> float | None:
    """The ``x-aiproxy-cache-ttl`` header: whole seconds, 1 up to ``most``; a 400 naming it."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit() and len(text) <= 12 and 1 <= int(text) <= most:
        return float(text)
    shown = value if len(value) <= 40 else value[:40] + "…"
    raise ProxyError(400, f"The {TTL_HEADER} header must be a whole number of seconds from 1 to "
                          f"{most:.0f}, got {shown!r}.", param=TTL_HEADER, code="invalid_cache_ttl")
