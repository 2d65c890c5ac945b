"""What the google provider's tests share: config, fixtures (checked against google.genai.types),
and readers for the bodies sent upstream and the SSE sent back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.genai import types

from aiproxy.config import Config
from tests.conftest import make_config

GOOGLE_BASE = "https://gemini.test/v1beta"
GOOGLE_KEY = "AIza-upstream-secret-456"
FIXTURES = Path(__file__).parent / "fixtures" / "google"
GENERATE = f"{GOOGLE_BASE}/models/gemini-2.5-flash:generateContent"
STREAM = f"{GOOGLE_BASE}/models/gemini-2.5-flash:streamGenerateContent"
GEMINI = {"model": "gemini-test", "messages": [{"role": "user", "content": "Say hi"}]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}


def google_config(**provider: Any) -> Config:
    """A config with one google provider and models on it."""
    raw: dict[str, Any] = {
        "plugins": {"dir": None},
        "providers": {"google": {"plugin": "google", "api_base": GOOGLE_BASE, "api_key": GOOGLE_KEY,
                                 **provider}},
        # retries: 0 — these tests are about what the provider answers, not the router's retries
        "models": [{"name": "gemini-test", "provider": "google", "model": "gemini-2.5-flash", "retries": 0},
                   {"name": "gemini-embed", "provider": "google", "model": "gemini-embedding-001",
                    "retries": 0},
                   {"name": "google/*", "provider": "google", "model": "*", "retries": 0}],
    }
    return make_config(**raw)


def fixture(name: str) -> Any:
    """A JSON fixture, after proving it is a real Gemini shape."""
    data = json.loads((FIXTURES / name).read_text())
    validate(name, data)
    return data


def sse_fixture(name: str) -> bytes:
    raw = (FIXTURES / name).read_bytes()
    for event in sse_events(raw.decode()):
        types.GenerateContentResponse.model_validate(event)
    return raw


def validate(name: str, data: Any) -> None:
    """Check a response fixture against the SDK's types (extra fields are forbidden there)."""
    if name.startswith(("generate", "prompt")):
        types.GenerateContentResponse.model_validate(data)
    elif name == "embed.json":
        types.ContentEmbedding.model_validate(data["embedding"])
    elif name == "batch_embed.json":
        types.EmbedContentResponse.model_validate(data)
    elif name.startswith("models"):
        for model in data["models"]:  # the SDK renames supportedGenerationMethods when it reads them
            renamed = {("supportedActions" if k == "supportedGenerationMethods" else k): v
                       for k, v in model.items()}
            types.Model.model_validate(renamed)
    elif name.startswith("error"):
        error = data["error"]
        assert set(error) <= {"code", "message", "status", "details"}, error
        assert isinstance(error["code"], int) and isinstance(error["status"], str)
    else:
        raise AssertionError(f"no validation for fixture {name}")


def check_request(body: dict[str, Any]) -> None:
    """A generateContent body the SDK's types accept, field by field."""
    assert set(body) <= {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig",
                         "safetySettings", "cachedContent", "labels"}, body
    for content in body["contents"]:
        types.Content.model_validate(content)
    if "systemInstruction" in body:
        types.Content.model_validate(body["systemInstruction"])
    for tool in body.get("tools", []):
        types.Tool.model_validate(tool)
    if "toolConfig" in body:
        types.ToolConfig.model_validate(body["toolConfig"])
    if "generationConfig" in body:
        types.GenerationConfig.model_validate(body["generationConfig"])


def sent(route: Any) -> dict[str, Any]:
    """The JSON body last sent to ``route``, checked against the SDK's types."""
    body = json.loads(route.calls.last.request.content)
    if "contents" in body:
        check_request(body)
    return body


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of an SSE body (``\\n`` or ``\\r\\n`` framed); ``[DONE]`` as a string."""
    text = text.replace("\r\n", "\n")
    out: list[Any] = []
    for block in (b for b in text.split("\n\n") if b.strip()):
        assert block.startswith("data: "), text
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def sse_body(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events)
