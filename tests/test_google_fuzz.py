"""Any chat request, however odd, becomes either a 400 naming a field or a Gemini body the
SDK's types accept — never a 500, never a body Gemini would refuse for its shape."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiproxy.app import create_app
from tests.google_support import GOOGLE_BASE, check_request, fixture, google_config, sse_fixture

junk = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8) | st.just([]) | st.just({})


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else junk: many bodies get through, many do not."""
    return st.one_of(*[good] * 9, junk)


urls = mostly(st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "https://x.test/a.jpg", "https://x.test/a",
                               "gs://b/c.pdf", "data:image/png,raw", "ftp://x/y", "", "data:;base64,AA=="]))
D = st.fixed_dictionaries
audio = D({"data": mostly(st.text(max_size=6)), "format": mostly(st.sampled_from(["wav", "mp3"]))})
parts = st.one_of(
    D({"type": st.just("text"), "text": mostly(st.text(max_size=10))}),
    D({"type": st.just("text"), "text": st.text(min_size=1, max_size=10)}),
    D({"type": st.just("image_url"), "image_url": D({"url": urls}) | urls}),
    D({"type": st.just("input_audio"), "input_audio": mostly(audio)}),
    D({"type": st.just("file"), "file": mostly(D({"file_data": urls}))}),
    D({"type": st.sampled_from(["refusal", "video", "text"]), "refusal": st.text(max_size=5)}))
content = st.text(min_size=1, max_size=12) | st.text(max_size=12) | st.lists(parts, max_size=3)
ids = st.sampled_from(["c1", "c2", "c1~ts~QUJD"])
arguments = st.sampled_from(['{"a": 1}', "", "{}", "[1]", "not json", '{"n": {"x": [1]}}'])
tool_call = D({"id": ids, "type": st.just("function"),
               "function": D({"name": st.sampled_from(["f", "g"]), "arguments": mostly(arguments)})})
message = st.one_of(
    D({"role": st.just("user"), "content": content}),
    D({"role": st.sampled_from(["system", "developer", "user"]), "content": content}),
    D({"role": st.just("assistant"), "content": content | st.none()},
      optional={"tool_calls": st.lists(tool_call, max_size=2)}),
    D({"role": st.just("tool"), "tool_call_id": ids, "content": content}),
    D({"role": st.just("function"), "content": content, "name": mostly(st.just("f"))}))
schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
function = D({"name": st.sampled_from(["f", "g"])},
             optional={"parameters": st.just(schema), "description": st.text(max_size=5)})
tool = D({"type": st.sampled_from(["function", "custom"]), "function": function})
choice = st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "f"}},
                          {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
                              {"type": "function", "function": {"name": "g"}}]}}])
fmt = st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"},
                       {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
                       {"type": "json_schema", "json_schema": {"name": "s"}}])
bodies = D(
    {"model": st.just("gemini-test"), "messages": st.lists(message, min_size=1, max_size=5)},
    optional={"stream": st.booleans(), "tools": st.lists(tool, max_size=2), "tool_choice": choice,
              "response_format": fmt, "n": st.integers(1, 3), "max_tokens": st.integers(1, 50),
              "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=3),
              "reasoning_effort": st.sampled_from(["low", "high", "none", "max"]),
              "user": st.text(max_size=4), "logprobs": mostly(st.just(False)),
              "google": mostly(st.just({"generationConfig": {"topK": 3}})),
              "parallel_tool_calls": st.booleans(), "seed": st.integers(0, 9)})


# ------------------------------------------------------------ well-formed conversations
good_urls = st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "https://x.test/a.jpg", "https://x.test/a",
                             "gs://b/c.pdf", "http://x.test/b.webp?s=1"])
good_part = st.one_of(
    D({"type": st.just("text"), "text": st.text(min_size=1, max_size=10)}),
    D({"type": st.just("image_url"),
       "image_url": D({"url": good_urls}, optional={"detail": st.just("low")})}),
    D({"type": st.just("input_audio"), "input_audio": D({"data": st.just("UklGRg=="),
                                                           "format": st.sampled_from(["wav", "mp3"])})}),
    D({"type": st.just("file"), "file": D({"file_data": st.just("data:application/pdf;base64,JVBERi0=")})}))
