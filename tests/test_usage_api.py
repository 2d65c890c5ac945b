"""``GET /api/ai/usage``: each tenant's admin sees its own rows and totals only, the
master sees all (or one tenant), members are refused; filters, pages and bad input."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers import error_of
from tests.manage_support import Api, Tenant, make_tenant, manage_app


@dataclass
class Logged:
    api: Api
    a: Tenant
    b: Tenant
    loose: str  # an admin key of no tenant


@pytest.fixture
async def logged(migrated_url: str) -> AsyncIterator[Logged]:
    async with manage_app(migrated_url) as api:
        a = await make_tenant(api, "acme")
        b = await make_tenant(api, "globex")
        loose = (await api.call("POST", "/keys", json={"role": "admin", "name": "ops"})).json()["key"]
        for _ in range(3):
            assert (await api.chat(a.member_key)).status_code == 200
        assert (await api.chat(a.member_key, model="no-such")).status_code >= 400
        for _ in range(2):
            assert (await api.chat(b.member_key)).status_code == 200
        await api.app.state.usage.flush()
        yield Logged(api, a, b, loose)


def _sum(rows: list[dict[str, Any]], name: str) -> int:
    return sum(row[name] for row in rows)


async def test_an_admin_sees_its_own_tenants_rows_and_totals_only(logged: Logged) -> None:
    api, a, b = logged.api, logged.a, logged.b
    r = await api.call("GET", "/usage", key=a.admin_key)
    assert r.status_code == 200, r.text
    body = r.json()
    rows = body["data"]
    assert len(rows) == 4 and {row["tenant_id"] for row in rows} == {a.id}
    assert {row["key_id"] for row in rows} == {a.member_key_id}
    assert rows[0]["model"] == "no-such"  # newest first
    total = body["totals"]["total"]
    assert total["requests"] == 4 and total["errors"] == 1
    assert total["total_tokens"] == _sum(rows, "total_tokens") > 0
    assert total["prompt_tokens"] == _sum(rows, "prompt_tokens")
    by_model = {m["model"]: m for m in body["totals"]["by_model"]}
    assert (by_model["mock-gpt"]["requests"], by_model["no-such"]["requests"]) == (3, 1)
    assert by_model["no-such"]["errors"] == 1 and by_model["no-such"]["total_tokens"] == 0
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert [(d["day"], d["requests"]) for d in body["totals"]["by_day"]] == [(today, 4)]
    for secret in (b.id, b.member_key_id, b.member_user, b.member_key):
        assert secret not in r.text
    theirs = (await api.call("GET", "/usage", key=b.admin_key)).json()
    assert {row["tenant_id"] for row in theirs["data"]} == {b.id}
    assert theirs["totals"]["total"]["requests"] == 2


async def test_the_master_sees_every_tenant_or_the_one_it_names(logged: Logged) -> None:
    api, a, b = logged.api, logged.a, logged.b
    everything = (await api.call("GET", "/usage")).json()
    assert {a.id, b.id} <= {row["tenant_id"] for row in everything["data"]}
    assert everything["totals"]["total"]["requests"] == 6
    only_b = (await api.call("GET", f"/usage?tenant_id={b.id}")).json()
    assert only_b["totals"]["total"]["requests"] == 2 and {r["tenant_id"] for r in only_b["data"]} == {b.id}


async def test_an_untenanted_admin_sees_no_tenants_rows_and_members_are_refused(logged: Logged) -> None:
    api, a = logged.api, logged.a
    loose = (await api.call("GET", "/usage", key=logged.loose)).json()
    assert loose["data"] == [] and loose["totals"]["total"]["requests"] == 0
    member = await api.call("GET", "/usage", key=a.member_key)
    assert member.status_code == 403 and error_of(member)["code"] == "insufficient_permissions"
    other = await api.call("GET", f"/usage?tenant_id={logged.b.id}", key=a.admin_key)
    assert other.status_code == 404 and error_of(other)["code"] == "not_found"
    assert (await api.call("GET", "/usage", key=None)).status_code == 401


async def test_filters_and_pages(logged: Logged) -> None:
    api, a = logged.api, logged.a
    errors = (await api.call("GET", "/usage?status=error", key=a.admin_key)).json()
    assert [row["model"] for row in errors["data"]] == ["no-such"] and errors["data"][0]["status"] >= 400
    ok = (await api.call("GET", "/usage?model=mock-gpt&status=ok", key=a.admin_key)).json()
    assert ok["totals"]["total"]["requests"] == 3
    first = (await api.call("GET", "/usage?limit=3", key=a.admin_key)).json()
    assert len(first["data"]) == 3 and first["has_more"] and first["next_offset"] == 3
    rest = (await api.call("GET", "/usage?limit=3&offset=3", key=a.admin_key)).json()
    assert len(rest["data"]) == 1 and not rest["has_more"] and rest["next_offset"] is None
    assert first["totals"] == rest["totals"]  # totals cover every matching row, not the page
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    future = (await api.call("GET", f"/usage?since={later.isoformat().replace('+00:00', 'Z')}",
                             key=a.admin_key)).json()
    assert future["data"] == [] and future["totals"]["total"]["requests"] == 0


@pytest.mark.parametrize(("query", "param"), [
    ("since=yesterday", "since"), ("until=2020-01-01T00:00:00", "until"), ("limit=0", "limit"),
    ("status=maybe", "status"), ("tenant=x", "tenant"),
    ("since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "until"),
])
async def test_bad_queries_are_400s_naming_the_parameter(logged: Logged, query: str, param: str) -> None:
    r = await logged.api.call("GET", f"/usage?{query}", key=logged.a.admin_key)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


async def test_until_alone_is_the_30_days_before_it(logged: Logged) -> None:
    """Before: since defaulted to 30 days before now whatever until said, so asking for a
    past month by its end (until=…) was a 400 'until must be after since' nobody sent."""
    api, a = logged.api, logged.a
    now = dt.datetime.now(dt.UTC)

    def at(when: dt.datetime) -> str:
        return when.isoformat().replace("+00:00", "Z")

    past = await api.call("GET", f"/usage?until={at(now - dt.timedelta(days=40))}", key=a.admin_key)
    assert past.status_code == 200, past.text
    assert past.json()["totals"]["total"]["requests"] == 0  # the 30 days before it: none of today's
    soon = await api.call("GET", f"/usage?until={at(now + dt.timedelta(days=1))}", key=a.admin_key)
    assert soon.json()["totals"]["total"]["requests"] == 4
    ahead = await api.call("GET", f"/usage?until={at(now + dt.timedelta(days=31))}", key=a.admin_key)
    assert ahead.json()["totals"]["total"]["requests"] == 0  # today is more than 30 days before it
    first_days = await api.call("GET", "/usage?until=0001-01-05T00:00:00Z", key=a.admin_key)
    assert first_days.status_code == 200, first_days.text  # not 30 days before year 1: an overflow
