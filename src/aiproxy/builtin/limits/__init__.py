"""The rate-limit stage: requests per window and tokens per minute, per key, user,
tenant and model (GCRA, see :mod:`.gcra`; settings in :mod:`.settings`).

Before-call takes one request (and the call's estimated tokens: prompt plus its max
output) from every limit the call touches, all or nothing, and writes OpenAI's
``x-ratelimit-*`` headers of the tightest ones; a refusal is a 429 naming the limit,
with ``retry-after``. After-call (and on-error) settles the token estimate with the
upstream's real usage. In process by default; with ``redis.url`` the counters live in
Redis (one atomic script per call, :mod:`.redis_store`), and if Redis goes away,
``limits.on_backend_error`` says whether calls go through unchecked (``open``, the
default) or get 503 (``closed``) until it is back.

The master key is never limited; callers with no key (``keys.required: false``, which
only a loopback-bound gateway allows) get ``limits.anonymous_tier`` (default: none).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from aiproxy import hookimpl, tokens
from aiproxy.builtin.limits.gcra import Clock, LocalStore, Rule, Verdict, duration, headers
from aiproxy.builtin.limits.redis_store import RedisStore
from aiproxy.builtin.limits.settings import OVERRIDE, Rate, key_override, parse_settings
from aiproxy.call import Call, Principal
from aiproxy.config import Config, ConfigError
from aiproxy.errors import ProxyError

log = logging.getLogger("aiproxy.limits")
STATE = "limits"  # call.state key of a call's token reservation
REMIND_EVERY = 60.0  # seconds between "still unreachable" log lines
MAX_MADE = 50_000  # counters whose fixed parts are kept between calls
_Made = tuple[Rule | None, str, str]  # a counter's request rule, token counter key, label


@dataclass(slots=True)
class Held:
    """Tokens a call reserved in before-call, to settle when its real usage is known."""

    rules: list[Rule]
    estimate: int
    taken: list[float]  # each rule's tat after the take (the store's clock), if it expires


class Limits:
    def __init__(self, config: Config, *, clock: Clock = time.monotonic) -> None:
        self.settings = parse_settings(config.sections.get("limits"), config.source)
        self.active = self.settings.active
        self.prefix = f"{config.section('redis').get('prefix') or 'aiproxy:'}limits:"
        self.clock = clock
        self.local = LocalStore(clock)
        self._made: dict[tuple[str, str, str | None, Rate], _Made] = {}
        self.remote: RedisStore | None = None
        if self.active and config.redis_url:
            try:
                self.remote = RedisStore(config.redis_url)
            except ValueError:  # the URL is not echoed: it may hold a password
                raise ConfigError(["redis.url: not a URL Redis can use (redis://, rediss:// or "
                                   "unix://), and limits: needs it"], config.source) from None
        elif self.active and config.server.workers > 1:
            log.warning("limits: each of the %d workers counts on its own (set redis.url to share "
                        "the counters): a limit of N admits up to %d times N", config.server.workers,
                        config.server.workers)
        self.down_until = 0.0
        self.down_since: float | None = None
        self._reminded = 0.0
        self.counts = {"refused": 0, "backend_errors": 0, "unchecked": 0, "unavailable": 0}
        self._finishing: set[asyncio.Task[None]] = set()  # cancelled calls' tokens, given back

    # ------------------------------------------------------------ which limits
    def rules(self, call: Call) -> list[Rule]:
        """Every limit ``call`` touches, with what it would take from each."""
        principal = call.principal
        if principal is None or principal.kind == "master":
            return []
        s = self.settings
        tier = s.anonymous_tier if principal.kind == "anonymous" else principal.tier or s.default_tier
        rate = s.tiers.get(tier) if tier else None
        rules: list[Rule] = []
        cost = 0  # the token estimate, worked out once if a token limit needs it
        for scope in s.scopes:
            ident = principal.id if scope == "key" else principal.user if scope == "user" \
                else principal.tenant
            if ident is None:
                continue
            mine = rate
            if scope == "key" and OVERRIDE in principal.metadata:
                mine = key_override(principal.metadata, rate, s.window)
            if mine is None:
                continue
            made = self._made.get((scope, ident, tier, mine))
            if made is None:
                made = self._make(f"{scope}:{ident}", mine, _label(principal, scope, ident, tier),
                                  (scope, ident, tier, mine))
            cost = self._append(rules, made, mine, call, cost)
        per_model = s.model_tiers.get(call.model)
        if per_model is not None and tier in per_model:
            mine = per_model[tier]
            key = ("key-model", f"{principal.id}\0{call.model}", tier, mine)
            made = self._made.get(key)
            if made is None:
                made = self._make(f"key:{principal.id}:model:{call.model}", mine,
                                  f"key '{principal.id}' on model '{call.model}' (tier {tier})", key)
            cost = self._append(rules, made, mine, call, cost)
        model = s.models.get(call.model)
        if model is not None:
            made = self._made.get(("model", call.model, None, model))
            if made is None:
                made = self._make(f"model:{call.model}", model, f"model '{call.model}'",
                                  ("model", call.model, None, model))
            self._append(rules, made, model, call, cost)
        return rules

    def _make(self, counter: str, rate: Rate, label: str, key: tuple[str, str, str | None, Rate]) -> _Made:
        """The parts of one counter's rules that do not change from call to call."""
        if len(self._made) >= MAX_MADE:
            self._made.clear()
        requests = None
        if rate.requests:
            requests = Rule(f"{self.prefix}{counter}:r", "requests", rate.requests, rate.window, 1, label)
        made = self._made[key] = (requests, f"{self.prefix}{counter}:t", label)
        return made

    def _append(self, rules: list[Rule], made: _Made, rate: Rate, call: Call, cost: int) -> int:
        if made[0] is not None:
            rules.append(made[0])
        if rate.tokens_per_minute:
            cost = cost or self.estimate(call)
            rules.append(Rule(made[1], "tokens", rate.tokens_per_minute, 60.0, cost, made[2]))
        return cost

    def estimate(self, call: Call) -> int:
        """Tokens the call may use: its prompt plus the output it may ask for."""
        n = tokens.prompt_of(call)
        if call.operation != "embedding":
            n += tokens.max_completion(call.body, self.settings.completion_estimate)
        return max(1, n)

    # ------------------------------------------------------------ before the call
    @hookimpl
    def aiproxy_before_call(self, call: Call) -> Awaitable[None] | None:
        if not self.active or call.operation == "count_tokens":  # count_tokens: no after-call
            return None
        rules = self.rules(call)
        if not rules:
            return None
        _check_size(rules)
        if self.remote is None:
            self._decide(call, rules, self.local.take(rules))
            return None
        return self._take_shared(call, rules)

    async def _take_shared(self, call: Call, rules: list[Rule]) -> None:
        assert self.remote is not None
        if self.clock() < self.down_until:  # Redis failed a moment ago: no round trip yet
            self._unchecked()
            return
        try:
            verdict = await self.remote.take(rules)
        except asyncio.CancelledError:
            self._give_back(rules)
            raise
        except Exception as exc:  # redis errors, OSError, timeouts
            self._failed(exc)
            self._unchecked()
            return
        self._recovered()
        self._decide(call, rules, verdict)

    def _give_back(self, rules: list[Rule]) -> None:
        """A call cancelled while its take was in flight (a shutdown): nothing will settle it.
        The take was most likely applied (the time goes in waiting for the answer), so its
        token estimate is given back, off the cancelled task. Not knowing, this is right
        when the take was admitted; if it never reached Redis or was refused, the key gets
        up to one estimate more for under a minute, the mirror of what it lost before."""
        tokens = [r for r in rules if r.kind == "tokens"]
        if not tokens or self.remote is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._settle_shared(Held(tokens, tokens[0].cost, [0.0] * len(tokens)), -tokens[0].cost))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def finished(self) -> None:
        """Wait for the giving back of cancelled calls' tokens (shutdown, tests)."""
        while self._finishing:
            await asyncio.gather(*list(self._finishing), return_exceptions=True)

    def _decide(self, call: Call, rules: list[Rule], verdict: Verdict) -> None:
        if not verdict.admitted:
            self.counts["refused"] += 1
            raise _refusal(rules, verdict)
        call.response_headers.update(headers(rules, verdict.ahead))
        held = [r for r in rules if r.kind == "tokens"]
        if held:
            at = verdict.at
            taken = [at + a for r, a in zip(rules, verdict.ahead, strict=True) if r.kind == "tokens"]
            call.state[STATE] = Held(held, held[0].cost, taken)

    # ------------------------------------------------------------ settling tokens
    @hookimpl
    def aiproxy_after_call(self, call: Call) -> Awaitable[None] | None:
        held: Held | None = call.state.pop(STATE, None)
        if held is None:
            return None
        if call.cached:
            used = 0  # answered from the cache: the upstream spent nothing
        else:
            used = call.usage.total_tokens if call.usage is not None else held.estimate
        return self._settle(held, used - held.estimate)

    @hookimpl
    def aiproxy_on_error(self, call: Call) -> Awaitable[None] | None:
        held: Held | None = call.state.pop(STATE, None)
        if held is None:
            return None
        used = call.usage.total_tokens if call.usage is not None else 0  # what was produced
        return self._settle(held, used - held.estimate)

    def _settle(self, held: Held, delta: int) -> Awaitable[None] | None:
        if delta == 0:
            return None
        if self.remote is None:
            self.local.settle(held.rules, delta, held.taken)
            return None
        return self._settle_shared(held, delta)

    async def _settle_shared(self, held: Held, delta: int) -> None:
        assert self.remote is not None
        if self.clock() < self.down_until:
            return
        try:
            await self.remote.settle(held.rules, delta, held.taken)
        except Exception as exc:
            self._failed(exc)
        else:
            self._recovered()

    # ------------------------------------------------------------ Redis trouble
    def _unchecked(self) -> None:
        if self.settings.fail_open:
            self.counts["unchecked"] += 1
            return
        self.counts["unavailable"] += 1
        retry = max(1, math.ceil(self.settings.backend_retry))
        raise ProxyError(503, "Rate limits cannot be checked: their store (Redis) is unreachable, and "
                         "limits.on_backend_error is closed. Retry in a few seconds.",
                         type="service_unavailable", code="rate_limit_store_unavailable",
                         headers={"retry-after": str(retry)})

    def _failed(self, exc: BaseException) -> None:
        self.counts["backend_errors"] += 1
        now = self.clock()
        self.down_until = now + self.settings.backend_retry
        what = "admitted without rate limits" if self.settings.fail_open else "refused with 503"
        if self.down_since is None:
            self.down_since = self._reminded = now
            log.error("limits: Redis is unreachable (%s: %s); calls are %s until it is back",
                      type(exc).__name__, str(exc)[:200], what)
        elif now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            log.error("limits: Redis still unreachable after %s; calls are %s (%d unchecked, "
                      "%d refused so far)", duration(now - self.down_since), what,
                      self.counts["unchecked"], self.counts["unavailable"])

    def _recovered(self) -> None:
        if self.down_since is not None:
            log.warning("limits: Redis is back after %s; rate limits are enforced again",
                        duration(self.clock() - self.down_since))
            self.down_since = None
            self.down_until = 0.0

    # ------------------------------------------------------------ lifecycle, metrics
    @hookimpl
    def aiproxy_stats(self) -> dict[str, float] | None:
        if not self.active:
            return None
        return {f"aiproxy_limits_{name}_total": float(n) for name, n in self.counts.items()}

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        if self.remote is not None:
            await self.finished()
            await self.remote.aclose()


