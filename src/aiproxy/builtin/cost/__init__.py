"""The cost stage: what each call cost in USD, and an alert when a tenant spends too much.

After each call (first of the after-call stages, so quotas and the usage log can read
``call.cost``) the call's ``usage`` is priced by the model the deployment that served it
asked for: a retry or fallback onto another model is priced as that model. A price
comes from, in order: the serving ``models:`` entry's ``price:``; ``cost.prices`` by
upstream model name (a dated snapshot such as ``gpt-4o-2024-08-06`` matches
``gpt-4o``); the built-in table for the provider's kind (:mod:`.prices`). Providers in
``cost.free_providers`` (default mock and ollama) cost 0; any other model without a
price costs 0 with one warning per model, and ``call.metadata["cost_unpriced"]``.

A whole answer carries ``x-aiproxy-cost`` (plain decimal USD); a stream's head has
gone out before its usage is known, so its cost is in the usage log and metrics only.
A cache hit costs 0 and records what it saved in ``call.metadata["cost_saved"]``.
A call whose upstream gave no usage (Gemini embeddings count none; a stream cut short)
is priced on the gateway's estimate of its tokens, marked ``call.metadata["cost_estimated"]``.

Alerts: see :mod:`.alerts`. The spend is a tenant's (``principal.tenant``); a caller
without one is its own tenant, ``key:<key id>`` (the master key is ``key:master``).
"""

from __future__ import annotations

import logging
import math
from decimal import Decimal, InvalidOperation
from typing import Any

from aiproxy import hookimpl
from aiproxy.builtin.cost import prices
from aiproxy.builtin.cost.alerts import Spend
from aiproxy.builtin.cost.notifiers import Notifiers, Smtp
from aiproxy.builtin.cost.prices import FREE, Price, usd_units
from aiproxy.call import Call
from aiproxy.config import Config, ConfigError, parse_price
from aiproxy.errors import ProxyError

log = logging.getLogger("aiproxy.cost")
HEADER = "x-aiproxy-cost"
SETTINGS = ("prices", "free_providers", "alert_threshold_usd", "alert_email", "alert_webhook",
            "webhook_timeout", "alert_retries", "smtp", "flush_interval")
SMTP_SETTINGS = ("host", "port", "from", "starttls", "tls", "username", "password", "timeout")
_RESOLVED_MAX = 4096


