"""The usage stage in process: one exact row per call, errors with their status and no
secret, batches written at shutdown, a full queue spooled (never blocking, never
dropping), a batch written twice still one row, and no database: off with one line."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.datastructures import Headers

from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.builtin.usage import rows as usage_rows
from aiproxy.builtin.usage.spool import Spool
from aiproxy.builtin.usage.writer import Writer, rejected
from aiproxy.call import Call
from aiproxy.errors import ProxyError
from aiproxy.plugins import PluginError
from aiproxy.storage.db import create_engine
from aiproxy.storage.keys import KeyStore
from tests.conftest import make_config
from tests.helpers import CHAT_URL, KEY, with_plugins
from tests.usage_support import MOCK_CHAT, count, rows, usage_config, wait_for

MASTER = "mk-usage-master-key-0123456789"
QUIET = {"flush_interval": 3600, "batch_size": 100_000}  # nothing written before shutdown


class FixedCost:
    """Stands in for the cost stage (it runs before the usage stage in after-call)."""

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        call.cost = 0.00042


async def test_a_call_is_one_row_with_every_field(gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    engine = create_engine(migrated_url)
    try:
        store = KeyStore(engine)
        tenant = await store.create_tenant("acme")
        user = await store.create_user(tenant_id=tenant.id, email="a@acme.test")
        secret, key = await store.create_key(user_id=user.id)
    finally:
        await engine.dispose()
    cfg = usage_config(migrated_url, tmp_path / "spool")
    async with gateway(cfg, plugin_manager=with_plugins(cfg, fixed_cost=FixedCost())) as (http, _):
        r = await http.post("/v1/chat/completions", json=MOCK_CHAT,
                            headers={"authorization": f"Bearer {secret}", "x-request-id": "req-fields-1"})
        assert r.status_code == 200, r.text
    (row,) = await rows(migrated_url)
    usage = r.json()["usage"]
    assert re.fullmatch(r"[0-9a-f]{32}", row["uid"])
    assert {k: row[k] for k in ("request_id", "provider", "model", "operation", "user_id", "tenant_id",
                                "key_id", "prompt_tokens", "completion_tokens", "total_tokens", "cost",
                                "currency", "cached", "status", "error")} == {
        "request_id": "req-fields-1", "provider": "mock", "model": "mock-gpt", "operation": "chat",
        "user_id": user.id, "tenant_id": tenant.id, "key_id": key.id,
        "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"], "cost": 0.00042, "currency": "USD", "cached": False,
        "status": 200, "error": None}
    assert usage["completion_tokens"] == 12  # the mock's default, so the comparison means something
    assert isinstance(row["latency_ms"], int) and row["latency_ms"] >= 0
    meta = row["metadata"]
    assert meta["deployment"] == r.headers["x-aiproxy-deployment"]
    assert [a["status"] for a in meta["attempts"]] == [200]
    assert meta["upstream_model"] == "mock-gpt"
    assert "usage_estimated" not in meta and "principal" not in meta  # a virtual key's call
    assert row["created_at"].tzinfo is not None


async def test_errors_are_logged_with_their_status_and_never_a_secret(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    cfg = usage_config(migrated_url, tmp_path / "spool", sections={"server": {"master_key": MASTER}})
    bogus = "sk-" + "x" * 43  # shaped like a virtual key, unknown
    async with gateway(cfg) as (http, upstream):
        upstream.post(CHAT_URL).respond(400, json={"error": {
            "message": f"Incorrect API key provided: {KEY}. Authorization: Bearer {KEY}",
            "type": "invalid_request_error"}})
        refused = await http.post("/v1/chat/completions", json={**MOCK_CHAT, "model": "gpt-test"},
                                  headers={"authorization": f"Bearer {MASTER}", "x-request-id": "up-1"})
        unknown = await http.post("/v1/chat/completions", json=MOCK_CHAT,
                                  headers={"authorization": f"Bearer {bogus}", "x-request-id": "auth-1"})
        missing = await http.post("/v1/chat/completions", json={**MOCK_CHAT, "model": "no-such"},
                                  headers={"authorization": f"Bearer {MASTER}", "x-request-id": "model-1"})
    assert (refused.status_code, unknown.status_code, missing.status_code) == (400, 401, 404)
    by_id = {row["request_id"]: row for row in await rows(migrated_url)}
    assert set(by_id) == {"up-1", "auth-1", "model-1"}
    assert by_id["up-1"]["status"] == 400 and by_id["up-1"]["provider"] == "openai"
    assert by_id["up-1"]["metadata"]["principal"] == "master" and by_id["up-1"]["key_id"] is None
    assert by_id["auth-1"]["status"] == 401 and by_id["auth-1"]["error"]
    assert by_id["auth-1"]["metadata"]["error_code"] == "invalid_api_key"
    assert by_id["model-1"]["status"] == 404 and "no-such" in by_id["model-1"]["error"]
    dump = repr(list(by_id.values()))
    for secret in (KEY, bogus, MASTER):
        assert secret not in dump


def test_error_messages_are_scrubbed_of_anything_shaped_like_a_key() -> None:
    message = ("upstream said: invalid key sk-proj-abcdefghijklmnop, Bearer abc.def-ghi_jkl, "
               "url ?key=AIzaSyA1234567890abcdefghijk&x=1 and api_key=hunter2hunter2")
    clean = usage_rows.scrub(message)
    for secret in ("sk-proj-abcdefghijklmnop", "abc.def-ghi_jkl", "AIzaSyA1234567890abcdefghijk",
                   "hunter2hunter2"):
        assert secret not in clean
    assert clean.startswith("upstream said: invalid key [redacted]")
    assert len(usage_rows.scrub("e" * 10_000)) == usage_rows.MAX_ERROR


async def test_rows_wait_in_memory_and_shutdown_writes_them_in_order(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    cfg = usage_config(migrated_url, tmp_path / "spool", **QUIET)
    async with gateway(cfg) as (http, _):
        for i in range(30):
            r = await http.post("/v1/chat/completions", json=MOCK_CHAT,
                                headers={"x-request-id": f"s-{i:03d}"})
            assert r.status_code == 200
        assert await count(migrated_url) == 0  # no database write on the response path
    written = await rows(migrated_url)
    assert [row["request_id"] for row in written] == [f"s-{i:03d}" for i in range(30)]
    assert not (tmp_path / "spool").exists()  # no spool was ever needed


async def test_a_full_queue_goes_to_the_spool_without_losing_or_reordering(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    cfg = usage_config(migrated_url, spool, max_queue=5, **QUIET)
    async with gateway(cfg) as (http, _):
        app_usage = None
        for i in range(23):
            r = await http.post("/v1/chat/completions", json=MOCK_CHAT,
                                headers={"x-request-id": f"q-{i:03d}"})
            assert r.status_code == 200
            app_usage = app_usage or http._transport.app.state.usage  # type: ignore[attr-defined]
        # 5 queued, the 6th finds the queue full: those 6 go to the spool; three times over
        spooled = [orjson.loads(line)["request_id"] for line in spool.read_bytes().splitlines()]
        assert spooled == [f"q-{i:03d}" for i in range(18)]
        assert [captured[1] for captured in app_usage.queue] == [f"q-{i:03d}" for i in range(18, 23)]
        stats = http._transport.app.state.plugin_manager.get_plugin("usage").aiproxy_stats()  # type: ignore[attr-defined]
        assert stats["aiproxy_usage_rows_spooled_total"] == 18
        assert stats["aiproxy_usage_queue_rows"] == 5
        assert stats["aiproxy_usage_rows_dropped_total"] == 0
    written = await rows(migrated_url)
    assert [row["request_id"] for row in written] == [f"q-{i:03d}" for i in range(23)]
    assert not spool.exists()  # replayed, then deleted


def _row(i: int) -> dict[str, Any]:
    return usage_rows.from_spool({"uid": f"{i:032x}", "request_id": f"w-{i:03d}", "model": "m",
                                  "operation": "chat", "status": 200, "total_tokens": i})


async def test_a_batch_written_twice_is_still_one_row_per_call(migrated_url: str, tmp_path: Path,
                                                               gateway: Any) -> None:
    """A commit whose acknowledgement was lost gets spooled and replayed: no duplicate."""
    engine = create_engine(migrated_url)
    try:
        writer = Writer(engine, timeout=10)
        await writer.write([_row(i) for i in range(10)])
        await writer.write([_row(i) for i in range(5, 15)])  # half of it is in already
    finally:
        await engine.dispose()
    assert [row["request_id"] for row in await rows(migrated_url)] == [f"w-{i:03d}" for i in range(15)]
    # the same rows again, from a spool left by a process that never heard back
    spool = tmp_path / "spool"
    spool.write_bytes(b"".join(orjson.dumps(_row(i)) + b"\n" for i in range(10, 20)))
    async with gateway(usage_config(migrated_url, spool)) as (http, _):
        r = await http.post("/v1/chat/completions", json=MOCK_CHAT, headers={"x-request-id": "after"})
        assert r.status_code == 200
    written = [row["request_id"] for row in await rows(migrated_url)]
    assert written == [f"w-{i:03d}" for i in range(20)] + ["after"]
    assert [row["total_tokens"] for row in (await rows(migrated_url))[:20]] == list(range(20))


async def test_without_a_database_the_stage_is_off_with_one_line(gateway: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiproxy.usage")
    async with gateway(make_config()) as (http, _):
        r = await http.post("/v1/chat/completions", json=MOCK_CHAT)
        assert r.status_code == 200
        assert not hasattr(http._transport.app.state, "usage")  # type: ignore[attr-defined]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "aiproxy.usage"]
    assert lines == ["usage logs are off: no database is configured (database.url)"]


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("batch_size", "lots", "usage.batch_size: expected a number"),
    ("flush_interval", 0, "usage.flush_interval: must be at least"),
    ("max_queue", -1, "usage.max_queue: must be at least 1"),
    ("spool_path", 12, "usage.spool_path: expected a file path"),
])
def test_bad_settings_stop_start_up_naming_them(setting: str, value: Any, says: str) -> None:
    with pytest.raises(PluginError, match=re.escape(says)):
        create_app(make_config(usage={setting: value}))


async def test_an_unwritable_spool_path_stops_start_up(gateway: Any, migrated_url: str,
                                                      tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"usage\.spool_path: cannot"):
        async with gateway(usage_config(migrated_url, blocker / "spool")):
            pass


async def test_spools_left_by_several_workers_are_all_replayed_and_a_torn_line_is_skipped(
        gateway: Any, migrated_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool"
    held = Spool(spool)
    held.append([_row(0)])  # a live worker holds the first slot...
    other = Spool(spool)
    other.append([_row(1)])  # ...so a second one writes the next
    assert (held.path, other.path) == (spool, tmp_path / "spool.1")
    other.close()
    with (tmp_path / "spool.1").open("ab") as file:  # then dies in the middle of a write
        file.write(orjson.dumps(_row(2))[:25])
    later = Spool(spool)  # the next worker takes that slot and ends the torn line first
    later.append([_row(3)])
    assert later.path == tmp_path / "spool.1"
    later.close()
    held.close()
    async with gateway(usage_config(migrated_url, spool)) as _:
        await wait_for(lambda: _count_at_least(migrated_url, 3), what="both spools replayed")
    assert sorted(row["request_id"] for row in await rows(migrated_url)) == ["w-000", "w-001", "w-003"]
    assert not spool.exists() and not (tmp_path / "spool.1").exists()
    assert any("skipped a torn line" in rec.getMessage() for rec in caplog.records)


async def _count_at_least(url: str, n: int) -> bool:
    return await count(url) >= n


async def test_a_nul_from_a_client_is_stripped_not_a_batch_stuck_for_ever(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    """PostgreSQL refuses NUL in text; a client could otherwise halt the usage log."""
    async with gateway(usage_config(migrated_url, tmp_path / "spool", **QUIET)) as (http, _):
        usage = http._transport.app.state.usage  # type: ignore[attr-defined]
        bad_model = await http.post("/v1/chat/completions", json={**MOCK_CHAT, "model": "no\x00such"},
                                    headers={"x-request-id": "nul-1"})
        assert bad_model.status_code == 404
        ok = await http.post("/v1/chat/completions", headers={"x-request-id": "nul-2"}, json={
            **MOCK_CHAT, "messages": [{"role": "user", "content": "a\x00b"}]})
        assert ok.status_code == 200
        (await http.post("/v1/chat/completions", json=MOCK_CHAT, headers={"x-request-id": "nul-3"}))
        await usage.flush()
        assert usage.counts["write_errors"] == 0 and usage.counts["written"] == 3
    by_id = {row["request_id"]: row for row in await rows(migrated_url)}
    assert set(by_id) == {"nul-1", "nul-2", "nul-3"}
    assert by_id["nul-1"]["model"] == "nosuch" and "\x00" not in by_id["nul-1"]["error"]


class _Orig(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("error", "refused"), [
    (DBAPIError("INSERT", {}, _Orig("22021")), True),      # bad data: write row by row
    (DBAPIError("INSERT", {}, _Orig("23505")), True),      # integrity
    (DBAPIError("INSERT", {}, _Orig("08006")), False),     # connection failure: spool and retry
    (OperationalError("INSERT", {}, Exception("database is locked")), False),
    (ConnectionRefusedError(), False),
    (TimeoutError(), False),
])
def test_only_errors_about_the_rows_themselves_count_as_refused(error: BaseException, refused: bool) -> None:
    assert rejected(error) is refused


@pytest.mark.parametrize(("settings", "says"), [
    ({"flush_intervall": 5}, "usage.flush_intervall: unknown setting"),  # a typo is not ignored
    ({"enabled": "ture"}, "usage.enabled: expected true or false"),  # nor taken as "off"
    ({"fsync": "yes please"}, "usage.fsync: expected true or false"),
    ({"write_timeout": "inf"}, "usage.write_timeout: expected a finite number"),
    ({"batch_size": float("nan")}, "usage.batch_size: expected a finite number"),
    ({"max_queue": 2.5}, "usage.max_queue: expected a whole number"),
])
def test_a_misspelt_or_unusable_setting_stops_start_up_naming_it(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(PluginError, match=re.escape(says)):
        create_app(make_config(usage=settings))


@pytest.mark.parametrize(("value", "enabled"), [(True, True), ("True", True), ("on", True),
                                                (False, False), ("False", False), ("no", False)])
def test_enabled_reads_as_yaml_and_the_environment_write_it(value: Any, enabled: bool) -> None:
    from aiproxy.builtin.usage import UsageLogs

    assert UsageLogs(make_config(usage={"enabled": value})).enabled is enabled


def test_a_rows_metadata_has_the_prompt_cache_reads_and_writes() -> None:
    from aiproxy.call import Usage

    call = Call(request_id="r", operation="chat", body={}, model="claude", stream=False, headers=Headers())
    call.usage = Usage(1210, 3, 1213, 1000, 200)
    meta = usage_rows.from_call(call, None)["meta"]
    assert (meta["cached_tokens"], meta["cache_write_tokens"]) == (1000, 200)
    call.usage = Usage(10, 3, 13)
    assert not {"cached_tokens", "cache_write_tokens"} & set(usage_rows.from_call(call, None)["meta"])


class OddMetadata:
    """A plugin's metadata JSON has no spelling for as it is: a dict keyed by numbers."""

    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        call.metadata["by_choice"] = {0: "first", 1: "second"}