def _label(principal: Principal, scope: str, ident: str, tier: str | None) -> str:
    if principal.kind == "anonymous":
        return f"callers without a key (tier {tier})"
    if scope == "key":
        return f"key '{ident}'" + (f" (tier {tier})" if tier else " (its own limits)")
    return f"{scope} '{ident}'" + (f" (tier {tier})" if tier else "")


def _check_size(rules: list[Rule]) -> None:
    """A call needing more tokens than a limit holds could never run: say so, not "retry"."""
    for rule in rules:
        if rule.cost > rule.limit:
            raise ProxyError(429, f"Request too large for {rule.label}: it needs about {rule.cost} "
                             f"tokens (its prompt plus its max output), more than the limit of "
                             f"{rule.limit} tokens per minute. Lower max_tokens or shorten the "
                             "prompt; retrying as it is will not help.", code="request_too_large")


def _refusal(rules: list[Rule], verdict: Verdict) -> ProxyError:
    rule = rules[verdict.failed]
    wait = duration(verdict.wait)
    if rule.kind == "requests":
        what = f"{rule.limit} requests per {duration(rule.window)}"
    else:
        what = (f"{rule.limit} tokens per minute, and this request needs about {rule.cost} "
                "(its prompt plus its max output)")
    out = headers(rules, verdict.ahead)
    out["retry-after"] = str(max(1, math.ceil(verdict.wait)))
    out["retry-after-ms"] = str(max(1, math.ceil(verdict.wait * 1000)))
    return ProxyError(429, f"Rate limit reached for {rule.label}: {what}. Retry in {wait}.",
                      code="rate_limit_exceeded", headers=out)


def aiproxy_plugin(config: Config) -> Limits:
    return Limits(config)
