"""Gemini API answers in OpenAI shape: whole responses, stream events, usage, errors."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson

from aiproxy import wire
from aiproxy.builtin.google_wire import SIGNATURE
from aiproxy.errors import ProxyError
from aiproxy.upstream import upstream_error

_FILTERED = frozenset(("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                       "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"))


def finish_reason(candidate: dict[str, Any], tool_calls: bool) -> str:
    """STOP → stop, MAX_TOKENS → length, the filters → content_filter; calls → tool_calls."""
    reason = candidate.get("finishReason")
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _FILTERED:
        return "content_filter"
    return "tool_calls" if tool_calls else "stop"


def usage(meta: Any) -> dict[str, Any] | None:
    """``usageMetadata`` as OpenAI usage; thinking tokens count as completion tokens."""
    if not isinstance(meta, dict):
        return None
    prompt, thoughts = _int(meta.get("promptTokenCount")), _int(meta.get("thoughtsTokenCount"))
    completion = _int(meta.get("candidatesTokenCount")) + thoughts
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": _int(meta.get("totalTokenCount")) or prompt + completion}
    cached = _int(meta.get("cachedContentTokenCount"))
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    if thoughts:
        out["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return out


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def check_prompt(data: dict[str, Any]) -> None:
    """A prompt Gemini refused (``promptFeedback.blockReason``) is the client's 400."""
    feedback = data.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if reason and not data.get("candidates"):
        detail = feedback.get("blockReasonMessage") if isinstance(feedback, dict) else None
        raise ProxyError(400, f"Gemini blocked the prompt ({reason})" + (f": {detail}" if detail else ""),
                         code="content_filter", param="messages")


def response_id(data: dict[str, Any], prefix: str = "chatcmpl") -> str:
    rid = data.get("responseId")
    return f"{prefix}-{rid}" if isinstance(rid, str) and rid else wire.new_id(prefix)


def created(data: dict[str, Any]) -> int:
    """``createTime`` (RFC 3339) as epoch seconds; now when absent or unreadable."""
    stamp = data.get("createTime")
    if isinstance(stamp, str):
        try:
            return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        except ValueError:
            pass
    return int(time.time())


def read_parts(candidate: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """(text, thought summary text, OpenAI tool calls) of a candidate's parts."""
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    text: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, dict):
            continue
        fc = part.get("functionCall")
        if isinstance(fc, dict):
            calls.append(_tool_call(fc, part.get("thoughtSignature")))
        elif isinstance(part.get("text"), str):
            (thoughts if part.get("thought") else text).append(part["text"])
    return "".join(text), "".join(thoughts), calls


def _tool_call(fc: dict[str, Any], signature: Any) -> dict[str, Any]:
    """An OpenAI tool call; the thought signature rides in the id to come back next turn."""
    cid = fc.get("id") if isinstance(fc.get("id"), str) and fc.get("id") else f"call_{os.urandom(12).hex()}"
    if isinstance(signature, str) and signature:
        cid = f"{cid}{SIGNATURE}{signature}"
    args = fc.get("args")
    return {"id": cid, "type": "function",
            "function": {"name": str(fc.get("name") or ""),
                         "arguments": orjson.dumps(args if isinstance(args, dict) else {}).decode()}}


def chat_completion(data: dict[str, Any], model: str) -> dict[str, Any]:
    """A whole ``GenerateContentResponse`` as a ``chat.completion``: one choice per candidate."""
    check_prompt(data)
    choices = []
    for pos, candidate in enumerate(data.get("candidates") or []):
        text, thoughts, calls = read_parts(candidate)
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else ""),
                                   "refusal": None}
        if thoughts:
            message["reasoning_content"] = thoughts
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": _index(candidate, pos), "message": message, "logprobs": None,
                        "finish_reason": finish_reason(candidate, bool(calls))})
    out = wire.chat_completion(id=response_id(data), model=model, message={}, finish_reason=None,
                               usage=usage(data.get("usageMetadata")), created=created(data))
    out["choices"] = choices
    return out


def text_completion(data: dict[str, Any], model: str) -> dict[str, Any]:
    """A whole ``GenerateContentResponse`` as a legacy ``text_completion``."""
    check_prompt(data)
    choices = [{"index": _index(c, pos), "text": read_parts(c)[0], "logprobs": None,
                "finish_reason": finish_reason(c, False)}
               for pos, c in enumerate(data.get("candidates") or [])]
    out = wire.text_completion(id=response_id(data, "cmpl"), model=model, text="", finish_reason=None,
                               usage=usage(data.get("usageMetadata")), created=created(data))
    out["choices"] = choices
    return out


