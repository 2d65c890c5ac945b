"""Streams through a started ``aiproxy serve`` and the real ``openai`` SDK: logged when they
finish (the upstream's usage), when the client leaves mid-stream (the tokens actually
produced, marked estimated), and when they fail after the first chunk (the error's status)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.helpers import started_proxy
from tests.usage_support import MOCK_CHAT, rows, server_config, wait_for


async def test_streams_are_logged_on_finish_on_client_disconnect_and_on_error(
        migrated_url: str, tmp_path: Path) -> None:
    config = server_config(migrated_url, tmp_path / "spool", flush_interval=0.05)
    with started_proxy(config, tmp_path) as server, \
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=15) as sdk:
        whole = list(sdk.chat.completions.create(**MOCK_CHAT, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_headers={"x-request-id": "st-done"}))
        usage = whole[-1].usage
        assert usage is not None and usage.completion_tokens == 12

        stream = sdk.chat.completions.create(**MOCK_CHAT, stream=True,
                                             extra_body={"mock": {"tokens": 400, "chunk_delay_ms": 10}},
                                             extra_headers={"x-request-id": "st-left"})
        got = ""
        for chunk in stream:  # the first chunk may carry only the role
            got += chunk.choices[0].delta.content or ""
            if len(got.split()) == 5:
                break
        stream.close()  # the client leaves after 5 of 400 words
        assert len(got.split()) == 5

        with pytest.raises(openai.APIError):
            for _ in sdk.chat.completions.create(**MOCK_CHAT, stream=True,
                                                 extra_body={"mock": {"error_after": 3}},
                                                 extra_headers={"x-request-id": "st-err"}):
                pass

        async def all_three() -> bool:
            return {"st-done", "st-left", "st-err"} <= {r["request_id"] for r in await rows(migrated_url)}

        await wait_for(all_three, what="the three stream rows")
    by_id = {r["request_id"]: r for r in await rows(migrated_url)}

    done = by_id["st-done"]
    assert (done["prompt_tokens"], done["completion_tokens"], done["total_tokens"], done["status"]) == (
        usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, 200)
    assert done["metadata"]["stream"] is True and "first_byte_ms" in done["metadata"]
    assert "usage_estimated" not in done["metadata"] and "client_disconnected" not in done["metadata"]

    left = by_id["st-left"]
    assert left["metadata"]["client_disconnected"] is True
    assert left["metadata"]["usage_estimated"] is True
    assert 5 <= left["completion_tokens"] < 400  # what was produced before it noticed, not the lot
    assert left["prompt_tokens"] > 0
    assert left["total_tokens"] == left["prompt_tokens"] + left["completion_tokens"]
    assert left["status"] == 200 and left["error"] is None

    err = by_id["st-err"]
    assert err["status"] == 502 and err["error"]
    assert err["metadata"]["after_first_byte"] is True
    assert err["provider"] == "mock" and err["model"] == "mock-gpt"
