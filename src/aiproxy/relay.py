"""A stream's way out: relayed event by event (as it came, or rewritten for a client of
another wire format), then settled: the upstream closed, the answer assembled for the
stages that asked, its usage estimated when the upstream never said, the last stages run.
Long streams are folded as they go, so what a stream holds stays bounded."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson

from aiproxy import sse, tokens, wire
from aiproxy.call import Call, EgressWriter, Usage
from aiproxy.errors import ProxyError, internal_error
from aiproxy.provider import Reply

log = logging.getLogger("aiproxy.gateway")
#: what a stream sent so far: its events as they went out, or as decoded chunks
Sent = list[bytes | dict[str, Any]]


class StreamRelay:
    """The gateway's streaming half (a mixin: the gateway gives it ``_quietly``)."""

    async def _quietly(self, hook: str, **kwargs: Any) -> None:
        raise NotImplementedError

    async def _relay(self, call: Call, first: bytes | None,
                     events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        sent: Sent = []  # what went out, to assemble or size the answer at the end
        complete = False
        try:
            if first is not None:
                call.first_byte = time.perf_counter()
                sent.append(first)
                yield first
                async for chunk in events:
                    sent.append(chunk)
                    if len(sent) >= FOLD_AT:
                        sent[:] = fold(sent)
                    yield chunk
            complete = True
            yield sse.DONE
        except ProxyError as exc:
            call.error = exc
            yield sse.error_event(exc.body())
        except Exception:
            log.exception("stream %s failed", call.request_id)
            call.error = internal_error()
            yield sse.error_event(call.error.body())
        except BaseException:  # the client went away: the task is cancelled
            call.metadata["client_disconnected"] = True
            raise
        finally:
            await self._finish_stream(call, events, sent, complete)

    async def _finish_stream(self, call: Call, events: AsyncIterator[bytes], sent: Sent,
                             complete: bool) -> None:
        """However a relayed stream ended: close the upstream, settle, run the last stages."""
        call.finished = time.perf_counter()
        with anyio.CancelScope(shield=True):
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()  # closes the upstream response: cancels it if unfinished
                except Exception:
                    log.exception("closing the upstream stream of %s failed", call.request_id)
            await self._settle_stream(call, sent, complete)
            if call.error is not None:
                await self._quietly("aiproxy_on_error", call=call, error=call.error)
            else:
                await self._quietly("aiproxy_after_call", call=call)

    async def _rewritten(self, call: Call, first: bytes | None, events: AsyncIterator[bytes],
                         writer: EgressWriter) -> AsyncIterator[bytes]:
        """:meth:`_relay` for a client of another wire format: each chunk is decoded once,
        and the same object goes to the egress writer and to what was sent."""
        sent: Sent = []
        complete = False
        try:
            if first is not None:
                call.first_byte = time.perf_counter()
                out = _write(writer, first, sent)
                if out:
                    yield out
                async for chunk in events:
                    out = _write(writer, chunk, sent)
                    if len(sent) >= FOLD_AT:
                        sent[:] = fold(sent)
                    if out:
                        yield out
            complete = True
            out = writer.end()
            if out:
                yield out
        except ProxyError as exc:
            call.error = exc
            out = writer.feed(exc.body())
            if out:
                yield out
        except Exception:
            log.exception("stream %s failed", call.request_id)
            call.error = internal_error()
            out = writer.feed(call.error.body())
            if out:
                yield out
        except BaseException:  # the client went away: the task is cancelled
            call.metadata["client_disconnected"] = True
            raise
        finally:
            await self._finish_stream(call, events, sent, complete)

    async def _settle_stream(self, call: Call, sent: Sent, complete: bool) -> None:
        """After a stream: its whole answer for the stages that asked (and the cache), and
        an estimate of its usage when the upstream never said (cut short, or silent)."""
        try:
            if call.response is None and (call.collect or call.usage is None) and sent:
                call.response = wire.assemble(sent)
                if call.response is not None and call.usage is not None and "usage" not in call.response:
                    call.response["usage"] = call.usage.to_openai()
            if call.usage is None and not call.cached:
                call.usage = estimated(call)
            # stored only when every choice finished: an upstream body that just stops
            # (no finish_reason) ends the client's stream normally, but must not be cached
            if complete and call.collect and not call.cached and call.error is None \
                    and call.response is not None \
                    and all(c.get("finish_reason") for c in call.response.get("choices") or [{}]):
                await self._quietly("aiproxy_cache_store", call=call, reply=Reply(call.response))
        except Exception:
            log.exception("settling the stream of %s failed", call.request_id)


def estimated(call: Call) -> Usage:
    """The usage of an answer whose upstream never said (a stream cut short, a server that
    sends none), estimated from the request and what was answered (:mod:`aiproxy.tokens`)."""
    model = call.upstream_model or call.model
    prompt = tokens.prompt_of(call)
    produced = tokens.completion(call.response, model)
    call.metadata["usage_estimated"] = True
    return Usage(prompt, produced, prompt + produced)


#: A long stream's sent events are folded into what they add up to every this many events,
#: so what a stream holds for its settle step stays bounded (~35 KB) however long it runs.
FOLD_AT = 128


def fold(events: Sent) -> Sent:
    """``events`` as the few chunks of the answer they add up to so far: assembling the
    result and the rest gives what assembling all of them would."""
    data = wire.assemble(events)
    return [] if data is None else list(wire.replay_chunks(data, True))


def _write(writer: EgressWriter, event: bytes, sent: Sent) -> bytes:
    """What ``writer`` makes of one relayed event; each chunk in it is decoded once, and
    kept in ``sent`` as decoded."""
    out = []
    for data in sse.payloads(event):
        if data == b"[DONE]":  # a provider that sends its own
            out.append(writer.end())
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.debug("skipped a stream event that is not JSON")
            continue
        if isinstance(chunk, dict):
            sent.append(chunk)
            out.append(writer.feed(chunk))
    return out[0] if len(out) == 1 else b"".join(out)


async def replay(reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    for chunk in wire.replay_chunks(reply.data, include_usage):
        yield sse.event(chunk)
