"""``aiproxy keys | tenants | users`` in-process (the subprocess run is in test_manage_e2e):
output, JSON, checks on arguments, and failures as one line with the right exit code."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from aiproxy.cli import main
from aiproxy.storage import migrate
from aiproxy.storage.db import create_engine
from aiproxy.storage.keys import ALL_TENANTS, KeyStore, hash_key
from tests.helpers import free_port

CONFIG = ("providers: {mock: {plugin: mock}}\nmodels: [{name: mock-*, provider: mock}, "
          "{name: exact, provider: mock}]\nplugins: {dir: null}\n")


class Cli:
    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config, self.capsys = config, capsys

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, [*args, "--config", str(self.config)])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def json(self, *args: str) -> Any:
        code, out, err = await self(*args, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG + f"database: {{url: '{db_url}'}}\n")
    return Cli(path, capsys)


async def _store(db_url: str) -> tuple[KeyStore, Any]:
    engine = create_engine(db_url)
    return KeyStore(engine), engine


async def test_the_first_command_migrates_an_empty_database(cli: Cli, db_url: str) -> None:
    assert await migrate.current(db_url) is None
    code, out, _ = await cli("tenants", "list")
    assert (code, out.strip()) == (0, "(none)")
    assert await migrate.current(db_url) == migrate.head()


async def test_create_prints_the_key_once_and_the_database_keeps_only_its_hash(cli: Cli, db_url: str) -> None:
    tenant = await cli.json("tenants", "create", "acme")
    user = await cli.json("users", "create", "--tenant", tenant["id"], "--email", "a@acme.test",
                          "--role", "admin")
    code, out, err = await cli("keys", "create", "--user", user["id"], "--tier", "pro",
                               "--models", "mock-gpt,exact", "--expires-in", "12h", "--monthly-limit", "500",
                               "--name", "ci", "--role", "admin")
    assert code == 0, err
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith(" "))
    secret, key_id = lines["key"].strip(), lines["id"].strip()
    assert secret.startswith("sk-") and "shown once" in out and lines["prefix"].strip() == f"{secret[:11]}…"
    store, engine = await _store(db_url)
    try:
        record = await store.lookup_by_hash(hash_key(secret))
        assert record is not None and record.id == key_id
        assert (record.tenant_id, record.user_id, record.tier, record.role, record.allowed_models,
                record.monthly_limit_tokens, record.name) == (tenant["id"], user["id"], "pro", "admin",
                                                              ("mock-gpt", "exact"), 500, "ci")
        assert record.expires_at is not None
        left = record.expires_at - dt.datetime.now(dt.UTC)
        assert dt.timedelta(hours=11, minutes=59) < left <= dt.timedelta(hours=12)
    finally:
        await engine.dispose()
    code, out, _ = await cli("keys", "list")
    assert key_id in out and secret not in out and "STATUS" in out and "active" in out


async def test_rotate_revoke_and_the_lists(cli: Cli, db_url: str) -> None:
    a = await cli.json("tenants", "create", "acme")
    b = await cli.json("tenants", "create", "globex")
    ka = await cli.json("keys", "create", "--tenant", a["id"])
    kb = await cli.json("keys", "create", "--tenant", b["id"])
    assert [k["id"] for k in await cli.json("keys", "list", "--tenant", a["id"])] == [ka["id"]]
    new = await cli.json("keys", "rotate", ka["id"], "--grace", "1h")
    assert new["key"] != ka["key"] and new["rotated_from"] == ka["id"]
    code, out, _ = await cli("keys", "revoke", kb["id"])
    assert code == 0 and f"revoked {kb['id']}" in out
    active = await cli.json("keys", "list", "--active")
    assert {k["id"] for k in active} == {ka["id"], new["id"]}
    store, engine = await _store(db_url)
    try:
        revoked = await store.get_key(kb["id"], tenant=ALL_TENANTS)
        assert revoked is not None and revoked.status(dt.datetime.now(dt.UTC)) == "revoked"
    finally:
        await engine.dispose()
    users = await cli.json("users", "list")
    assert users == []
    u = await cli.json("users", "create", "--tenant", a["id"], "--name", "Ann")
    assert [x["id"] for x in await cli.json("users", "list", "--tenant", a["id"])] == [u["id"]]
    assert (await cli("users", "delete", u["id"]))[0] == 0
    assert (await cli("tenants", "delete", b["id"]))[0] == 0
    assert [t["id"] for t in await cli.json("tenants", "list")] == [a["id"]]


@pytest.mark.parametrize(("args", "code", "words"), [
    (["keys", "create", "--models", "gpt-nope"], 2, "--models: no model 'gpt-nope' is configured"),
    (["keys", "create", "--expires-in", "soon"], 2, "--expires-in: expected seconds or a duration"),
    (["keys", "create", "--expires-in", "0"], 2, "--expires-in: must be more than 0"),
    (["keys", "create", "--monthly-limit", "-5"], 2, "--monthly-limit: must be at least 0"),
    (["keys", "create", "--user", "usr_nope"], 1, "no user 'usr_nope'"),
    (["keys", "create", "--tenant", "ten_nope"], 1, "no tenant 'ten_nope'"),
    (["keys", "revoke", "key_nope"], 1, "no key 'key_nope'"),
    (["keys", "rotate", "key_nope"], 1, "no key 'key_nope'"),
    (["tenants", "delete", "ten_nope"], 1, "no tenant 'ten_nope'"),
    (["users", "delete", "usr_nope"], 1, "no user 'usr_nope'"),
    (["users", "create", "--tenant", "ten_nope"], 1, "no tenant 'ten_nope'"),
])
async def test_bad_requests_are_one_line_and_an_exit_code(cli: Cli, args: list[str], code: int,
                                                          words: str) -> None:
    got, out, err = await cli(*args)
    assert got == code, err
    assert err.startswith("aiproxy: ") and words in err and err.count("\n") == 1
    assert "Traceback" not in err and out == ""


async def test_a_duplicate_tenant_name_is_refused(cli: Cli) -> None:
    assert (await cli("tenants", "create", "acme"))[0] == 0
    code, _, err = await cli("tenants", "create", "acme")
    assert code == 1 and "conflicts" in err and "Traceback" not in err


async def test_an_unreachable_database_is_one_line_with_no_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    url = f"postgresql+asyncpg://u:s3cr3tpw@127.0.0.1:{free_port()}/x"
    path.write_text(CONFIG + f"database: {{url: '{url}'}}\n")
    assert await asyncio.to_thread(main, ["keys", "list", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("aiproxy: cannot use the database at postgresql+asyncpg://u:***@127.0.0.1")
    assert "s3cr3tpw" not in err and "Traceback" not in err


def test_without_a_database_url_the_cli_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    assert main(["tenants", "list", "--config", str(path)]) == 2
    assert "has no database.url" in capsys.readouterr().err
