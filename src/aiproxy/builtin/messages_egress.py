"""The gateway's OpenAI-shaped answers, rewritten as Anthropic Messages answers at the edge.

- a whole ``chat.completion`` → a ``Message``: thinking (an upstream's reasoning, when
  the client turned ``thinking`` on; unsigned), text and ``tool_use`` blocks (arguments
  parsed into ``input``), the model name the client sent, ``stop_reason`` from
  ``finish_reason`` (stop → end_turn, or stop_sequence when the upstream names the stop
  string it hit, as vLLM does; length → max_tokens; tool_calls → tool_use;
  content_filter → refusal), usage with the prompt tokens read from and written to the
  upstream's prompt cache as ``cache_read_input_tokens`` and ``cache_creation_input_tokens``
  (``input_tokens`` is the rest, as Anthropic counts it);
- a chat stream → ``message_start``, one ``content_block_*`` run per text run and per
  tool call (``text_delta``, ``input_json_delta``), ``message_delta`` (stop reason and
  usage, sent once the usage chunk has come), ``message_stop``; an error event → ``event:
  error``;
- a failure → ``{"type": "error", "error": {"type": ..., "message": ...}}``, the status
  unchanged (the ``anthropic`` SDK maps it to its exception classes).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from aiproxy.call import Call, Usage
    from aiproxy.errors import ProxyError
    from aiproxy.provider import Reply

log = logging.getLogger("aiproxy.messages")

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}
_ERROR_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                    429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
                    529: "overloaded_error"}
_ERROR_BY_TYPE = {"invalid_request_error": "invalid_request_error",
                  "authentication_error": "authentication_error", "permission_error": "permission_error",
                  "rate_limit_error": "rate_limit_error", "timeout_error": "timeout_error",
                  "service_unavailable": "overloaded_error", "overloaded_error": "overloaded_error"}


def message_id() -> str:
    return f"msg_{os.urandom(12).hex()}"


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _ERROR_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def usage(openai: Any) -> dict[str, int]:
    """Anthropic usage from an OpenAI ``usage`` object (cache writes in
    ``prompt_tokens_details.cache_write_tokens``, as :meth:`Usage.to_openai` puts them)."""
    if not isinstance(openai, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    details = openai.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    return counts(_int(openai.get("prompt_tokens")), _int(openai.get("completion_tokens")),
                  _int(details.get("cached_tokens")), _int(details.get("cache_write_tokens")))


def counts(prompt: int, completion: int, cached: int, written: int) -> dict[str, int]:
    """Anthropic usage: ``input_tokens`` is the prompt less what the prompt cache served
    (``cache_read_input_tokens``) and what was written to it (``cache_creation_input_tokens``)."""
    cached, written = max(0, cached), max(0, written)
    out = {"input_tokens": max(0, prompt - cached - written), "output_tokens": max(0, completion)}
    if written:
        out["cache_creation_input_tokens"] = written
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def usage_of(u: Usage | None, *, output: bool = True) -> dict[str, int]:
    """Anthropic usage from the gateway's :class:`Usage` (none: zeros)."""
    if u is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return counts(u.prompt_tokens, u.completion_tokens if output else 0, u.cached_tokens,
                  u.cache_write_tokens)


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def stop_reason(call: Call, choice: dict[str, Any]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for an OpenAI choice."""
    finish = choice.get("finish_reason")
    reason = STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    matched = choice.get("stop_reason")  # vLLM and others: the stop string that ended the text
    if reason == "end_turn" and isinstance(matched, str):
        stops = call.body.get("stop")
        if isinstance(stops, list) and matched in stops:
            return "stop_sequence", matched
    return reason, None


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's ``arguments`` (JSON text) as the ``input`` object Anthropic sends."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    log.debug("messages: a tool call's arguments are not a JSON object; passed as _raw_arguments")
    return {"_raw_arguments": arguments}


def wants_thinking(call: Call) -> bool:
    """Did the client turn thinking on? Only then is an upstream's reasoning sent as thinking."""
    thinking = call.state.get("messages", {}).get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled")


def _reasoning(message: dict[str, Any]) -> str:
    """The reasoning text of a message or delta (``reasoning_content``, or ``reasoning``)."""
    value = message.get("reasoning_content") or message.get("reasoning")
    return value if isinstance(value, str) else ""


def message(call: Call, data: dict[str, Any]) -> dict[str, Any]:
    """The Anthropic ``Message`` for an OpenAI ``chat.completion``."""
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    msg = choice.get("message")
    msg = msg if isinstance(msg, dict) else {}
    content: list[dict[str, Any]] = []
    reasoning = _reasoning(msg) if wants_thinking(call) else ""
    if reasoning:  # no signature: this gateway drops thinking blocks sent back to it
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _text(msg.get("content")) or _text(msg.get("refusal"))
    if text:
        content.append({"type": "text", "text": text})
    for tc in msg.get("tool_calls") or []:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            continue
        content.append({"type": "tool_use", "id": str(tc.get("id") or f"toolu_{os.urandom(12).hex()}"),
                        "name": str(fn.get("name") or ""), "input": tool_input(fn.get("arguments"))})
    reason, sequence = stop_reason(call, choice)
    if reason == "end_turn" and any(b["type"] == "tool_use" for b in content):
        reason = "tool_use"  # some servers say "stop" beside tool calls; agent loops look for this
    if msg.get("refusal") and not msg.get("content"):
        reason = "refusal"
    return {"id": message_id(), "type": "message", "role": "assistant", "model": call.model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": usage(data.get("usage"))}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers answer in content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessagesEgress:
    """:class:`aiproxy.call.Egress` for ``/v1/messages``; holds no state between calls."""

    media_type = "application/json"

    def whole(self, call: Call, reply: Reply) -> bytes:
        return orjson.dumps(message(call, reply.data))

    def error(self, error: ProxyError) -> bytes:
        return orjson.dumps(error_body(error_type(error.status), error.message))

    def writer(self, call: Call) -> StreamWriter:
        return StreamWriter(call)


class StreamWriter:
    """Turns OpenAI chunks into Anthropic events, one call's stream at a time
    (:class:`aiproxy.call.EgressWriter`); what one chunk becomes goes out in one write."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.started = False
        self.ended = False
        self.next_index = 0
        self.open: int | None = None  # the index of the open content block
        self.kind: str | None = None  # its type: text, thinking or tool_use
        self.thinking = wants_thinking(call)
        self.tools: dict[int, int] = {}  # OpenAI tool-call index → block index
        self.reason: tuple[str, str | None] = ("end_turn", None)
        self.usage: dict[str, int] | None = None

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if self.ended:
            return b""
        out = self._opened()
        if "error" in chunk:
            out.append(self._error(chunk["error"]))
            self.ended = True
        else:
            if isinstance(chunk.get("usage"), dict):
                self.usage = usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._choice(choice, out)
        return out[0] if len(out) == 1 else b"".join(out)

    def _opened(self) -> list[bytes]:
        """The events to send before this call's first: ``message_start``, once."""
        if self.started:
            return []
        self.started = True
        return [self._start()]

    def end(self) -> bytes:
        if self.ended:
            return b""
        out = self._opened()
        self._close(out)
        out.append(self._end())
        self.ended = True
        return b"".join(out)

    # ------------------------------------------------------------ events
    def _start(self) -> bytes:
        # known before the first event for a cached answer, and for an upstream that counts
        # the prompt up front (Anthropic's own message_start)
        start = usage_of(self.call.usage, output=False)
        return event("message_start", {"type": "message_start", "message": {
            "id": message_id(), "type": "message", "role": "assistant", "model": self.call.model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": start}})

    def _end(self) -> bytes:
        reason, sequence = self.reason
        if reason == "end_turn" and self.tools:
            reason = "tool_use"
        final = self.usage or usage_of(self.call.usage)
        return event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": final}) + event("message_stop", {"type": "message_stop"})

    def _error(self, error: Any) -> bytes:
        error = error if isinstance(error, dict) else {}
        kind = _ERROR_BY_TYPE.get(str(error.get("type")), "api_error")
        message = error.get("message") if isinstance(error.get("message"), str) else "The stream failed."
        return event("error", error_body(kind, message))

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = _reasoning(delta) if self.thinking else ""
            if reasoning:
                self._delta("thinking", {"type": "thinking_delta", "thinking": reasoning}, out)
            text = delta.get("content") or delta.get("refusal")
            if isinstance(text, str) and text:
                self._delta("text", {"type": "text_delta", "text": text}, out)
            for tc in delta.get("tool_calls") or []:
                if isinstance(tc, dict):
                    self._tool_delta(tc, out)
        finish = choice.get("finish_reason")
        if finish:
            self.reason = stop_reason(self.call, choice)
            if isinstance(delta, dict) and delta.get("refusal") and finish != "tool_calls":
                self.reason = ("refusal", None)
            self._close(out)

    def _tool_delta(self, tc: dict[str, Any], out: list[bytes]) -> None:
        position = tc.get("index")
        position = position if isinstance(position, int) else len(self.tools)
        fn = tc.get("function")
        fn = fn if isinstance(fn, dict) else {}
        block = self.tools.get(position)
        if block is None:
            self._close(out)
            tool_id = str(tc.get("id") or f"toolu_{os.urandom(12).hex()}")
            block = self._open({"type": "tool_use", "id": tool_id, "name": str(fn.get("name") or ""),
                                "input": {}}, out)
            self.kind = "tool_use"
            self.tools[position] = block
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            out.append(event("content_block_delta", {
                "type": "content_block_delta", "index": block,
                "delta": {"type": "input_json_delta", "partial_json": arguments}}))

    def _delta(self, kind: str, delta: dict[str, Any], out: list[bytes]) -> None:
        """Add to the open text or thinking block, opening one first when that is not it."""
        if self.kind != kind:
            self._close(out)
            self._open({"type": "text", "text": ""} if kind == "text" else
                       {"type": "thinking", "thinking": "", "signature": ""}, out)
            self.kind = kind
        out.append(event("content_block_delta", {"type": "content_block_delta", "index": self.open,
                                                 "delta": delta}))

    def _open(self, block: dict[str, Any], out: list[bytes]) -> int:
        index = self.next_index
        self.next_index += 1
        self.open = index
        out.append(event("content_block_start", {"type": "content_block_start", "index": index,
                                                 "content_block": block}))
        return index

    def _close(self, out: list[bytes]) -> None:
        if self.open is not None:
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": self.open}))
        self.open = self.kind = None
