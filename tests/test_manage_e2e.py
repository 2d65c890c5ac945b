"""The management API of a started ``aiproxy serve``, and the CLI run as a subprocess on
the same database, with the real ``openai`` SDK using the keys they make; on SQLite and
(with AIPROXY_TEST_DATABASE_URL) PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import started_proxy

MASTER = "mk-manage-e2e-master-0123456789"


@dataclass
class Served:
    url: str
    config: Path
    log: Path

    def api(self, method: str, path: str, key: str = MASTER, **kwargs: Any) -> httpx.Response:
        with httpx.Client(base_url=f"{self.url}/api/ai", trust_env=False, timeout=10) as http:
            return http.request(method, path, headers={"authorization": f"Bearer {key}"}, **kwargs)

    def chat(self, key: str, model: str = "mock-gpt") -> str:
        with openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=15) as client:
            done = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        return done.choices[0].message.content or ""

    def refused(self, key: str, model: str = "mock-gpt") -> openai.APIStatusError:
        with openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=15) as client, \
                pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        return info.value

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIPROXY_")}
        return subprocess.run([sys.executable, "-m", "aiproxy", *args, "--config", str(self.config)],
                              capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[Served]:
    config = {
        "server": {"master_key": MASTER},
        "plugins": {"dir": None},
        "database": {"url": db_url},
        # every call asks the database, so a change the CLI makes (another process) shows at once
        "keys": {"required": True, "cache_ttl": 0, "flush_interval": 3600},
        "providers": {"mock": {"plugin": "mock"}},
        "models": [{"name": "mock-*", "provider": "mock"}],
    }
    with started_proxy(config, tmp_path, log_name="serve.log", stop_timeout=15) as started:
        yield Served(started.url, started.config, started.log)


def test_keys_made_through_the_api_work_with_the_sdk_until_rotated_or_revoked(served: Served) -> None:
    tenant = served.api("POST", "/tenants", json={"name": "acme"}).json()
    user = served.api("POST", "/users", json={"tenant_id": tenant["id"], "email": "a@acme.test",
                                              "role": "admin"}).json()
    made = served.api("POST", "/keys", json={"user_id": user["id"], "role": "admin", "tier": "pro",
                                             "allowed_models": ["mock-gpt"], "expires_in": "30d"})
    assert made.status_code == 201, made.text
    first = made.json()["key"]
    assert served.chat(first)
    refused = served.refused(first, model="mock-other")
    assert refused.status_code == 403 and "mock-other" in refused.message

    me = served.api("GET", "/keys/self", key=first)  # the key manages its own tenant now
    assert me.status_code == 200 and me.json()["tenant_id"] == tenant["id"]
    other = served.api("POST", "/tenants", json={"name": "globex"}).json()
    assert served.api("GET", f"/tenants/{other['id']}", key=first).status_code == 404
    assert [t["id"] for t in served.api("GET", "/tenants", key=first).json()["data"]] == [tenant["id"]]

    rotated = served.api("POST", f"/keys/{made.json()['id']}/rotate")
    assert rotated.status_code == 201
    second = rotated.json()["key"]
    assert served.refused(first).status_code == 401
    assert served.chat(second)
    assert served.api("DELETE", f"/keys/{rotated.json()['id']}").json()["status"] == "revoked"
    error = served.refused(second)
    assert error.status_code == 401 and "revoked" in error.message
    assert served.api("GET", "/keys", key=second).status_code == 401
    assert first not in served.log.read_text() and second not in served.log.read_text()


def test_the_cli_and_the_api_share_one_database(served: Served) -> None:
    made = served.cli("tenants", "create", "initech", "--json")
    assert made.returncode == 0, made.stderr
    tenant = json.loads(made.stdout)["id"]
    user = served.cli("users", "create", "--tenant", tenant, "--email", "p@initech.test", "--json")
    user_id = json.loads(user.stdout)["id"]
    key = served.cli("keys", "create", "--user", user_id, "--tier", "starter", "--models", "mock-gpt",
                     "--expires-in", "7d", "--monthly-limit", "100000", "--name", "from-cli")
    assert key.returncode == 0, key.stderr
    secret = next(line.split()[1] for line in key.stdout.splitlines() if line.startswith("key:"))
    key_id = next(line.split()[1] for line in key.stdout.splitlines() if line.startswith("id:"))
    assert "shown once" in key.stdout

    assert served.chat(secret)  # the server takes the CLI's key
    seen = served.api("GET", f"/keys/{key_id}").json()  # and the API shows it, without the secret
    assert (seen["tenant_id"], seen["user_id"], seen["tier"], seen["monthly_limit_tokens"]) == \
        (tenant, user_id, "starter", 100000)
    assert secret not in json.dumps(seen)

    api_key = served.api("POST", "/keys", json={"user_id": user_id, "name": "from-api"}).json()
    listed = served.cli("keys", "list", "--tenant", tenant, "--json")
    assert {k["name"] for k in json.loads(listed.stdout)} == {"from-cli", "from-api"}
    assert secret not in listed.stdout and api_key["key"] not in listed.stdout
    rotated = served.cli("keys", "rotate", key_id, "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = json.loads(rotated.stdout)["key"]
    assert served.refused(secret).status_code == 401  # another process changed it: seen at once
    assert served.chat(new_secret)
    revoked = served.cli("keys", "revoke", json.loads(rotated.stdout)["id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert served.refused(new_secret).status_code == 401

