"""The context one request carries through every stage: Call, Principal, Usage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from starlette.datastructures import Headers

    from aiproxy.errors import ProxyError
    from aiproxy.provider import Reply
    from aiproxy.router import Deployment

#: The operations a call can be; also the provider method each one maps to.
OPERATIONS = ("chat", "completion", "embedding")


@dataclass(slots=True)
class Principal:
    """Who is calling, as the authenticate stage found it. Holds no secret."""

    id: str
    kind: str = "key"  # "master", "key", "anonymous", or a plugin's own word
    user: str | None = None
    tenant: str | None = None
    team: str | None = None
    tier: str | None = None
    roles: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] | None = None  # None: every model
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of prompt_tokens, written to it (Anthropic bills these apart)

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """Read an OpenAI ``usage`` object; None when absent or malformed."""
        if not isinstance(usage, dict):
            return None
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        total = _int(usage.get("total_tokens")) or prompt + completion
        details = usage.get("prompt_tokens_details")
        if not isinstance(details, dict):
            return cls(prompt, completion, total)
        written = details.get("cache_write_tokens")  # OpenRouter's; never in OpenAI's own
        return cls(prompt, completion, total, _int(details.get("cached_tokens")),
                   _int(written) if written else 0)

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's ``usage``; cache writes as ``prompt_tokens_details.cache_write_tokens``
        (the openai SDK's field for them; OpenAI itself reports none)."""
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens or self.cache_write_tokens:
            details = usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
            if self.cache_write_tokens:
                details["cache_write_tokens"] = self.cache_write_tokens
        return usage


def _int(value: Any) -> int:
    return value if type(value) is int else 0


class EgressWriter(Protocol):
    """One stream's answer rewritten chunk by chunk (:meth:`Egress.writer`)."""

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The bytes to send for one OpenAI chunk, or for an ``{"error": {...}}`` object
        (the stream failed: nothing is fed after it); ``b""`` for none."""
        ...

    def end(self) -> bytes:
        """The bytes that end a stream that did not fail (where OpenAI sends ``[DONE]``)."""
        ...


class Egress(Protocol):
    """How answers are written for a client that speaks another wire format.

    The gateway works in OpenAI shape throughout; an ingress route for another API
    (``/v1/messages``) sets ``call.egress`` and gets each answer rewritten at the edge.
    A stream's chunks reach the writer parsed: the gateway decodes each one once, for the
    writer and for the answer it assembles at the end.
    """

    media_type: str

    def whole(self, call: Call, reply: Reply) -> bytes:
        """The response body for a whole OpenAI-shaped answer."""
        ...

    def writer(self, call: Call) -> EgressWriter:
        """A writer for ``call``'s stream."""
        ...

    def error(self, error: ProxyError) -> bytes:
        """The response body for a failure (the status stays the same)."""
        ...


@dataclass(slots=True, eq=False)
class Call:
    """One client request on its way through the gateway.

    Stages read it and write to the fields meant for them: ``upstream_headers``
    (sent to the provider), ``response_headers`` (sent to the client), ``metadata``
    (recorded with the call), ``state`` (scratch space, keyed by plugin name).
    """

    request_id: str
    operation: str  # one of OPERATIONS
    body: dict[str, Any]  # the parsed client request, OpenAI-shaped
    model: str  # the model name the client asked for
    stream: bool
    headers: Headers  # the client's request headers
    ingress: str = "openai"  # which wire format the client speaks
    egress: Egress | None = None  # rewrites answers for a non-OpenAI ingress
    principal: Principal | None = None
    deployment: Deployment | None = None
    upstream_model: str = ""  # what the deployment asks its upstream for
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # provider name → API key to use instead of the provider's own (a tenant's, BYOK);
    # set by a before-call stage, read by HTTPProvider.build; kept out of repr()
    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    response_headers: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    usage: Usage | None = None
    response: dict[str, Any] | None = None  # the final OpenAI-shaped answer (non-stream)
    error: ProxyError | None = None
    cached: bool = False
    cost: float | None = None  # USD, set by the cost stage in after-call (0 for a cache hit)
    # a stage that needs a stream's whole answer (the cache, to store it) sets this in
    # before-call or cache-lookup; the gateway then assembles call.response at the end
    collect: bool = False
    started: float = field(default_factory=time.perf_counter)
    first_byte: float | None = None  # perf_counter() when the first stream chunk went out
    finished: float | None = None
    attempts: int = 0

    @property
    def include_usage(self) -> bool:
        """Did the client ask for a stream's final usage chunk (``stream_options``)?"""
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to the last byte, once finished."""
        return None if self.finished is None else self.finished - self.started
