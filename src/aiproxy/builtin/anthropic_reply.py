"""Anthropic answers → OpenAI shape: a whole ``Message`` → ``chat.completion``, and stream
events (``message_start``, ``content_block_*``, ``message_delta``, ``message_stop``) →
``chat.completion.chunk`` objects, one upstream event at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from aiproxy import wire
from aiproxy.call import Usage

if TYPE_CHECKING:
    from aiproxy.call import Call

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
                "max_tokens": "length", "model_context_window_exceeded": "length",
                "tool_use": "tool_calls", "refusal": "content_filter"}


def chat_id(message_id: Any) -> str:
    """The OpenAI id of an answer: ``chatcmpl-`` and the Anthropic message id."""
    return f"chatcmpl-{message_id}" if isinstance(message_id, str) and message_id else wire.new_id("chatcmpl")


def finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return STOP_REASONS.get(stop_reason, "stop")


def read_usage(data: Any) -> Usage:
    """Anthropic usage in OpenAI terms: the prompt counts cache reads and writes too."""
    data = data if isinstance(data, dict) else {}
    read = _int(data.get("cache_read_input_tokens"))
    written = _int(data.get("cache_creation_input_tokens"))
    prompt = _int(data.get("input_tokens")) + read + written
    completion = _int(data.get("output_tokens"))
    return Usage(prompt, completion, prompt + completion, read, written)


def openai_usage(u: Usage) -> dict[str, Any]:
    out = u.to_openai()
    out.setdefault("prompt_tokens_details", {"cached_tokens": u.cached_tokens})
    return out


def completion(data: dict[str, Any], created: int) -> dict[str, Any]:
    """A whole Anthropic ``Message`` as an OpenAI ``chat.completion``."""
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data.get("content") or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "thinking":
            thinking.append(str(block.get("thinking") or ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    return wire.chat_completion(id=chat_id(data.get("id")), model=str(data.get("model") or ""),
                                message=message, finish_reason=finish_reason(data.get("stop_reason")),
                                usage=openai_usage(read_usage(data.get("usage"))), created=created)


def _int(value: Any) -> int:
    return value if type(value) is int else 0


class StreamTranslator:
    """Anthropic stream events → OpenAI chunks, one event at a time.

    The chunk id comes from the message id, ``created`` is set once; each ``tool_use``
    block gets the next tool-call index, which its ``input_json_delta`` events keep.
    """

    def __init__(self, call: Call, created: int) -> None:
        self.call = call
        self.created = created
        self.id = ""
        self.model = call.upstream_model
        self.tools: dict[Any, int] = {}  # Anthropic block index → OpenAI tool-call index
        self.counts: dict[str, Any] = {}
        self.done = False

    def chunk(self, delta: dict[str, Any] | None = None, finish: str | None = None,
              usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return wire.chat_chunk(id=self.id, model=self.model, created=self.created, delta=delta,
                               finish_reason=finish, usage=usage)

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = self._delta(event)
            return [self.chunk(delta)] if delta else []
        if kind == "message_start":
            message = event.get("message") or {}
            self.id = chat_id(message.get("id"))
            self.model = str(message.get("model") or self.model)
            self._count(message.get("usage"))
            return [self.chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self.tools[event.get("index")] = len(self.tools)
                return [self.chunk({"tool_calls": [{
                    "index": index, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self.chunk({"content": block["text"]})]
            return []
        if kind == "message_delta":
            self._count(event.get("usage"))
            finish = finish_reason((event.get("delta") or {}).get("stop_reason"))
            return [self.chunk({}, finish)] if finish else []
        if kind == "message_stop":
            self.done = True
            usage = self.call.usage
            if self.call.include_usage and usage is not None:
                return [self.chunk(usage=openai_usage(usage))]
        return []  # ping, content_block_stop, and event types added later

    def _delta(self, event: dict[str, Any]) -> dict[str, Any] | None:
        delta = event.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta":
            return {"content": delta.get("text") or ""}
        if kind == "input_json_delta":
            index = self.tools.get(event.get("index"))
            if index is None or not delta.get("partial_json"):
                return None
            return {"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]}
        if kind == "thinking_delta":
            return {"reasoning_content": delta.get("thinking") or ""}
        return None  # signature and citation deltas have no OpenAI counterpart

    def _count(self, counts: Any) -> None:
        """Input counts arrive in ``message_start``, output (and sometimes input again) in
        ``message_delta``: the latest value of each wins."""
        if isinstance(counts, dict):
            self.counts.update((k, v) for k, v in counts.items() if v is not None)
            self.call.usage = read_usage(self.counts)