class CostStage:
    def __init__(self, config: Config) -> None:
        settings = config.section("cost")
        errors: list[str] = []
        for key in settings:
            if key not in SETTINGS:
                errors.append(f"cost.{key}: unknown setting (expected one of: {', '.join(SETTINGS)})")
        self.prices = _prices(settings.get("prices"), errors)
        self.free = frozenset(_strings(settings.get("free_providers", ["mock", "ollama"]),
                                       "cost.free_providers", errors))
        self.model_prices: dict[int, Price] = {}  # id(ModelConfig) → its own price:
        for m in config.models:
            if m.price is not None:
                self.model_prices[id(m)] = prices.price(m.price)
        self.spend = _spend(config, settings, errors)
        if errors:
            raise ConfigError(errors, config.source)
        self._resolved: dict[tuple[str, str], tuple[Price, bool]] = {}
        self.warned: set[tuple[str, str]] = set()
        self.unpriced = 0

    # ------------------------------------------------------------ prices
    def price_of(self, call: Call) -> tuple[Price, bool]:
        """The price of the model that served ``call``, and whether it was known."""
        d = call.deployment
        if d is None:
            return FREE, True
        model = call.upstream_model or call.model
        key = (d.id, model)
        found = self._resolved.get(key)
        if found is not None:
            return found
        own = self.model_prices.get(id(d.config))
        kind = d.provider.config.plugin
        if own is not None:
            found = (own, True)
        else:
            listed = prices.lookup(self.prices, model) or prices.lookup(prices.BUILTIN.get(kind, {}), model)
            found = (listed, True) if listed is not None else (FREE, kind in self.free)
        if len(self._resolved) >= _RESOLVED_MAX:  # wildcard models: names are the client's
            self._resolved.clear()
        self._resolved[key] = found
        return found

    def cost_of(self, call: Call) -> tuple[int, int]:
        """What ``call`` cost: ``units`` x 10**-``exp`` USD, exact."""
        price, known = self.price_of(call)
        if not known:
            self._unpriced(call)
            return 0, price.exp
        if price is FREE:
            return 0, price.exp
        usage = call.usage  # estimated by the gateway when the upstream did not say
        if call.metadata.get("usage_estimated"):
            call.metadata["cost_estimated"] = True
        return (price.units(usage) if usage is not None else 0), price.exp

    def _unpriced(self, call: Call) -> None:
        self.unpriced += 1
        call.metadata["cost_unpriced"] = True
        d = call.deployment
        key = (d.provider.name if d else "", call.upstream_model or call.model)
        if key not in self.warned:
            self.warned.add(key)
            log.warning("cost: no price for model %r of provider %r; its calls cost 0 (give it a "
                        "price: on its models entry or in cost.prices)", key[1], key[0])

    # ------------------------------------------------------------ hooks
    @hookimpl
    def aiproxy_startup(self) -> None:
        if self.spend is not None:
            self.spend.start()

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        if self.spend is not None:
            await self.spend.aclose()

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        units, exp = self.cost_of(call)
        if call.cached:
            call.cost = 0.0
            call.metadata["cost_saved"] = units / 10 ** exp
            if not call.stream:
                call.response_headers[HEADER] = "0"
            return
        call.cost = units / 10 ** exp  # int / int: the float nearest the exact cost
        if not call.stream:
            call.response_headers[HEADER] = usd_units(units, exp)
        if units and self.spend is not None:
            self.spend.add(tenant_of(call), _nanos(units, exp))

    @hookimpl
    def aiproxy_on_error(self, call: Call, error: ProxyError) -> None:
        if call.usage is None or call.cached or call.cost is not None:
            return
        units, exp = self.cost_of(call)
        call.cost = units / 10 ** exp
        if units and self.spend is not None:
            self.spend.add(tenant_of(call), _nanos(units, exp))

    @hookimpl
    def aiproxy_stats(self) -> dict[str, float]:
        out = {"aiproxy_cost_unpriced_calls_total": float(self.unpriced)}
        if self.spend is not None:
            s = self.spend.stats
            out["aiproxy_cost_alerts_sent_total"] = float(s.sent)
            out["aiproxy_cost_alerts_failed_total"] = float(s.failed)
            out["aiproxy_cost_backend_errors_total"] = float(s.backend_errors)
        return out


