"""No plaintext key or provider secret in the database, the logs, or any answer.

One session on SQLite and on PostgreSQL creates, uses, rotates and revokes virtual keys
through the management API and the CLI, stores tenants' own provider keys, and makes
calls with all of them (and with wrong keys). Then every secret that passed through is
looked for in the database (the SQLite file and its WAL byte for byte; every PostgreSQL
row as text), in everything logged at DEBUG, and in every answer (except, for a
virtual key, the one answer that handed it out).
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import httpx
import pytest
import respx
from sqlalchemy import select

from aiproxy.cli import main
from aiproxy.storage.db import create_engine, is_sqlite
from aiproxy.storage.keys import hash_key
from aiproxy.storage.models import Base
from tests.conftest import OPENAI_BASE
from tests.helpers import KEY as SHARED_KEY
from tests.manage_support import ENCRYPTION_KEY, MASTER, make_tenant, manage_app

OWN_KEYS = {"acme": "sk-acme-own-provider-key-7a7a7a7a", "globex": "sk-globex-own-provider-key-8b8b8b"}
REPLY = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                      "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


async def _database_text(url: str) -> bytes:
    """Everything the database holds, as bytes to search."""
    if is_sqlite(url):
        path = Path(url.split(":///", 1)[1])
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            out = []
            for table in Base.metadata.sorted_tables:
                out += [repr(tuple(row)) for row in await conn.execute(select(table))]
        return "\n".join(out).encode()
    finally:
        await engine.dispose()


async def test_no_secret_in_the_database_the_logs_or_any_answer(
        migrated_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = respx.MockRouter(assert_all_called=False, using=None)
    upstream.post(f"{OPENAI_BASE}/chat/completions").respond(json=REPLY)
    async with manage_app(migrated_url, transport=httpx.MockTransport(upstream.async_handler)) as api:
        tenants = [await make_tenant(api, name) for name in OWN_KEYS]
        for t, own in zip(tenants, OWN_KEYS.values(), strict=True):
            await api.call("PATCH", f"/keys/{t.member_key_id}",
                           json={"allowed_models": ["gpt-test", "mock-gpt"]})
            assert (await api.call("PUT", "/providers/openai/credentials", key=t.admin_key,
                                   json={"api_key": own})).status_code == 200
            assert (await api.chat(t.member_key, model="gpt-test")).status_code == 200
            await api.call("GET", "/providers", key=t.admin_key)
            await api.call("GET", "/providers/openai/credentials", key=t.admin_key)
            await api.call("GET", "/keys", key=t.admin_key)
            await api.call("GET", "/keys/self", key=t.member_key)
        a = tenants[0]
        rotated = (await api.call("POST", f"/keys/{a.member_key_id}/rotate")).json()
        assert (await api.chat(a.member_key)).status_code == 401  # the old key, refused
        assert (await api.chat(rotated["key"])).status_code == 200
        await api.call("DELETE", f"/keys/{rotated['id']}")
        assert (await api.chat(rotated["key"])).status_code == 401  # revoked
        wrong = "sk-" + "W" * 43
        assert (await api.chat(wrong)).status_code == 401
        assert (await api.call("GET", "/keys", key=wrong)).status_code == 401
        assert (await api.call("PUT", "/providers/openai/credentials", key=a.admin_key,
                               json={"api_key": OWN_KEYS["acme"], "bogus": 1})).status_code == 400
        for call in upstream.calls:  # each tenant's own key went upstream, never the other's
            assert call.request.headers["authorization"] in {f"Bearer {k}" for k in OWN_KEYS.values()}

        cfg = tmp_path / "cli.yaml"
        cfg.write_text(f"providers: {{mock: {{plugin: mock}}}}\nmodels: [{{name: mock-*, provider: mock}}]\n"
                       f"plugins: {{dir: null}}\ndatabase: {{url: '{migrated_url}'}}\n")
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["keys", "create", "--tenant", a.id, "--config", str(cfg)]) == 0
        printed = capsys.readouterr().out
        cli_key = re.search(r"key:\s+(sk-\S+)", printed)
        assert cli_key, printed
        assert (await api.chat(cli_key.group(1))).status_code == 200
        answers = list(api.answers)
        virtual = [*api.secrets, cli_key.group(1)]

    secrets = [*virtual, MASTER, SHARED_KEY, ENCRYPTION_KEY, wrong, *OWN_KEYS.values()]
    assert len(set(virtual)) == 6  # 2 tenants x 2 keys, a rotation, the CLI's
    database = await _database_text(migrated_url)
    for key in virtual:  # the grep can see the keys' rows: their hashes are there
        assert hash_key(key).encode() in database
    logs = caplog.text
    assert "aiproxy" in logs  # something was logged to look through
    for secret in secrets:
        body = secret.removeprefix("sk-")
        assert body.encode() not in database, f"{secret[:8]}… is in the database"
        assert body not in logs, f"{secret[:8]}… was logged"
        for response, handed_out in answers:
            if secret == handed_out:
                continue
            assert body not in response.text, f"{secret[:8]}… in {response.request.url}: {response.text}"
            assert all(body not in v for v in response.headers.values())
