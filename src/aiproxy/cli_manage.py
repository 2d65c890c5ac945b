"""``aiproxy keys | tenants | users``: manage the database of ``--config`` directly.

The operator at the shell is the master: every tenant is in reach. Each command
brings the schema to head first (as ``aiproxy db upgrade`` does), prints what it did
(``--json`` for scripts) and exits 0; 1 when the database or the request fails (one
line on stderr, never a traceback), 2 on a bad argument. A key's plaintext is printed
once, by ``keys create`` and ``keys rotate``, and is not kept anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiproxy.config import Config
from aiproxy.storage.names import ROLES, TIERS

COMMANDS = ("keys", "tenants", "users")


def add_parsers(sub: Any) -> None:
    """Add the ``keys``, ``tenants`` and ``users`` subcommands to ``aiproxy``'s parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML file (its database.url is used)")
    common.add_argument("--url", help="override database.url")
    common.add_argument("--json", action="store_true", help="print JSON")

    keys = sub.add_parser("keys", help="virtual keys: create, list, revoke, rotate")
    kact = keys.add_subparsers(dest="action", required=True)
    create = kact.add_parser("create", parents=[common], help="a new key (printed once)")
    create.add_argument("--user", help="the user it belongs to (and so their tenant)")
    create.add_argument("--tenant", help="the tenant it belongs to")
    create.add_argument("--name")
    create.add_argument("--tier", choices=TIERS, default="free")
    create.add_argument("--role", choices=ROLES, default="member")
    create.add_argument("--models", help="comma-separated models it may use (default: all)")
    create.add_argument("--expires-in", help="e.g. 3600, 90m, 12h, 30d, 2w")
    create.add_argument("--monthly-limit", type=int, help="tokens per calendar month")
    klist = kact.add_parser("list", parents=[common], help="keys, newest last")
    klist.add_argument("--tenant")
    klist.add_argument("--user")
    klist.add_argument("--active", action="store_true", help="only keys that work now")
    for name, what in (("revoke", "stop a key now"), ("rotate", "a new secret for a key")):
        p = kact.add_parser(name, parents=[common], help=what)
        p.add_argument("id")
        if name == "rotate":
            p.add_argument("--grace", help="how long the old key keeps working (e.g. 1h; default 0)")

    tenants = sub.add_parser("tenants", help="tenants: create, list, delete")
    tact = tenants.add_subparsers(dest="action", required=True)
    tact.add_parser("create", parents=[common]).add_argument("name")
    tact.add_parser("list", parents=[common])
    tact.add_parser("delete", parents=[common], help="and all its users and keys").add_argument("id")

    users = sub.add_parser("users", help="users: create, list, delete")
    uact = users.add_subparsers(dest="action", required=True)
    ucreate = uact.add_parser("create", parents=[common])
    ucreate.add_argument("--tenant")
    ucreate.add_argument("--email")
    ucreate.add_argument("--name")
    ucreate.add_argument("--role", choices=ROLES, default="member")
    uact.add_parser("list", parents=[common]).add_argument("--tenant")
    uact.add_parser("delete", parents=[common], help="and their keys").add_argument("id")


