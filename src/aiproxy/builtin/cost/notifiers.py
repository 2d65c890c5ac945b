"""Where a spend alert goes: webhooks (POST JSON, bounded retries) and e-mail (SMTP), and
always the log. Nothing here is on a call's path: the spend tracker sends from a task."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from email.message import EmailMessage
from typing import Any

import httpx

from aiproxy.builtin.cost.prices import usd

log = logging.getLogger("aiproxy.cost")


@dataclass(slots=True)
class Alert:
    tenant: str
    period: str
    spend: Decimal  # USD, the running total when it crossed
    threshold: Decimal
    at: dt.datetime

    def payload(self) -> dict[str, Any]:
        return {"event": "cost.threshold_crossed", "tenant": self.tenant, "period": self.period,
                "spend_usd": usd(self.spend), "threshold_usd": usd(self.threshold),
                "at": self.at.isoformat().replace("+00:00", "Z")}


@dataclass(slots=True)
class Smtp:
    host: str
    port: int = 25
    sender: str = "aiproxy@localhost"
    starttls: bool = False
    tls: bool = False  # implicit TLS (port 465)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 10.0


@dataclass(slots=True)
class AlertStats:
    sent: int = 0
    failed: int = 0
    backend_errors: int = 0


class Notifiers:
    """Where an alert goes: webhooks (POST JSON) and e-mail (SMTP); always the log."""

    def __init__(self, webhooks: list[str], emails: list[str], smtp: Smtp | None, *,
                 timeout: float = 5.0, retries: int = 2, backoff: float = 0.5) -> None:
        self.webhooks = webhooks
        self.emails = emails
        self.smtp = smtp
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.http: httpx.AsyncClient | None = None

    async def send(self, alert: Alert, stats: AlertStats) -> None:
        log.warning("cost alert: tenant %s spent $%s in %s (threshold $%s)", alert.tenant,
                    usd(alert.spend), alert.period, usd(alert.threshold))
        for url in self.webhooks:
            await self._count(self._webhook(url, alert), stats, f"webhook to {_host(url)}")
        if self.emails and self.smtp is not None:
            await self._count(self._email(alert), stats, f"e-mail via {self.smtp.host}")

    async def _count(self, sending: Awaitable[None], stats: AlertStats, what: str) -> None:
        try:
            await sending
        except Exception as exc:  # never the caller's problem; never the URL or password
            stats.failed += 1
            log.error("cost alert: %s failed: %s", what, _reason(exc))
        else:
            stats.sent += 1

    async def _retrying(self, attempt: Callable[[], Awaitable[None]]) -> None:
        for n in range(self.retries + 1):
            try:
                return await attempt()
            except _Permanent:
                raise
            except Exception:
                if n == self.retries:
                    raise
                await self.sleep(self.backoff * 2 ** n)

    async def _webhook(self, url: str, alert: Alert) -> None:
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=self.timeout, trust_env=False)
        http = self.http

        async def post() -> None:
            r = await http.post(url, json=alert.payload())
            if r.status_code >= 500 or r.status_code == 429:
                raise RuntimeError(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                raise _Permanent(f"HTTP {r.status_code}")

        await self._retrying(post)

    async def _email(self, alert: Alert) -> None:
        smtp = self.smtp
        assert smtp is not None
        message = EmailMessage()
        message["From"] = smtp.sender
        message["To"] = ", ".join(self.emails)
        tenant = _one_line(alert.tenant)
        message["Subject"] = (f"aiproxy: tenant {tenant} has spent ${usd(alert.spend)} in "
                              f"{alert.period}")
        message.set_content(
            f"Tenant {tenant} has spent ${usd(alert.spend)} in {alert.period} (UTC), past the alert "
            f"threshold of ${usd(alert.threshold)}.\n\nThis alert is sent once per tenant per month.\n")

        def deliver() -> None:
            if smtp.tls:
                client: smtplib.SMTP = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout,
                                                        context=ssl.create_default_context())
            else:
                client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
            with client:
                if smtp.starttls and not smtp.tls:
                    client.starttls(context=ssl.create_default_context())
                if smtp.username:
                    client.login(smtp.username, smtp.password or "")
                client.send_message(message)

        async def attempt() -> None:
            try:
                await asyncio.to_thread(deliver)
            except smtplib.SMTPAuthenticationError as exc:
                raise _Permanent("SMTP authentication failed") from exc
            except smtplib.SMTPRecipientsRefused as exc:
                raise _Permanent("every recipient was refused") from exc

        await self._retrying(attempt)

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None


class _Permanent(Exception):
    """A failure another attempt would not fix (4xx, refused login)."""


def _host(url: str) -> str:
    try:
        return httpx.URL(url).host or "?"
    except Exception:
        return "?"


def _reason(exc: Exception) -> str:
    # the exception's type and short text; an httpx error's text names the URL, so not that
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc}"[:200]


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")
