"""What a provider plugin implements, and what it hands back.

A provider turns an OpenAI-shaped request (``call.body``) into its upstream's wire
format and the answer back into OpenAI shape. One instance per ``providers:`` entry,
built at start-up with the shared pooled HTTP client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import orjson

from aiproxy.errors import ProxyError

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.config import ProviderConfig
    from aiproxy.router import Deployment

log = logging.getLogger("aiproxy.provider")


@dataclass(slots=True)
class Reply:
    """A whole (non-streamed) answer in OpenAI shape.

    ``raw`` is the exact JSON to send when the provider relays its upstream's bytes
    unchanged; a stage that edits ``data`` must call :meth:`changed`.
    """

    data: dict[str, Any]
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def changed(self) -> None:
        self.raw = None

    def body(self) -> bytes:
        if self.raw is None:
            self.raw = orjson.dumps(self.data)
        return self.raw


class Provider:
    """Base class for provider plugins; override the operations the upstream supports.

    Streaming methods are async generators of complete SSE events in OpenAI shape
    (``b"data: {...}\\n\\n"``), without the final ``data: [DONE]``, which the core adds.
    Raise :class:`ProxyError` for upstream failures (see :mod:`aiproxy.upstream`).
    """

    #: settings that must be non-empty for the provider to serve; if one is missing
    #: the provider is left out of routing with one log line naming it.
    required: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.name = config.name
        self.http = http

    def missing(self) -> list[str]:
        """Required settings that are empty, by name. ``api_key`` may stay empty with
        ``options: {tenant_keys_only: true}``: every call then brings its tenant's own key."""
        byok = self.config.options.get("tenant_keys_only") is True
        return [key for key in self.required
                if not getattr(self.config, key, None) and not (byok and key == "api_key")]

    async def chat(self, call: Call, deployment: Deployment) -> Reply:
        raise self.unsupported("chat completions")

    def chat_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        raise self.unsupported("streaming chat completions")

    async def completion(self, call: Call, deployment: Deployment) -> Reply:
        raise self.unsupported("text completions")

    def completion_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        raise self.unsupported("streaming text completions")

    async def embedding(self, call: Call, deployment: Deployment) -> Reply:
        raise self.unsupported("embeddings")

    async def count_tokens(self, call: Call, deployment: Deployment) -> int:
        """Input tokens the upstream would count for the chat request ``call.body``."""
        raise self.unsupported("token counting")

    async def list_models(self) -> list[str]:
        """Upstream model ids, for wildcard entries in ``models:``. Default: none."""
        return []

    async def aclose(self) -> None:
        """Release what the provider holds (the shared HTTP client is not its own)."""

    def unsupported(self, what: str) -> ProxyError:
        return ProxyError(400, f"provider {self.name!r} ({self.config.plugin}) does not support {what}",
                          code="unsupported_operation")