def _nanos(units: int, exp: int) -> int:
    """``units`` x 10**-exp USD in nano-dollars, rounded half up (spend totals only)."""
    scale = 10 ** (exp - 9)
    return (units + scale // 2) // scale


def tenant_of(call: Call) -> str:
    p = call.principal
    if p is None:
        return "key:anonymous"
    return p.tenant or f"key:{p.id}"


# ---------------------------------------------------------------- settings

def _prices(raw: Any, errors: list[str]) -> dict[str, Price]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append("cost.prices: expected a mapping of model name → price")
        return {}
    out = {}
    for name, value in raw.items():
        checked = parse_price(value if value is not None else {}, f"cost.prices.{name}", errors)
        if checked is not None and not errors:
            out[str(name).lower()] = prices.price(checked)
    return out


def _strings(value: Any, path: str, errors: list[str]) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v for v in value.replace(";", ",").replace(" ", ",").split(",") if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    errors.append(f"{path}: expected a string or a list of strings")
    return []


def _number(value: Any, path: str, errors: list[str], default: float) -> float:
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        errors.append(f"{path}: expected a number, got {value!r}")
        return default
    if not math.isfinite(number):  # YAML's .inf / .nan, or "nan" from the environment
        errors.append(f"{path}: expected a finite number, got {value!r}")
        return default
    if number < 0:
        errors.append(f"{path}: must not be negative, got {value!r}")
        return default
    return number


def _spend(config: Config, settings: dict[str, Any], errors: list[str]) -> Spend | None:
    raw = settings.get("alert_threshold_usd")
    threshold = Decimal(0)
    if raw not in (None, "") and not isinstance(raw, bool):
        try:
            threshold = Decimal(str(raw).strip())
        except InvalidOperation:
            errors.append(f"cost.alert_threshold_usd: expected a number of USD, got {raw!r}")
        else:
            if not threshold.is_finite() or threshold < 0:
                errors.append(f"cost.alert_threshold_usd: expected a positive number, got {raw!r}")
    elif isinstance(raw, bool):
        errors.append(f"cost.alert_threshold_usd: expected a number of USD, got {raw!r}")
    emails = _strings(settings.get("alert_email"), "cost.alert_email", errors)
    webhooks = _strings(settings.get("alert_webhook"), "cost.alert_webhook", errors)
    for url in webhooks:
        if not url.startswith(("http://", "https://")):
            errors.append("cost.alert_webhook: expected an http:// or https:// URL")
    smtp = _smtp(settings.get("smtp"), errors)
    if emails and smtp is None:
        errors.append("cost.smtp.host: is required to send cost.alert_email")
    retries = _number(settings.get("alert_retries"), "cost.alert_retries", errors, 2)
    if retries != int(retries):
        errors.append(f"cost.alert_retries: expected a whole number, got {settings.get('alert_retries')!r}")
    timeout = _number(settings.get("webhook_timeout"), "cost.webhook_timeout", errors, 5.0)
    flush = _number(settings.get("flush_interval"), "cost.flush_interval", errors, 1.0)
    if errors or not threshold.is_finite() or threshold <= 0:
        return None
    notifiers = Notifiers(webhooks, emails, smtp, timeout=timeout or 5.0, retries=int(retries))
    return Spend(threshold, notifiers, redis_url=config.redis_url,
                 prefix=str(config.section("redis").get("prefix") or "aiproxy:"),
                 flush_interval=flush or 1.0)


def _smtp(raw: Any, errors: list[str]) -> Smtp | None:
    if raw in (None, "", {}):
        return None
    if not isinstance(raw, dict):
        errors.append("cost.smtp: expected a mapping (host, port, from, starttls, username, password)")
        return None
    for key in raw:
        if key not in SMTP_SETTINGS:
            errors.append(f"cost.smtp.{key}: unknown setting (expected one of: {', '.join(SMTP_SETTINGS)})")
    host = raw.get("host")
    if not host:
        return None
    tls = _flag(raw.get("tls"), "cost.smtp.tls", errors)
    port = _number(raw.get("port"), "cost.smtp.port", errors, 465 if tls else 25)
    if not (1 <= port <= 65535 and port == int(port)):
        errors.append(f"cost.smtp.port: expected a port number from 1 to 65535, got {raw.get('port')!r}")
    return Smtp(host=str(host), port=int(port), sender=str(raw.get("from") or "aiproxy@localhost"),
                starttls=_flag(raw.get("starttls"), "cost.smtp.starttls", errors), tls=tls,
                username=str(raw["username"]) if raw.get("username") else None,
                password=str(raw["password"]) if raw.get("password") else None,
                timeout=_number(raw.get("timeout"), "cost.smtp.timeout", errors, 10.0) or 10.0)


_FLAGS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
          "0": False, "": False}


def _flag(value: Any, path: str, errors: list[str]) -> bool:
    """true/false in any case (what ``${VAR}`` writes); anything else is named, not taken
    for false (a misread starttls would send the SMTP password without TLS)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    found = _FLAGS.get(value.strip().lower()) if isinstance(value, str) else None
    if found is None:
        errors.append(f"{path}: expected true or false, got {value!r}")
        return False
    return found


def aiproxy_plugin(config: Config) -> CostStage:
    return CostStage(config)
