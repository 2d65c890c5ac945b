"""A key's whole life through a started ``aiproxy serve`` and the real ``openai`` SDK, on
SQLite and (when configured) PostgreSQL: create → use → rotate → revoke → expire; a
tenant's own provider key on its calls; and afterwards, no plaintext key or provider
secret anywhere: not in the database, not in the DEBUG log, not in any answer but the
one that hands a new key out."""

from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import inspect, text

from aiproxy.storage.credentials import CredentialStore
from aiproxy.storage.crypto import Cipher
from aiproxy.storage.db import create_engine
from aiproxy.storage.keys import KeyStore, hash_key
from tests.fakes import FakeOpenAI
from tests.helpers import started_proxy

MASTER = "mk-e2e-master-key-0123456789"
SHARED = "sk-shared-upstream-key-e2e-0001"
TENANT_OWN = "sk-tenant-own-upstream-key-e2e-0002"
ENC = os.urandom(32)


@dataclass
class Served:
    url: str
    db_url: str
    fake: FakeOpenAI
    process: subprocess.Popen[bytes]
    log: Path
    answers: list[str] = field(default_factory=list)  # every answer body that must hold no secret

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(base_url=self.url, trust_env=False, timeout=10) as http:
            r = http.request(method, path, headers={"authorization": f"Bearer {MASTER}"}, **kwargs)
        return r

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=15)

    def chat(self, key: str, model: str = "mock-gpt", content: str = "hello") -> str:
        with self.sdk(key) as client:
            done = client.chat.completions.create(model=model,
                                                  messages=[{"role": "user", "content": content}])
        self.answers.append(done.model_dump_json())
        return done.choices[0].message.content or ""

    def refused(self, key: str, model: str = "mock-gpt") -> openai.APIStatusError:
        with self.sdk(key) as client, pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        self.answers.append(info.value.response.text + str(dict(info.value.response.headers)))
        return info.value


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[Served]:
    with FakeOpenAI() as fake:
        config = {
            "server": {"master_key": MASTER},
            "plugins": {"dir": None},
            "database": {"url": db_url},
            "keys": {"required": True, "cache_ttl": 30, "flush_interval": 3600},
            "security": {"encryption_key": base64.b64encode(ENC).decode()},
            "providers": {"mock": {"plugin": "mock"},
                          "openai": {"plugin": "openai", "api_base": f"{fake.url}/v1", "api_key": SHARED}},
            "models": [{"name": "mock-*", "provider": "mock"},
                       {"name": "gpt-fake", "provider": "openai", "model": "gpt-4o-mini"}],
        }
        with started_proxy(config, tmp_path, "--log-level", "debug", log_name="serve.log",
                           stop_timeout=15) as started:
            yield Served(started.url, db_url, fake, started.process, started.log)


async def _database_text(db_url: str) -> str:
    """Every row of every table, as text (PostgreSQL) — or the SQLite files' raw bytes."""
    if db_url.startswith("sqlite"):
        path = Path(db_url.split(":///", 1)[1])
        return "".join(p.read_bytes().decode("latin-1") for p in path.parent.glob(path.name + "*"))
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
            out = []
            for table in tables:
                rows = (await conn.execute(text(f'SELECT * FROM "{table}"'))).all()
                out.extend(" ".join(map(str, row)) for row in rows)
        return "\n".join(out)
    finally:
        await engine.dispose()


async def test_key_lifecycle_through_the_openai_sdk_and_no_secret_left_behind(served: Served) -> None:
    tenant = served.admin("POST", "/api/ai/tenants", json={"name": "acme"}).json()
    created = served.admin("POST", "/api/ai/keys", json={
        "tenant_id": tenant["id"], "name": "app", "tier": "pro", "allowed_models": ["mock-gpt", "gpt-fake"]})
    assert created.status_code == 201, created.text
    first, first_id = created.json()["key"], created.json()["id"]
    assert first.startswith("sk-") and len(first) == 46

    engine = create_engine(served.db_url)  # what an operator's tooling writes
    try:
        await CredentialStore(engine, Cipher(ENC)).put(tenant["id"], "openai", TENANT_OWN)
        other, _ = await KeyStore(engine).create_key(name="no-tenant")
        expired_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        stale, _ = await KeyStore(engine).create_key(name="old", expires_at=expired_at)
    finally:
        await engine.dispose()

    # use: plain, streamed, and a model the key may not use
    assert served.chat(first)
    with served.sdk(first) as client:
        stream = client.chat.completions.create(model="mock-gpt", stream=True,
                                                messages=[{"role": "user", "content": "stream please"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    denied = served.refused(first, "mock-claude")
    assert denied.status_code == 403 and "'mock-claude'" in denied.message
    for bad in ("sk-" + "Z" * 43, "not-a-key", first[:-1]):
        err = served.refused(bad)
        assert isinstance(err, openai.AuthenticationError) and err.code == "invalid_api_key"

    # bring your own key (stored before the tenant's first call; another process's change
    # reaches a running replica within keys.cache_ttl): its calls carry its own key
    served.chat(first, "gpt-fake", "marker-tenant")
    served.chat(other, "gpt-fake", "marker-shared")
    [mine] = served.fake.with_text("marker-tenant")
    [theirs] = served.fake.with_text("marker-shared")
    assert mine.headers["authorization"] == f"Bearer {TENANT_OWN}"
    assert theirs.headers["authorization"] == f"Bearer {SHARED}"

    # rotate: a new secret works at once, the old one is refused as revoked
    rotated = served.admin("POST", f"/api/ai/keys/{first_id}/rotate")
    assert rotated.status_code == 201, rotated.text
    second, second_id = rotated.json()["key"], rotated.json()["id"]
    assert served.chat(second)
    old = served.refused(first)
    assert old.status_code == 401 and old.code == "revoked_api_key" and "revoked" in old.message

    # revoke
    assert served.admin("DELETE", f"/api/ai/keys/{second_id}").status_code == 200
    gone = served.refused(second)
    assert gone.status_code == 401 and gone.code == "revoked_api_key"

    # expire
    late = served.refused(stale)
    assert late.status_code == 401 and late.code == "expired_api_key" and "expired" in late.message

    listed = served.admin("GET", "/api/ai/keys")
    assert listed.status_code == 200 and {k["id"] for k in listed.json()["data"]} >= {first_id, second_id}
    served.answers.append(listed.text)

    served.process.terminate()
    served.process.wait(15)  # uvicorn re-raises the SIGTERM it handled: -15, after a clean shutdown

    secrets = {"first key": first, "rotated key": second, "other key": other, "expired key": stale,
               "tenant's provider key": TENANT_OWN, "shared provider key": SHARED,
               "master key": MASTER}
    stored = await _database_text(served.db_url)
    log = served.log.read_text()
    assert "Traceback" not in log and "Application shutdown complete" in log
    assert hash_key(first) in stored and " DEBUG " in log  # we read the real rows and a DEBUG log
    for what, secret in secrets.items():
        assert secret not in stored, f"{what} is in the database"
        assert secret[3:] not in stored, f"{what} (without sk-) is in the database"
        assert secret not in log, f"{what} is in the DEBUG log"
        for answer in served.answers:
            assert secret not in answer, f"{what} is in an answer: {answer[:200]}"

    engine = create_engine(served.db_url)
    try:
        used = await KeyStore(engine).get_key(first_id, tenant=tenant["id"])
    finally:
        await engine.dispose()
    assert used is not None and used.last_used_at is not None  # flushed at shutdown
