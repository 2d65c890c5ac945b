"""``aiproxy db upgrade | current | rotate-encryption-key``, and the database check
``aiproxy serve`` runs first.

Each returns an exit code and prints what happened; a database that cannot be
reached is one clear line on stderr naming it (password hidden), never a traceback.
"""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from aiproxy.config import Config
from aiproxy.storage import migrate
from aiproxy.storage.credentials import CredentialStore
from aiproxy.storage.crypto import CryptoError, cipher_from
from aiproxy.storage.db import DatabaseError, create_engine, redact


def migrate_on_start(config: Config) -> bool:
    value = config.section("database").get("migrate_on_start", True)
    return value not in (False, "false", "no", "off", "0", 0)


def _failure(url: str, exc: BaseException) -> str:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    detail = reason[0] if reason and reason[0] else type(exc).__name__
    return f"cannot use the database at {redact(url)}: {detail}"


async def prepare(url: str, *, upgrade: bool) -> str | None:
    """Reach the database and bring its schema to head (or check it is there).

    None when all is well, else the message to print before exiting.
    """
    try:
        engine = create_engine(url)
    except DatabaseError as exc:
        return str(exc)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        if upgrade:
            await migrate.upgrade(engine)
            return None
        at, head = await migrate.current(engine), migrate.head()
        if at != head:
            return (f"the database at {redact(url)} is at schema revision {at or 'none'}, this aiproxy "
                    f"needs {head}: run 'aiproxy db upgrade' (or set database.migrate_on_start: true)")
        return None
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        return _failure(url, exc)
    finally:
        await engine.dispose()


def run(action: str, config: Config, url: str | None) -> int:
    """``aiproxy db <action>``."""
    url = url or config.database_url
    if not url:
        print(f"aiproxy: {config.source} has no database.url (and no --url was given)", file=sys.stderr)
        return 2
    try:
        if action == "upgrade":
            problem = asyncio.run(prepare(url, upgrade=True))
            if problem:
                print(f"aiproxy: {problem}", file=sys.stderr)
                return 1
            print(f"{redact(url)}: at revision {migrate.head()} (head)")
            return 0
        if action == "rotate-encryption-key":
            return asyncio.run(_rotate(config, url))
        at = asyncio.run(migrate.current(url))
    except CryptoError as exc:
        print(f"aiproxy: {exc}", file=sys.stderr)
        return 2
    except DatabaseError as exc:
        print(f"aiproxy: {exc}", file=sys.stderr)
        return 2
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        print(f"aiproxy: {_failure(url, exc)}", file=sys.stderr)
        return 1
    head = migrate.head()
    state = "head" if at == head else f"behind: head is {head}; run 'aiproxy db upgrade'"
    print(f"{redact(url)}: at revision {at or 'none (empty)'} ({state})")
    return 0 if at == head else 3


async def _rotate(config: Config, url: str) -> int:
    """Re-encrypt every tenant provider key under ``security.encryption_key``."""
    cipher = cipher_from(config.section("security"))
    if cipher is None:
        print("aiproxy: security.encryption_key (ENCRYPTION_KEY) is not set: nothing to rotate to",
              file=sys.stderr)
        return 2
    engine = create_engine(url)
    try:
        changed = await CredentialStore(engine, cipher).reencrypt()
    finally:
        await engine.dispose()
    print(f"{redact(url)}: {changed} provider key(s) re-encrypted under key {cipher.current_id}; "
          f"every stored key now opens with ENCRYPTION_KEY alone")
    return 0
