"""Fake upstreams served for real: uvicorn on 127.0.0.1, a free port, a background thread.

- :class:`FakeOpenAI` speaks the OpenAI wire format (``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``), JSON and SSE;
- :class:`FakeOllama` speaks Ollama's native API as documented in ollama's
  ``docs/api.md`` (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``),
  JSON and NDJSON, streaming by default as Ollama does;
- :class:`FakeAnthropic` speaks Anthropic's Messages API (``/v1/messages``,
  ``/v1/messages/count_tokens``, ``/v1/models``), JSON and SSE.

Both answer deterministically (the same request gets the same words and counts), and
record every request (:class:`Recorded`: headers, JSON body, and for a stream whether
it completed or its client went away first). Behaviour comes from the fake's
``defaults``, overridden per request by a ``fake`` object in the body (the OpenAI
SDK's ``extra_body={"fake": {...}}``) or for a while by ``with fake.configured(...)``:

==================  ============================================================
``chunks``          words in a reply; a stream sends one word per chunk
``chunk_delay_ms``  wait between stream chunks (not before the first)
``latency_ms``      wait before the answer / the first chunk
``reply``           a fixed reply text instead of generated words
``error``           answer with this HTTP status instead (``retry_after`` seconds)
``dimensions``      embedding size, unless the request names one
``script``          (OpenAI chat) stream exactly these choices, one chunk each
==================  ============================================================

Usage::

    with FakeOpenAI() as upstream:                 # or FakeOpenAI(chunks=50) for a bench
        ... api_base = upstream.url + "/v1"
        record = upstream.wait_for(lambda r: r.disconnected, timeout=5)

The runner, recording, options and shared content are in :mod:`.server`; each fake's
wire format is in :mod:`.openai` and :mod:`.ollama`.
"""

from .anthropic import FakeAnthropic
from .ollama import FakeOllama
from .openai import FakeOpenAI
from .server import DEFAULTS, WORDS, FakeUpstream, Recorded

__all__ = ["DEFAULTS", "WORDS", "FakeAnthropic", "FakeOllama", "FakeOpenAI", "FakeUpstream", "Recorded"]
