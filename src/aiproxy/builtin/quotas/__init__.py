"""Quotas (monthly tokens) and budgets (USD per day or month), per key, user and tenant.

Limits, from the caller's Principal and the ``quotas:`` section:

- a virtual key's ``monthly_limit_tokens`` (set through the management API / KeyStore);
- its tier's plan allowance, ``quotas.plans.<tier>.monthly_tokens``, shared by the key's
  tenant (``per: tenant``, the default; a key of no tenant has its own), user or key;
- budgets: ``quotas.budgets.tiers.<tier>.{key,user,tenant}`` (defaults for everyone of
  that tier) and ``quotas.budgets.{keys,users,tenants}.<id>`` (explicit caps that
  replace the tier's for the periods they set), each ``daily_usd`` / ``monthly_usd``.

When a call arrives (before-call) its tokens are estimated (:mod:`aiproxy.tokens`: the
prompt plus the ``max_tokens`` it asks for, or ``quotas.completion_estimate``) and
*reserved*: a token quota refuses when ``used + estimate > limit`` (or ``used >= limit``),
so concurrent calls cannot all take the last of it. When the call ends (after-call,
and on-error: a failed or cut stream still used what it used) the reservation is
replaced by ``call.usage`` and ``call.cost`` is added to the budgets. A budget refuses
when ``spent >= cap``: a call that crosses it mid-stream finishes, the next is refused.
Refusals are 429 ``insufficient_quota`` (tokens) / ``budget_exceeded`` (USD), naming the
limit and when it resets (the next UTC day or month) with ``retry-after``.

Counters live in this process, or in Redis when ``redis.url`` is set (one Lua script
checks and reserves; counters expire a day after their period). A key's own month is
seeded from its stored ``current_usage`` and written back in batches
(:mod:`.writeback`). See README "Quotas and budgets".
"""

from __future__ import annotations

from aiproxy.builtin.quotas.stage import Quotas
from aiproxy.config import Config

__all__ = ["Quotas", "aiproxy_plugin"]


def aiproxy_plugin(config: Config) -> Quotas:
    return Quotas(config)