good_content = st.text(min_size=1, max_size=12) | st.lists(good_part, min_size=1, max_size=3)
json_args = st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4) | st.booleans(),
                            max_size=3)
results = st.text(max_size=8) | json_args.map(json.dumps) | st.integers().map(str)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """System turns anywhere, users, assistants, and tool calls each answered by a tool message."""
    out: list[dict[str, Any]] = []
    for turn in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["system", "developer", "user", "user", "assistant", "tools"]))
        if kind in ("system", "developer"):
            out.append({"role": kind, "content": draw(st.text(min_size=1, max_size=8))})
        elif kind == "user":
            out.append({"role": "user", "content": draw(good_content)})
        elif kind == "assistant":
            out.append({"role": "assistant", "content": draw(st.text(max_size=8) | st.none())
                        if draw(st.booleans()) else "ok"})
        else:
            calls = [{"id": f"call_{turn}_{i}" + draw(st.sampled_from(["", "~ts~QUJD"])), "type": "function",
                      "function": {"name": draw(st.sampled_from(["f", "g"])),
                                   "arguments": json.dumps(draw(json_args))}}
                     for i in range(draw(st.integers(1, 3)))]
            said = draw(st.none() | st.text(max_size=5))
            out.append({"role": "assistant", "content": said, "tool_calls": calls})
            out.extend({"role": "tool", "tool_call_id": c["id"], "content": draw(results)} for c in calls)
    if not any(m["role"] == "user" or m.get("tool_calls") for m in out):  # Gemini needs a turn
        out.append({"role": "user", "content": "hi"})
    return out


good_tool = D({"type": st.just("function"), "function": function})
good_bodies = D(
    {"model": st.just("gemini-test"), "messages": conversations()},
    optional={"stream": st.booleans(), "tools": st.lists(good_tool, min_size=2, max_size=2,
                                                           unique_by=lambda t: t["function"]["name"]),
              "tool_choice": choice, "n": st.integers(1, 3), "max_tokens": st.integers(1, 50),
              "response_format": fmt.filter(lambda f: f["type"] != "xml" and f.get("json_schema", {
                  "schema": 1}).get("schema")),
              "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=3),
              "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "user": st.text(max_size=4),
              "reasoning_effort": st.sampled_from(["low", "high", "none"]), "seed": st.integers(0, 9)})


def _upstream() -> respx.MockRouter:
    router = respx.MockRouter(assert_all_called=False, using=None)
    whole, events = fixture("generate_text.json"), sse_fixture("stream_text.sse")

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        try:
            check_request(body)
        except Exception as exc:  # the gateway built a body Gemini would refuse: make it visible
            return httpx.Response(599, json={"error": {"code": 599, "message": f"bad body: {exc}"}})
        if ":streamGenerateContent" in str(request.url):
            return httpx.Response(200, content=events, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=whole)

    router.post(url__startswith=f"{GOOGLE_BASE}/models/").mock(side_effect=answer)
    return router


async def _post_all(bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    app = create_app(google_config(), transport=httpx.MockTransport(_upstream().async_handler))
    out = []
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as http:
            for body in bodies:
                out.append(await http.post("/v1/chat/completions", content=json.dumps(body)))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies, min_size=1, max_size=4))
def test_any_chat_body_is_a_valid_gemini_request_or_a_400(cases):
    for body, r in zip(cases, asyncio.run(_post_all(cases)), strict=True):
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
        if r.status_code == 400:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"], (body, error)
            assert "Traceback" not in error["message"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(good_bodies, min_size=1, max_size=4))
def test_every_well_formed_chat_body_reaches_gemini_in_a_valid_shape(cases):
    for body, r in zip(cases, asyncio.run(_post_all(cases)), strict=True):
        assert r.status_code == 200, (body, r.status_code, r.text)
