"""Which limits apply to a caller: the key's monthly tokens, its tier's plan, budgets."""

from __future__ import annotations

from dataclasses import dataclass

from aiproxy.builtin.quotas.settings import Caps, QuotaSettings
from aiproxy.call import Principal


@dataclass(frozen=True, slots=True)
class TokenRule:
    """A monthly token limit on one counter (``tok:<scope>:<ident>:<month>``)."""

    scope: str  # key, user, tenant
    ident: str
    limit: int
    label: str  # "the monthly token limit of key key_1"
    own_key: bool  # the calling key's own counter: seeded from its stored current_usage


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """A spend cap in USD on one counter (``usd:<scope>:<ident>:<day or month>``)."""

    scope: str
    ident: str
    daily: bool
    cap: float
    label: str  # "the daily budget of user usr_1"


@dataclass(frozen=True, slots=True)
class Rules:
    tokens: tuple[TokenRule, ...] = ()
    budgets: tuple[BudgetRule, ...] = ()


NONE = Rules()


def rules_for(settings: QuotaSettings, p: Principal) -> Rules:
    """Every limit that applies to ``p``; two on one counter keep the smaller."""
    by_counter: dict[tuple[str, str], TokenRule] = {}

    def keep(rule: TokenRule) -> None:
        held = by_counter.get((rule.scope, rule.ident))
        if held is None or rule.limit < held.limit:
            by_counter[(rule.scope, rule.ident)] = rule

    is_key = p.kind == "key"
    limit = p.metadata.get("monthly_limit_tokens") if is_key else None
    if type(limit) is int and limit >= 0:
        keep(TokenRule("key", p.id, limit, f"the monthly token limit of key {p.id}", True))
    plan = settings.plans.get(p.tier) if p.tier else None
    if plan is not None:
        scope, ident = plan.per, _ident(p, plan.per)
        if ident is None:  # a plan shared per tenant, for a key of no tenant: the key's own
            scope, ident = "key", p.id
        keep(TokenRule(scope, ident, plan.monthly_tokens,
                       f"the {p.tier} plan's monthly token allowance for {scope} {ident}",
                       is_key and scope == "key"))
    budgets: list[BudgetRule] = []
    for scope in ("key", "user", "tenant"):
        ident = _ident(p, scope)
        if ident is None:
            continue
        caps: Caps | None = settings.budgets.get(scope, {}).get(ident)
        base = settings.tier_budgets.get(p.tier, {}).get(scope) if p.tier else None
        merged = caps.over(base) if caps is not None else base
        if merged is None:
            continue
        if merged.daily is not None:
            budgets.append(BudgetRule(scope, ident, True, merged.daily,
                                      f"the daily budget of {scope} {ident}"))
        if merged.monthly is not None:
            budgets.append(BudgetRule(scope, ident, False, merged.monthly,
                                      f"the monthly budget of {scope} {ident}"))
    if not by_counter and not budgets:
        return NONE
    return Rules(tuple(by_counter.values()), tuple(budgets))


def _ident(p: Principal, scope: str) -> str | None:
    return p.id if scope == "key" else p.user if scope == "user" else p.tenant