def _index(candidate: dict[str, Any], pos: int) -> int:
    index = candidate.get("index")
    return index if type(index) is int else pos


class Chunks:
    """Turns each streamed ``GenerateContentResponse`` into OpenAI chunks.

    Tool calls get indexes that count up per choice across the whole stream; Gemini sends
    each call whole, so a call is one delta with its id, name and all its arguments.
    With ``text``, the chunks are legacy ``text_completion`` ones.
    """

    def __init__(self, model: str, text: bool = False) -> None:
        self.model = model
        self.text = text
        self.id = ""
        self.created = 0
        self.usage: dict[str, Any] | None = None
        self.tools: dict[int, int] = {}  # choice index → tool calls sent so far
        self.finished: set[int] = set()
        self.events = 0

    def feed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.events:
            check_prompt(data)  # before the first byte: an ordinary 400
            self.id, self.created = response_id(data, "cmpl" if self.text else "chatcmpl"), created(data)
        self.events += 1
        if data.get("usageMetadata") is not None:
            self.usage = usage(data["usageMetadata"])
        out = []
        for pos, candidate in enumerate(data.get("candidates") or []):
            index = _index(candidate, pos)
            text, thoughts, calls = read_parts(candidate)
            if self.text:
                self.tools.setdefault(index, 0)
                out.extend(self._text(index, text, candidate.get("finishReason")))
                continue
            delta: dict[str, Any] = {}
            if index not in self.tools:
                self.tools[index] = 0
                delta = {"role": "assistant", "content": ""}
            if text:
                delta["content"] = text
            if thoughts:
                delta["reasoning_content"] = thoughts
            if calls:
                first = self.tools[index]
                delta["tool_calls"] = [{"index": first + k, **c} for k, c in enumerate(calls)]
                self.tools[index] += len(calls)
            if delta:
                out.append(self.chunk(delta=delta, index=index))
            if candidate.get("finishReason"):
                self.finished.add(index)
                out.append(self.chunk(delta={}, index=index,
                                      finish_reason=finish_reason(candidate, self.tools[index] > 0)))
        return out

    def _text(self, index: int, text: str, finish: Any) -> list[dict[str, Any]]:
        out = []
        if text:
            out.append(wire.text_chunk(id=self.id, model=self.model, created=self.created, text=text))
        if finish:
            self.finished.add(index)
            out.append(wire.text_chunk(id=self.id, model=self.model, created=self.created, text="",
                                       finish_reason=finish_reason({"finishReason": finish}, False)))
        for chunk in out:
            chunk["choices"][0]["index"] = index
        return out

    def chunk(self, **fields: Any) -> dict[str, Any]:
        return wire.chat_chunk(id=self.id, model=self.model, created=self.created, **fields)

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk, for a client that asked for usage."""
        if self.text:
            return wire.text_chunk(id=self.id, model=self.model, created=self.created, text="",
                                   usage=self.usage)
        return self.chunk(usage=self.usage)


# ------------------------------------------------------------ errors
def google_error(provider: str, status: int, body: bytes, headers: Mapping[str, str],
                 secrets: Iterable[str | None]) -> ProxyError:
    """:func:`upstream_error`, knowing Gemini's ``google.rpc.Status`` error body.

    A 429's ``RetryInfo.retryDelay`` becomes ``retry-after``; a key Gemini calls invalid
    (a 400 with reason ``API_KEY_INVALID``) is the gateway's problem, not the client's.
    """
    err = upstream_error(provider, status, body, headers, secrets)
    details = _details(body)
    if status == 400 and any(d.get("reason") == "API_KEY_INVALID" for d in details):
        return upstream_error(provider, 401, b"", headers)
    if err.status == 429 and "retry-after" not in err.headers:
        for d in details:
            delay = d.get("retryDelay")
            if isinstance(delay, str) and delay.endswith("s"):
                try:
                    seconds = float(delay[:-1])
                except ValueError:
                    continue
                if not math.isfinite(seconds):  # "infs", "nans": ceil() would raise
                    continue
                err.headers["retry-after"] = str(max(1, math.ceil(seconds)))
                break
    return err


def _details(body: bytes) -> list[dict[str, Any]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    err = data.get("error") if isinstance(data, dict) else None
    details = err.get("details") if isinstance(err, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []
