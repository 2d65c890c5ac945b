"""Ollama's native API (placeholder until the translation lands)."""

from __future__ import annotations

from typing import Any

from aiproxy import hookimpl
from aiproxy.provider import Provider


class OllamaProvider(Provider):
    required = ("api_base",)


@hookimpl
def aiproxy_register_providers(register: Any) -> None:
    register("ollama", OllamaProvider)