async def test_rows_json_cannot_spell_as_they_are_still_reach_the_spool_and_the_table(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    """Before: the spool's JSON raised TypeError on them, on the response path when the
    queue was full (the call's row and every later one lost, the metrics stage skipped)."""
    spool = tmp_path / "spool"
    cfg = usage_config(migrated_url, spool, max_queue=2, **QUIET)
    async with gateway(cfg, plugin_manager=with_plugins(cfg, odd=OddMetadata())) as (http, upstream):
        upstream.post(CHAT_URL).respond(200, json={  # an upstream past 64 bits: the total is 2**65 - 2
            "id": "c", "object": "chat.completion", "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2**64 - 1, "completion_tokens": 2**64 - 1}})
        for i in range(7):
            model = "gpt-test" if i == 3 else "mock-gpt"
            r = await http.post("/v1/chat/completions", json={**MOCK_CHAT, "model": model},
                                headers={"x-request-id": f"odd-{i}"})
            assert r.status_code == 200, r.text
        usage = http._transport.app.state.usage  # type: ignore[attr-defined]
        assert usage.counts["spooled"] == 6 and usage.counts["dropped"] == 0
    written = await rows(migrated_url)
    assert [row["request_id"] for row in written] == [f"odd-{i}" for i in range(7)]
    assert written[0]["metadata"]["by_choice"] == {"0": "first", "1": "second"}
    assert written[3]["total_tokens"] == 2**31 - 1  # as far as the column goes


def test_a_spool_another_worker_deletes_while_this_one_looks_is_passed_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between seeing a file (exists) and sizing it (stat), the worker replaying it may
    finish and delete it: at start-up that raised FileNotFoundError and the worker died."""
    spool = Spool(tmp_path / "spool")
    gone = tmp_path / "spool.1"  # seen by exists(), deleted before stat()
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, **kw: self == gone or real_exists(self, **kw))
    assert spool.adopt() is False
    spool.append([_row(1)])  # and the spool still works
    assert spool.path == tmp_path / "spool" and spool.pending()
    spool.close()


async def test_a_spooled_row_with_a_bad_time_does_not_halt_the_replay(
        gateway: Any, migrated_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: fromisoformat raised in every replay, so neither that row nor any after it
    (the spool, then every new call, as the queue overflowed into it) was ever written."""
    spool = tmp_path / "spool"
    odd = {**_row(1), "created_at": "yesterday-ish"}
    spool.write_bytes(b"".join(orjson.dumps(row, default=str) + b"\n" for row in (_row(0), odd, _row(2))))
    async with gateway(usage_config(migrated_url, spool, flush_interval=0.02)) as (http, _):
        await wait_for(lambda: _count_at_least(migrated_url, 3), within=10, what="the spool replayed")
        r = await http.post("/v1/chat/completions", json=MOCK_CHAT, headers={"x-request-id": "next"})
        assert r.status_code == 200
    written = await rows(migrated_url)
    assert [row["request_id"] for row in written] == ["w-000", "w-001", "w-002", "next"]
    assert written[1]["metadata"]["spooled_created_at"] == "yesterday-ish"  # kept, not guessed at
    assert any("w-001" in rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING)


async def test_a_call_that_ends_after_shutdown_is_spooled_for_the_next_start(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    """serve cancels streams still running 30 s into a shutdown, and the lifespan shutdown
    goes on meanwhile: a stream's after-call can come after the usage stage stopped. That
    row was counted dropped and lost; it goes to the spool, which the next start replays."""
    spool = tmp_path / "spool"
    cfg = usage_config(migrated_url, spool, **QUIET)
    async with gateway(cfg) as (http, _):
        plugin = http._transport.app.state.plugin_manager.get_plugin("usage")  # type: ignore[attr-defined]
        r = await http.post("/v1/chat/completions", json=MOCK_CHAT, headers={"x-request-id": "before"})
        assert r.status_code == 200
    late = Call(request_id="late-stream", operation="chat", body={}, model="mock-gpt", stream=True,
                headers=Headers())
    plugin.aiproxy_after_call(late)
    plugin.aiproxy_on_error(late, ProxyError(502, "upstream went away"))
    assert plugin.flusher.counts["dropped"] == 0
    assert await count(migrated_url) == 1
    async with gateway(usage_config(migrated_url, spool)) as _:
        await wait_for(lambda: _count_at_least(migrated_url, 3), within=10, what="the late rows")
    written = await rows(migrated_url)
    assert [(row["request_id"], row["status"]) for row in written] == [
        ("before", 200), ("late-stream", 200), ("late-stream", 502)]
    assert not spool.exists()


def test_the_default_spool_is_in_the_working_folder_not_beside_the_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image runs as an unprivileged user in /var/lib/aiproxy, its config in the
    root-owned /etc/aiproxy (or a read-only mount): a spool beside the config could not be
    written, so with PostgreSQL the gateway refused to start."""
    from aiproxy.builtin.usage import UsageLogs
    from aiproxy.config import load_config

    etc, work = tmp_path / "etc", tmp_path / "work"
    etc.mkdir()
    work.mkdir()
    (etc / "config.yaml").write_text("database:\n  url: postgresql+asyncpg://u@db.invalid/aiproxy\n")
    monkeypatch.chdir(work)
    assert UsageLogs(load_config(etc / "config.yaml")).spool_path == work / "aiproxy-usage.spool"
    # a relative setting is still the config folder's, a SQLite database's spool beside it
    (etc / "config.yaml").write_text("database:\n  url: postgresql+asyncpg://u@db.invalid/aiproxy\n"
                                     "usage:\n  spool_path: spool/usage\n")
    assert UsageLogs(load_config(etc / "config.yaml")).spool_path == etc / "spool" / "usage"
    (etc / "config.yaml").write_text(f"database:\n  url: sqlite+aiosqlite:///{tmp_path}/data/a.db\n")
    assert UsageLogs(load_config(etc / "config.yaml")).spool_path == tmp_path / "data" / "a.db.usage-spool"


async def test_the_real_cost_and_cache_stages_price_the_row(gateway: Any, migrated_url: str,
                                                           tmp_path: Path) -> None:
    """The stages as shipped, in their order: the cost stage prices a call before the usage
    stage takes its row, and a cache hit is a cached row costing 0."""
    cfg = make_config(database={"url": migrated_url}, usage={"spool_path": str(tmp_path / "spool")},
                      plugins={"dir": None}, cost={"free_providers": []},
                      models=[{"name": "mock-*", "provider": "mock", "price": {"input": 1, "output": 2}}])
    async with gateway(cfg) as (http, _):
        said = []
        for i in range(2):  # temperature 0: the second is a cache hit
            r = await http.post("/v1/chat/completions", json={**MOCK_CHAT, "temperature": 0},
                                headers={"x-request-id": f"priced-{i}"})
            assert r.status_code == 200
            said.append((r.headers["x-aiproxy-cache"], r.headers["x-aiproxy-cost"]))
        usage = r.json()["usage"]
    first, hit = await rows(migrated_url)
    expected = (usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2) / 1e6
    assert said[0][0] == "miss" and said[1] == ("hit", "0")
    assert (first["request_id"], first["cached"]) == ("priced-0", False)
    assert first["cost"] == pytest.approx(expected) and float(said[0][1]) == pytest.approx(expected)
    assert (hit["request_id"], hit["cached"], hit["cost"]) == ("priced-1", True, 0.0)
    assert hit["metadata"]["cost_saved"] == pytest.approx(expected)


def test_uids_follow_the_rows_time_and_stay_unique() -> None:
    earlier, later = usage_rows.new_uid(1_700_000_000.001), usage_rows.new_uid(1_700_000_000.002)
    assert re.fullmatch(r"[0-9a-f]{32}", earlier) and earlier < later  # appended to the uid index
    assert len({usage_rows.new_uid(1_700_000_000.5) for _ in range(10_000)}) == 10_000


async def test_a_written_row_reads_back_as_it_was_given(engine: Any, migrated_url: str) -> None:
    import datetime as dt

    when = dt.datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    row = {**usage_rows.COLUMNS, "uid": usage_rows.new_uid(when.timestamp()), "created_at": when,
           "request_id": "r-\u00e9", "operation": "chat", "prompt_tokens": 3, "total_tokens": 3,
           "cost": 1.25e-7, "cached": True, "status": 200,
           "meta": {"nested": {"list": [1, 2.5, None, "\u2603"]}, 7: "numeric key"}}
    await Writer(engine, timeout=5).write([row])
    (back,) = await rows(migrated_url)
    assert back["created_at"] == when  # the same instant, read back as UTC
    assert back["created_at"].tzinfo is not None
    assert back["metadata"] == {"nested": {"list": [1, 2.5, None, "\u2603"]}, "7": "numeric key"}
    assert (back["request_id"], back["cost"], back["cached"], back["prompt_tokens"]) == \
        ("r-\u00e9", 1.25e-7, True, 3)
