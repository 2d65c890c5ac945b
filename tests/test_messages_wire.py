"""Anthropic Messages requests → the OpenAI chat shape (``aiproxy.builtin.messages_wire``).

Every translated body must also pass the core's own ``validate.chat``, as it does on
the way through ``/v1/messages``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from aiproxy import validate
from aiproxy.builtin.messages_wire import to_chat
from aiproxy.errors import ProxyError

BASE: dict[str, Any] = {"model": "any-model", "max_tokens": 256}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQABpfZFQAAAAABJRU5ErkJggg=="
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}


def chat(**fields: Any) -> dict[str, Any]:
    out = to_chat({**BASE, **fields})
    assert validate.chat(out) == out["model"]
    return out


def test_text_system_and_sampling_fields() -> None:
    out = chat(system="Be brief.", messages=[{"role": "user", "content": "Hi"}], temperature=0.3,
               top_p=0.9, stop_sequences=["END", "STOP"], metadata={"user_id": "u-42"})
    assert out == {"model": "any-model", "max_tokens": 256, "temperature": 0.3, "top_p": 0.9,
                   "stop": ["END", "STOP"], "user": "u-42",
                   "messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}]}


def test_system_blocks_are_joined_and_a_system_turn_stays_in_place() -> None:
    out = chat(system=[{"type": "text", "text": "One.", "cache_control": {"type": "ephemeral"}},
                       {"type": "text", "text": "Two."}],
               messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "Mid."},
                         {"role": "user", "content": "b"}])
    assert out["messages"] == [{"role": "system", "content": "One.\nTwo."}, {"role": "user", "content": "a"},
                               {"role": "system", "content": "Mid."}, {"role": "user", "content": "b"}]


def test_multi_turn_and_text_blocks() -> None:
    out = chat(messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "3+3?"}]},
        {"role": "assistant", "content": "The answer is ("},  # prefill
    ])
    assert out["messages"] == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "3+3?"}]},
        {"role": "assistant", "content": "The answer is ("},
    ]


def test_images_base64_and_url() -> None:
    out = chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}},
    ]}])
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg"}},
    ]


def test_documents_pdf_and_plain_text() -> None:
    out = chat(messages=[{"role": "user", "content": [
        {"type": "document", "title": "report.pdf",
         "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Plain words"}},
    ]}])
    assert out["messages"][0]["content"] == [
        {"type": "file", "file": {"filename": "report.pdf",
                                  "file_data": "data:application/pdf;base64,JVBERi0x"}},
        {"type": "text", "text": "Plain words"},
    ]


def test_tools_become_function_tools() -> None:
    out = chat(messages=[{"role": "user", "content": "Weather?"}],
               tools=[WEATHER, {**TIME, "type": "custom"}])
    assert out["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                          "parameters": WEATHER["input_schema"]}},
        {"type": "function", "function": {"name": "get_time", "parameters": TIME["input_schema"]}},
    ]
    assert "tool_choice" not in out


@pytest.mark.parametrize(("choice", "expected", "parallel"), [
    ({"type": "auto"}, "auto", None),
    ({"type": "any"}, "required", None),
    ({"type": "none"}, "none", None),
    ({"type": "tool", "name": "get_time"}, {"type": "function", "function": {"name": "get_time"}}, None),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ({"type": "auto", "disable_parallel_tool_use": False}, "auto", None),
])
def test_tool_choice(choice: dict[str, Any], expected: Any, parallel: bool | None) -> None:
    out = chat(messages=[{"role": "user", "content": "x"}], tools=[WEATHER, TIME], tool_choice=choice)
    assert out["tool_choice"] == expected
    assert out.get("parallel_tool_calls") is parallel


def test_tool_use_and_tool_result_round_trip() -> None:
    """Parallel tool calls, their results (one failed, one with an image), then more text."""
    out = chat(tools=[WEATHER, TIME], messages=[
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "two tools", "signature": "sig"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "18C"}, {"type": "text", "text": "sunny"},
                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                      "data": PNG}}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "clock broke", "is_error": True},
            {"type": "text", "text": "Summarise."},
        ]},
    ])
    assert out["messages"][1:] == [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C\nsunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: clock broke"},
        {"role": "user", "content": [{"type": "image_url",
                                      "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        {"role": "user", "content": "Summarise."},
    ]
    assert orjson.loads(out["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_an_assistant_turn_of_only_tool_calls_has_null_content() -> None:
    out = chat(messages=[
        {"role": "user", "content": "t?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1"}]},
    ])
    assert out["messages"][1]["content"] is None
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": ""}


def test_stream_asks_for_usage() -> None:
    out = chat(messages=[{"role": "user", "content": "x"}], stream=True)
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}
    assert "stream_options" not in chat(messages=[{"role": "user", "content": "x"}], stream=False)


def test_anthropic_only_fields_are_dropped_and_unknown_ones_pass() -> None:
    out = chat(messages=[{"role": "user", "content": "x"}], top_k=5,
               thinking={"type": "enabled", "budget_tokens": 2048}, service_tier="auto",
               mock={"tokens": 3})
    for dropped in ("top_k", "thinking", "service_tier"):
        assert dropped not in out
    assert out["mock"] == {"tokens": 3}


def test_output_config_becomes_response_format_and_reasoning_effort() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    out = chat(messages=[{"role": "user", "content": "x"}],
               output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "max"})
    assert out["response_format"] == {"type": "json_schema",
                                      "json_schema": {"name": "output", "schema": schema}}
    assert out["reasoning_effort"] == "xhigh"
    assert "output_config" not in out


def test_count_tokens_needs_no_max_tokens() -> None:
    out = to_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, count_only=True)
    assert out == {"model": "m", "messages": [{"role": "user", "content": "x"}]}


USER = [{"role": "user", "content": "x"}]
INVALID = [
    ({"max_tokens": 5, "messages": USER}, "model"),
    ({"model": "", "max_tokens": 5, "messages": USER}, "model"),
    ({"model": "m", "messages": USER}, "max_tokens"),
    ({"model": "m", "max_tokens": 0, "messages": USER}, "max_tokens"),
    ({"model": "m", "max_tokens": "10", "messages": USER}, "max_tokens"),
    ({**BASE}, "messages"),
    ({**BASE, "messages": []}, "messages"),
    ({**BASE, "messages": ["hi"]}, "messages.0"),
    ({**BASE, "messages": [{"content": "x"}]}, "messages.0.role"),
    ({**BASE, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({**BASE, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({**BASE, "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({**BASE, "messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages.0.content.0"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages.0.content.0.type"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f",
                                                          "input": {}}]}]}, "messages.0.content.0.type"),
    ({**BASE, "messages": [{"role": "assistant", "content": [{"type": "tool_result",
                                                               "tool_use_id": "a"}]}]},
     "messages.0.content.0.type"),
    ({**BASE, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f",
                                                               "input": "{}"}]}]},
     "messages.0.content.0.input"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages.0.content.0.tool_use_id"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/tiff", "data": "AA"}}]}]},
     "messages.0.content.0.source.media_type"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "file", "file_id": "f1"}}]}]}, "messages.0.content.0.source.type"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "file:///etc/passwd"}}]}]}, "messages.0.content.0.source.url"),
    ({**BASE, "messages": USER, "system": 5}, "system"),
    ({**BASE, "messages": USER, "system": [{"type": "image"}]}, "system.0"),
    ({**BASE, "messages": USER, "temperature": 1.5}, "temperature"),
    ({**BASE, "messages": USER, "top_p": "high"}, "top_p"),
    ({**BASE, "messages": USER, "top_k": -1}, "top_k"),
    ({**BASE, "messages": USER, "stop_sequences": "END"}, "stop_sequences"),
    ({**BASE, "messages": USER, "stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ({**BASE, "messages": USER, "stream": "yes"}, "stream"),
    ({**BASE, "messages": USER, "metadata": {"user_id": 7}}, "metadata.user_id"),
    ({**BASE, "messages": USER, "tools": {"name": "f"}}, "tools"),
    ({**BASE, "messages": USER, "tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({**BASE, "messages": USER, "tools": [{"input_schema": {"type": "object"}}]}, "tools.0.name"),
    ({**BASE, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools.0.type"),
    ({**BASE, "messages": USER, "tool_choice": "auto"}, "tool_choice"),
    ({**BASE, "messages": USER, "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({**BASE, "messages": USER, "output_config": "json"}, "output_config"),
    ({**BASE, "messages": USER, "output_config": {"format": {"type": "json_schema"}}},
     "output_config.format"),
    ({**BASE, "messages": USER, "output_config": {"effort": "extreme"}}, "output_config.effort"),
    ({**BASE, "messages": USER, "output_config": {"effort": ["max"]}}, "output_config.effort"),
]


@pytest.mark.parametrize(("body", "field"), INVALID)
def test_invalid_requests_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ProxyError) as caught:
        to_chat(body)
    assert caught.value.status == 400
    assert caught.value.param == field
    assert caught.value.message.startswith(f"{field}: ")
