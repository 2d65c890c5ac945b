"""The real Redis the Redis tests run against (``AIPROXY_TEST_REDIS_URL``), and a key prefix
of each test's own, deleted afterwards: the server is shared, so nothing is flushed."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

REDIS_URL = os.environ.get("AIPROXY_TEST_REDIS_URL") or ""
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="AIPROXY_TEST_REDIS_URL is not set")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"aiproxy-test-{uuid.uuid4().hex[:12]}:"
    yield name
    if REDIS_URL:
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{name}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
