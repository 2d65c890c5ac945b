"""Keys' token usage written back to ``api_keys.current_usage`` / ``usage_period`` in
batches, off the hot path (a periodic flush and one at shutdown), so a restarted
gateway continues a key's month from where it was.

What is written is an increment, not a total: ``current_usage`` grows by what this
process counted since the last flush when the row is in the same month, and starts
again from it when the month changed. Several replicas (or workers) flushing the same
key therefore add up instead of overwriting each other, and a late flush for a month
that is already over never overwrites the new month.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import BigInteger, String, Table, bindparam, case, or_, update

from aiproxy.storage.models import ApiKey

log = logging.getLogger("aiproxy.quotas")
_KEYS = ApiKey.__table__
assert isinstance(_KEYS, Table)
_PERIOD = bindparam("b_period", type_=String(7))
_DELTA = bindparam("b_delta", type_=BigInteger())
_ADD = (update(_KEYS)
        .where(_KEYS.c.id == bindparam("b_id", type_=String(40)))
        .where(or_(_KEYS.c.usage_period.is_(None), _KEYS.c.usage_period <= _PERIOD))
        .values(current_usage=case((_KEYS.c.usage_period == _PERIOD, _KEYS.c.current_usage + _DELTA),
                                   else_=_DELTA),
                usage_period=_PERIOD))


class UsageWriter:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.pending: dict[tuple[str, str], int] = {}  # (key id, "2026-11") → tokens not yet written

    def add(self, key_id: str, period: str, tokens: int) -> None:
        if tokens > 0:
            slot = (key_id, period)
            self.pending[slot] = self.pending.get(slot, 0) + tokens

    async def flush(self) -> None:
        """Write what was counted since the last flush, in one transaction."""
        if not self.pending:
            return
        batch, self.pending = self.pending, {}
        rows = [{"b_id": key_id, "b_period": period, "b_delta": tokens}
                for (key_id, period), tokens in sorted(batch.items(), key=lambda kv: kv[0][1])]
        try:
            async with self.engine.begin() as conn:
                await conn.execute(_ADD, rows)
        except Exception as exc:
            log.warning("quotas: could not write the usage of %d key(s) back (%s); kept for the "
                        "next flush", len(batch), type(exc).__name__)
            for slot, tokens in batch.items():
                self.pending[slot] = self.pending.get(slot, 0) + tokens
