"""``aiproxy db upgrade | current`` and what ``aiproxy serve`` does with its database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect

from aiproxy.cli import main
from aiproxy.storage import migrate
from aiproxy.storage.db import create_engine
from tests.helpers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ("providers: {mock: {plugin: mock}}\nmodels: [{name: mock-*, provider: mock}]\n"
           "plugins: {dir: null}\n")


def _config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL + f"database: {{url: '{url}'{extra}}}\n")
    return path


async def test_db_upgrade_then_current(db_url: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(_config(tmp_path, db_url))
    assert await _in_thread(main, ["db", "current", "--config", cfg]) == 3  # empty: behind head
    assert "at revision none (empty)" in capsys.readouterr().out
    assert await _in_thread(main, ["db", "upgrade", "--config", cfg]) == 0
    assert f"at revision {migrate.head()} (head)" in capsys.readouterr().out
    assert await _in_thread(main, ["db", "upgrade", "--config", cfg]) == 0  # idempotent
    assert await _in_thread(main, ["db", "current", "--config", cfg]) == 0
    assert f"at revision {migrate.head()} (head)" in capsys.readouterr().out


async def _in_thread(fn: object, argv: list[str]) -> int:
    """The CLI runs its own event loop (asyncio.run), so not on the test's."""
    import asyncio

    return await asyncio.to_thread(fn, argv)  # type: ignore[arg-type]


def test_db_upgrade_on_an_unreachable_database_is_one_clear_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    cfg = _config(tmp_path, f"postgresql+asyncpg://aiproxy:s3cretpw@127.0.0.1:{port}/aiproxy")
    assert main(["db", "upgrade", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"cannot use the database at postgresql+asyncpg://aiproxy:***@127.0.0.1:{port}/aiproxy" in err
    assert "s3cretpw" not in err and "Traceback" not in err


def _serve(config: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPROXY_")}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "aiproxy", "serve", "--config", str(config),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=config.parent)


def test_serve_exits_with_a_clear_message_when_the_database_is_down(tmp_path: Path) -> None:
    dead = free_port()
    cfg = _config(tmp_path, f"postgresql+asyncpg://postgres:pw123456@127.0.0.1:{dead}/aiproxy")
    log = tmp_path / "serve.log"
    process = _serve(cfg, log, free_port())
    assert process.wait(30) == 2
    text = log.read_text()
    shown = f"postgresql+asyncpg://postgres:***@127.0.0.1:{dead}/aiproxy"
    assert f"aiproxy: cannot use the database at {shown}" in text
    assert "Traceback" not in text and "pw123456" not in text


def test_serve_refuses_a_database_behind_head_when_told_not_to_migrate(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/a.db", ", migrate_on_start: false")
    log = tmp_path / "serve.log"
    process = _serve(cfg, log, free_port())
    assert process.wait(30) == 2
    assert f"this aiproxy needs {migrate.head()}: run 'aiproxy db upgrade'" in log.read_text()


async def test_the_shipped_config_creates_and_migrates_its_sqlite_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text((ROOT / "config.yaml").read_text())
    port = free_port()
    log = tmp_path / "serve.log"
    process = _serve(config, log, port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, log)
        async with httpx.AsyncClient(trust_env=False) as http:
            ready = (await http.get(f"{url}/ready")).json()
        assert {"name": "database", "ok": True, "detail": "sqlite"} in ready["checks"]
    finally:
        process.terminate()
        process.wait(15)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/aiproxy.db")
    try:
        async with engine.connect() as conn:
            assert "api_keys" in await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()
    assert await migrate.current(f"sqlite+aiosqlite:///{tmp_path}/aiproxy.db") == migrate.head()
