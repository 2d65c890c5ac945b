"""No body sent to ``/v1/messages``, however odd, gets a traceback, a 500, or an error that
is not in Anthropic's shape; streams that start end in ``message_stop``."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import post_all

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) \
    | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else ``bad``: most bodies get deep into the translation."""
    return st.integers(0, 9).flatmap(lambda n: good if n < 9 else bad)  # one_of would flatten ``bad``


source = st.fixed_dictionaries({"type": mostly(st.sampled_from(["base64", "url", "file", "text"]))},
                               optional={"media_type": mostly(st.sampled_from(["image/png", "application/pdf",
                                                                               "image/tiff"])),
                                         "data": mostly(st.text(max_size=12)),
                                         "url": st.sampled_from(["https://x.test/a.png", "ftp://x"]),
                                         "file_id": json_values})
block = st.fixed_dictionaries(
    {"type": mostly(st.sampled_from(["text", "image", "document", "tool_use", "tool_result", "thinking",
                                     "redacted_thinking", "server_tool_use", "bogus"]))},
    optional={"text": mostly(st.text(max_size=20)), "source": mostly(source),
              "id": mostly(st.text(max_size=8)), "name": mostly(st.text(max_size=8)),
              "input": mostly(st.dictionaries(st.text(max_size=5), scalars, max_size=2)),
              "tool_use_id": mostly(st.text(max_size=8)), "is_error": mostly(st.booleans()),
              "content": mostly(st.text(max_size=12) | st.lists(json_values, max_size=2))})
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "assistant", "system", "tool"])),
     "content": mostly(st.text(max_size=20) | st.lists(block, max_size=3))})
tool = st.fixed_dictionaries({"name": mostly(st.text(min_size=1, max_size=8))},
                             optional={"input_schema": mostly(st.just({"type": "object"})),
                                       "type": mostly(st.sampled_from(["custom", "web_search_20250305"])),
                                       "description": mostly(st.text(max_size=8))})
bodies = st.fixed_dictionaries(
    {"model": mostly(st.sampled_from(["mock-a", "mock-b"])),
     "messages": mostly(st.lists(message, min_size=1, max_size=3)),
     "max_tokens": mostly(st.integers(1, 50), st.integers(-2, 0) | json_values)},
    optional={"system": mostly(st.text(max_size=10) | st.lists(block, max_size=2)),
              "stop_sequences": mostly(st.lists(st.text(max_size=4), max_size=5)),
              "temperature": mostly(st.floats(-0.5, 1.5)), "top_p": mostly(st.floats(0, 1)),
              "top_k": mostly(st.integers(-1, 10)), "metadata": mostly(st.fixed_dictionaries(
                  {}, optional={"user_id": mostly(st.text(max_size=5))})),
              "tools": mostly(st.lists(tool, max_size=2)),
              "tool_choice": mostly(st.fixed_dictionaries(
                  {"type": st.sampled_from(["auto", "any", "tool", "none"])},
                  optional={"name": mostly(st.text(max_size=8)),
                            "disable_parallel_tool_use": json_values})),
              "stream": mostly(st.booleans()), "thinking": json_values, "mock": json_values,
              "service_tier": json_values, "output_config": json_values})
PATHS = st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(PATHS, bodies), min_size=1, max_size=5))
def test_any_body_gets_an_answer_or_an_anthropic_error(cases: list[tuple[str, Any]]) -> None:
    for (path, body), r in zip(cases, asyncio.run(post_all(cases)), strict=True):
        assert r.status_code in (200, 400, 404, 413), (path, body, r.status_code, r.text)
        if r.status_code != 200:
            answer = r.json()
            assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}, answer
            assert "Traceback" not in answer["error"]["message"]
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.startswith("event: message_start\n"), r.text
            assert r.text.endswith("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"), r.text
        elif path.endswith("count_tokens"):
            assert set(r.json()) == {"input_tokens"}, r.text
        else:
            assert r.json()["type"] == "message", r.text
