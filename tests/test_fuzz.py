"""No request body, however odd, gets a traceback, a 500, or a non-OpenAI-shaped error."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import post_all

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) \
    | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
FIELDS = ["messages", "prompt", "input", "stream", "stream_options", "temperature", "top_p", "n",
          "max_tokens", "stop", "tools", "tool_choice", "response_format", "encoding_format",
          "dimensions", "user", "seed", "mock", "logprobs", "echo", "best_of"]
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "bogus"])},
    optional={"content": json_values | st.text(max_size=30), "tool_call_id": json_values,
              "tool_calls": json_values, "name": json_values})
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["mock-a", "mock-b"]) | json_values},
    optional={**{f: json_values for f in FIELDS}, "messages": st.lists(message, max_size=3),
              "prompt": st.text(max_size=20) | json_values, "input": st.text(max_size=20) | json_values})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
                          bodies), min_size=1, max_size=5))
def test_any_body_gets_an_answer_or_an_openai_error(cases):
    for (path, body), r in zip(cases, asyncio.run(post_all(cases)), strict=True):
        assert r.status_code in (200, 400, 404, 413), (path, body, r.status_code, r.text)
        if r.status_code != 200:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert "Traceback" not in error["message"]
