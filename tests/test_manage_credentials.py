"""A tenant's own provider keys (BYOK) through ``/api/ai/providers/{name}/credentials``:
stored encrypted, shown only as a fingerprint, kept to their tenant, used for its calls only."""

from __future__ import annotations

import httpx
import pytest
import respx
from sqlalchemy import select

from aiproxy.storage.models import ProviderCredential
from tests.conftest import OPENAI_BASE
from tests.helpers import KEY as SHARED_KEY
from tests.helpers import error_of
from tests.manage_support import Api, make_tenant, manage_app, manage_config

OWN_KEY = "sk-tenant-own-openai-key-AAAA1234"
PATH = "/providers/openai/credentials"
REPLY = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                      "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@pytest.fixture
async def api(migrated_url: str):  # type: ignore[no-untyped-def]
    upstream = respx.MockRouter(assert_all_called=False, using=None)
    upstream.post(f"{OPENAI_BASE}/chat/completions").respond(json=REPLY)
    async with manage_app(migrated_url, transport=httpx.MockTransport(upstream.async_handler)) as a:
        a.upstream = upstream  # type: ignore[attr-defined]
        yield a


def _keys_sent(api: Api) -> list[str]:
    return [c.request.headers["authorization"] for c in api.upstream.calls]  # type: ignore[attr-defined]


async def test_an_admin_stores_reads_and_deletes_its_tenants_key(api: Api) -> None:
    a = await make_tenant(api, "acme")
    r = await api.call("PUT", PATH, key=a.admin_key, json={"api_key": OWN_KEY})
    assert r.status_code == 200, r.text
    entry = r.json()
    assert (entry["tenant_id"], entry["provider"], entry["fingerprint"]) == (a.id, "openai", "…1234")
    assert OWN_KEY not in r.text
    got = await api.call("GET", PATH, key=a.admin_key)
    assert got.status_code == 200 and got.json()["fingerprint"] == "…1234" and OWN_KEY not in got.text
    listed = {p["name"]: p for p in (await api.call("GET", "/providers", key=a.admin_key)).json()["data"]}
    assert listed["openai"]["credential"]["fingerprint"] == "…1234"
    assert listed["mock"]["credential"] is None
    async with api.store.sessions() as s:  # in the database: ciphertext only
        row = (await s.scalars(select(ProviderCredential))).one()
    assert OWN_KEY not in row.ciphertext and row.ciphertext.startswith("v1:")
    assert (await api.call("DELETE", PATH, key=a.admin_key)).status_code == 200
    assert (await api.call("GET", PATH, key=a.admin_key)).status_code == 404
    assert (await api.call("DELETE", PATH, key=a.admin_key)).status_code == 404


async def test_the_tenants_calls_use_its_own_key_and_no_one_elses(api: Api) -> None:
    a, b = await make_tenant(api, "acme"), await make_tenant(api, "globex")
    for t in (a, b):  # let the members use gpt-test too
        await api.call("PATCH", f"/keys/{t.member_key_id}", json={"allowed_models": ["gpt-test"]})
    await api.call("PUT", PATH, key=b.admin_key, json={"api_key": OWN_KEY})
    assert (await api.chat(b.member_key, model="gpt-test")).status_code == 200
    assert (await api.chat(a.member_key, model="gpt-test")).status_code == 200
    assert _keys_sent(api) == [f"Bearer {OWN_KEY}", f"Bearer {SHARED_KEY}"]
    await api.call("DELETE", PATH, key=b.admin_key)
    assert (await api.chat(b.member_key, model="gpt-test")).status_code == 200
    assert _keys_sent(api)[-1] == f"Bearer {SHARED_KEY}"  # its own key is gone at once


async def test_the_master_key_names_the_tenant(api: Api) -> None:
    a = await make_tenant(api, "acme")
    r = await api.call("PUT", PATH, json={"api_key": OWN_KEY})
    assert r.status_code == 400 and error_of(r)["param"] == "tenant_id"
    assert (await api.call("PUT", PATH, json={"api_key": OWN_KEY, "tenant_id": a.id})).status_code == 200
    assert (await api.call("GET", f"{PATH}?tenant_id={a.id}")).json()["fingerprint"] == "…1234"
    r = await api.call("PUT", PATH, json={"api_key": OWN_KEY, "tenant_id": "ten_nope"})
    assert r.status_code == 404


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/providers/nope/credentials", {"api_key": OWN_KEY}, 404, None),
    (PATH, {}, 400, "api_key"),
    (PATH, {"api_key": ""}, 400, "api_key"),
    (PATH, {"api_key": 12345}, 400, "api_key"),
    (PATH, {"api_key": OWN_KEY, "extra": 1}, 400, "extra"),
])
async def test_bad_credential_requests(api: Api, path: str, body: dict[str, object], status: int,
                                       param: str | None) -> None:
    a = await make_tenant(api, "acme")
    r = await api.call("PUT", path, key=a.admin_key, json=body)
    assert r.status_code == status, r.text
    assert error_of(r)["param"] == param
    assert OWN_KEY not in r.text


async def test_without_an_encryption_key_nothing_is_stored(migrated_url: str) -> None:
    config = manage_config(migrated_url, security={})
    async with manage_app(migrated_url, config) as api:
        a = await make_tenant(api, "acme")
        r = await api.call("PUT", PATH, key=a.admin_key, json={"api_key": OWN_KEY})
        assert r.status_code == 503 and error_of(r)["code"] == "encryption_not_configured"
        assert OWN_KEY not in r.text
        async with api.store.sessions() as s:
            assert list(await s.scalars(select(ProviderCredential))) == []
