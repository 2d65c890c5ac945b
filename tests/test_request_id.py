"""Request ids the gateway makes: 24 hex digits, never repeated in a process, nor by a
forked child of it, nor when the counter wraps; a client's own sane id is kept."""

from __future__ import annotations

import os
import re

import pytest
from starlette.requests import Request

from aiproxy import gateway


def request(headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers or []})


def test_ids_are_24_hex_digits_and_unique() -> None:
    ids = [gateway.request_id(request()) for _ in range(20_000)]
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_clients_sane_id_is_kept_and_an_insane_one_replaced() -> None:
    assert gateway.request_id(request([(b"x-request-id", b"trace-42")])) == "trace-42"
    made = gateway.request_id(request([(b"x-request-id", b"x" * 129)]))
    assert re.fullmatch(r"[0-9a-f]{24}", made)


def test_a_wrapped_counter_starts_a_new_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    before = gateway.request_id(request())
    monkeypatch.setattr(gateway, "_ids", iter([0x1_0000_0000]))
    after = gateway.request_id(request())
    assert after[:16] != before[:16] and after.endswith("00000000")


def test_a_forked_child_makes_ids_its_parent_does_not() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        try:
            os.write(write, gateway.request_id(request()).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    mine = gateway.request_id(request())
    assert re.fullmatch(r"[0-9a-f]{24}", child) and child[:16] != mine[:16]
