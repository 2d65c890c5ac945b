"""aiproxy: an OpenAI-compatible LLM gateway built from pluggy plugins."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Mark a plugin's functions as hook implementations: ``@hookimpl``.
hookimpl = pluggy.HookimplMarker("aiproxy")

__all__ = ["__version__", "hookimpl"]