def run(args: argparse.Namespace, config: Config) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from aiproxy.errors import ProxyError
    from aiproxy.storage.db import DatabaseError, redact
    from aiproxy.storage.keys import StoreError

    url = args.url or config.database_url
    if not url:
        print(f"aiproxy: {config.source} has no database.url (and no --url was given)", file=sys.stderr)
        return 2
    action: Callable[[Any], Awaitable[int]] = {
        ("keys", "create"): _keys_create, ("keys", "list"): _keys_list,
        ("keys", "revoke"): _keys_revoke, ("keys", "rotate"): _keys_rotate,
        ("tenants", "create"): _tenants_create, ("tenants", "list"): _tenants_list,
        ("tenants", "delete"): _tenants_delete, ("users", "create"): _users_create,
        ("users", "list"): _users_list, ("users", "delete"): _users_delete,
    }[(args.command, args.action)]
    try:
        return asyncio.run(_with_store(url, lambda store: action(_Ctx(args, config, store))))
    except ProxyError as exc:  # a bad argument, checked as the API checks it
        print(f"aiproxy: {exc.message}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"aiproxy: {exc}", file=sys.stderr)
        return 1
    except (DatabaseError, SQLAlchemyError, OSError, TimeoutError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        print(f"aiproxy: cannot use the database at {redact(url)}: "
              f"{detail[0] if detail else type(exc).__name__}", file=sys.stderr)
        return 1


class _Ctx:
    def __init__(self, args: argparse.Namespace, config: Config, store: Any) -> None:
        self.args, self.config, self.store = args, config, store

    def out(self, data: Any, text: str) -> int:
        print(json.dumps(data, indent=2, ensure_ascii=False) if self.args.json else text)
        return 0


async def _with_store(url: str, body: Callable[[Any], Awaitable[int]]) -> int:
    from aiproxy.storage import migrate
    from aiproxy.storage.db import create_engine
    from aiproxy.storage.keys import KeyStore

    engine = create_engine(url)
    try:
        await migrate.upgrade(engine)
        return await body(KeyStore(engine))
    finally:
        await engine.dispose()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_text(data: dict[str, Any], secret: str | None = None) -> str:
    lines = [f"key:    {secret}", "        (shown once: store it now; aiproxy keeps only its hash)"] \
        if secret else []
    lines += [f"id:     {data['id']}", f"prefix: {data['prefix']}",
              f"tenant: {data['tenant_id'] or '-'}   user: {data['user_id'] or '-'}   "
              f"tier: {data['tier']}   role: {data['role']}   status: {data['status']}"]
    if data["expires_at"]:
        lines.append(f"expires_at: {data['expires_at']}")
    return "\n".join(lines)


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


async def _keys_create(ctx: _Ctx) -> int:
    from aiproxy.builtin.manage.fields import bad, model_allowed, parse_duration

    a = ctx.args
    models = None
    if a.models is not None:
        models = [m.strip() for m in a.models.split(",") if m.strip()]
        configured = [m.name for m in ctx.config.models]
        for m in models:
            if not model_allowed(m, configured):
                raise bad("--models", f"no model {m!r} is configured in {ctx.config.source}")
    expires = None
    if a.expires_in is not None:
        delta = parse_duration(a.expires_in, "--expires-in")
        if not delta:
            raise bad("--expires-in", "must be more than 0")
        expires = _now() + delta
    if a.monthly_limit is not None and a.monthly_limit < 0:
        raise bad("--monthly-limit", "must be at least 0")
    secret, record = await ctx.store.create_key(
        user_id=a.user, tenant_id=a.tenant, name=a.name, tier=a.tier, role=a.role,
        allowed_models=models, monthly_limit_tokens=a.monthly_limit, expires_at=expires)
    data = {**record.to_dict(_now()), "key": secret}
    return ctx.out(data, _key_text(data, secret))


async def _keys_list(ctx: _Ctx) -> int:
    from aiproxy.storage.keys import ALL_TENANTS

    a = ctx.args
    records = await ctx.store.list_keys(tenant=a.tenant or ALL_TENANTS, user_id=a.user)
    data = [r.to_dict(_now()) for r in records]
    if a.active:  # a key rotated with a grace period is active until its revoked_at
        data = [d for d in data if d["status"] == "active"]
    rows = [[d["id"], d["prefix"], d["name"] or "-", d["tenant_id"] or "-", d["user_id"] or "-",
             d["tier"], d["role"], d["status"], d["expires_at"] or "-"] for d in data]
    return ctx.out(data, _table(rows, ["ID", "PREFIX", "NAME", "TENANT", "USER", "TIER", "ROLE",
                                       "STATUS", "EXPIRES"]))


async def _keys_revoke(ctx: _Ctx) -> int:
    from aiproxy.storage.keys import ALL_TENANTS

    record = await ctx.store.revoke_key(ctx.args.id, tenant=ALL_TENANTS)
    data = record.to_dict(_now())
    return ctx.out(data, f"revoked {data['id']} ({data['prefix']}) at {data['revoked_at']}")


async def _keys_rotate(ctx: _Ctx) -> int:
    from aiproxy.builtin.manage.fields import parse_duration
    from aiproxy.storage.keys import ALL_TENANTS

    grace = parse_duration(ctx.args.grace, "--grace") if ctx.args.grace else dt.timedelta(0)
    secret, record = await ctx.store.rotate_key(ctx.args.id, tenant=ALL_TENANTS, grace=grace)
    data = {**record.to_dict(_now()), "key": secret, "rotated_from": ctx.args.id}
    when = "now" if not grace else f"in {grace}"
    return ctx.out(data, f"{_key_text(data, secret)}\nthe old key {ctx.args.id} stops working {when}")


async def _tenants_create(ctx: _Ctx) -> int:
    data = (await ctx.store.create_tenant(ctx.args.name)).to_dict()
    return ctx.out(data, f"created tenant {data['id']} ({data['name']})")


async def _tenants_list(ctx: _Ctx) -> int:
    data = [t.to_dict() for t in await ctx.store.list_tenants()]
    return ctx.out(data, _table([[d["id"], d["name"], d["created_at"]] for d in data],
                                ["ID", "NAME", "CREATED"]))


async def _tenants_delete(ctx: _Ctx) -> int:
    from aiproxy.storage.keys import NotFound

    if not await ctx.store.delete_tenant(ctx.args.id):
        raise NotFound(f"no tenant {ctx.args.id!r}")
    return ctx.out({"id": ctx.args.id, "deleted": True},
                   f"deleted tenant {ctx.args.id} with its users and keys")


async def _users_create(ctx: _Ctx) -> int:
    a = ctx.args
    data = (await ctx.store.create_user(tenant_id=a.tenant, email=a.email, name=a.name,
                                        role=a.role)).to_dict()
    return ctx.out(data, f"created user {data['id']} ({data['email'] or data['name'] or 'no name'}) "
                         f"in tenant {data['tenant_id'] or '-'}, role {data['role']}")


async def _users_list(ctx: _Ctx) -> int:
    from aiproxy.storage.keys import ALL_TENANTS

    data = [u.to_dict() for u in await ctx.store.list_users(tenant=ctx.args.tenant or ALL_TENANTS)]
    rows = [[d["id"], d["tenant_id"] or "-", d["email"] or "-", d["name"] or "-", d["role"]] for d in data]
    return ctx.out(data, _table(rows, ["ID", "TENANT", "EMAIL", "NAME", "ROLE"]))


async def _users_delete(ctx: _Ctx) -> int:
    from aiproxy.storage.keys import ALL_TENANTS, NotFound

    if not await ctx.store.delete_user(ctx.args.id, tenant=ALL_TENANTS):
        raise NotFound(f"no user {ctx.args.id!r}")
    return ctx.out({"id": ctx.args.id, "deleted": True}, f"deleted user {ctx.args.id} and their keys")
