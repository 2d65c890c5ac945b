"""Prices, USD per million tokens, and what one call cost, in exact decimals.

The built-in table holds the list prices (standard tier, pay as you go) of the
well-known models, read on 2026-11-27 from the providers' pricing pages as stored in
the project's reference library:

- OpenAI: developers.openai.com/api/docs/pricing and the model pages
  (developers.openai.com/api/docs/models/<id>). ``cached_input`` is the "cached input"
  rate; OpenAI counts cached tokens inside ``prompt_tokens``.
- Anthropic: platform.claude.com/docs/en/about-claude/pricing. ``cache_write`` is the
  5-minute cache write (1.25 x input), ``cached_input`` the cache hit (0.1 x input).
  Sonnet 4 / 4.5 prompts over 200k tokens (the 1M-context beta) take the long-context
  rates.
- Google: ai.google.dev/gemini-api/docs/pricing (paid tier; text, image and video
  input; audio input costs more and is not told apart here). Gemini 2.5 Pro prompts
  over 200k tokens take the long-context rates; ``cached_input`` is the context-cache
  read rate (cache storage per hour is billed by Google apart from any call).

Prices change: a ``price:`` on a model entry or ``cost.prices`` in config.yaml wins
over this table. Batch, flex and priority tiers are not modelled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiproxy.call import Usage

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens of each kind."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal


@dataclass(frozen=True, slots=True)
class Price:
    """Rates, and the same rates as integers: USD per token in units of ``10**-exp`` USD
    (exp 12 for any rate given to 6 decimals per million), so a call's cost is a sum of
    integer products: exact, and a little cheaper than the same sum in Decimal."""

    base: Rates
    long_threshold: int = 0  # prompts over this many tokens take ``long`` (0: never)
    long: Rates | None = None
    exp: int = field(init=False, default=12)
    _base: tuple[int, int, int, int] = field(init=False, default=(0, 0, 0, 0))
    _long: tuple[int, int, int, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        rates = [self.base] if self.long is None else [self.base, self.long]
        places = max(-min(0, int(r.as_tuple().exponent)) for rs in rates for r in _each(rs))
        exp = max(12, 6 + places)
        object.__setattr__(self, "exp", exp)
        object.__setattr__(self, "_base", _scaled(self.base, exp))
        if self.long is not None:
            object.__setattr__(self, "_long", _scaled(self.long, exp))

    def units(self, usage: Usage) -> int:
        """What ``usage`` cost, exactly, in ``10**-exp`` USD. Cache reads and writes are
        parts of ``prompt_tokens`` (as the gateway reads every provider's usage). A
        negative count (an upstream may send anything) is no tokens: never a negative cost."""
        # comparisons, not max()/min(): a builtin call each is most of this method's time
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        cached, written = usage.cached_tokens, usage.cache_write_tokens
        if prompt < 0:
            prompt = 0
        if completion < 0:
            completion = 0
        if cached < 0:
            cached = 0
        elif cached > prompt:
            cached = prompt
        if written < 0:
            written = 0
        elif written > prompt - cached:
            written = prompt - cached
        r = self._long if self._long is not None and prompt > self.long_threshold else self._base
        return (prompt - cached - written) * r[0] + completion * r[1] + cached * r[2] + written * r[3]

    def cost(self, usage: Usage) -> Decimal:
        """What ``usage`` cost in USD, exact."""
        return Decimal(self.units(usage)).scaleb(-self.exp)


def _each(r: Rates) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    return (r.input, r.output, r.cached_input, r.cache_write)


def _scaled(r: Rates, exp: int) -> tuple[int, int, int, int]:
    # $/million tokens → 10**-exp $ per token: x 10**(exp - 6), exact by the choice of exp
    a, b, c, d = (int(v.scaleb(exp - 6)) for v in _each(r))
    return (a, b, c, d)


FREE = Price(Rates(ZERO, ZERO, ZERO, ZERO))


def _d(value: Any) -> Decimal:
    # str() first: a YAML 0.075 is the float nearest 0.075, and its shortest repr is "0.075"
    return value if isinstance(value, Decimal) else Decimal(str(value))


def rates(data: dict[str, Any], base: Rates | None = None) -> Rates:
    """Rates from a validated mapping; what it leaves out comes from ``base`` (cached input
    and cache writes default to the input rate: no discount unless one is given)."""
    inp = _d(data["input"]) if "input" in data else base.input if base else ZERO
    return Rates(
        input=inp,
        output=_d(data["output"]) if "output" in data else base.output if base else ZERO,
        cached_input=_d(data["cached_input"]) if "cached_input" in data else
        (base.cached_input if base else inp),
        cache_write=_d(data["cache_write"]) if "cache_write" in data else
        (base.cache_write if base else inp),
    )


def price(data: dict[str, Any]) -> Price:
    """A Price from a ``price:`` mapping as config.parse_price validated it."""
    base = rates(data)
    long = data.get("long_context")
    if not long:
        return Price(base)
    return Price(base, int(long["threshold"]), rates(long, base))


def _p(inp: str, out: str, cached: str | None = None, write: str | None = None,
       long: tuple[int, str, str, str | None, str | None] | None = None) -> Price:
    base = Rates(Decimal(inp), Decimal(out), Decimal(cached or inp), Decimal(write or inp))
    if long is None:
        return Price(base)
    threshold, linp, lout, lcached, lwrite = long
    return Price(base, threshold, Rates(Decimal(linp), Decimal(lout), Decimal(lcached or linp),
                                        Decimal(lwrite or linp)))


_SONNET = _p("3", "15", "0.30", "3.75", (200_000, "6", "22.50", "0.60", "7.50"))
_OPUS_4 = _p("15", "75", "1.50", "18.75")
_OPUS_45 = _p("5", "25", "0.50", "6.25")

#: provider kind (the ``plugin`` of a providers: entry) → model → price
BUILTIN: dict[str, dict[str, Price]] = {
    "openai": {
        "gpt-4o": _p("2.50", "10.00", "1.25"),
        "gpt-4o-mini": _p("0.15", "0.60", "0.075"),
        "gpt-4.1": _p("2.00", "8.00", "0.50"),
        "gpt-4.1-mini": _p("0.40", "1.60", "0.10"),
        "gpt-4.1-nano": _p("0.10", "0.40", "0.025"),
        "gpt-5": _p("1.25", "10.00", "0.125"),
        "gpt-5-chat": _p("1.25", "10.00", "0.125"),
        "gpt-5-mini": _p("0.25", "2.00", "0.025"),
        "gpt-5-nano": _p("0.05", "0.40", "0.005"),
        "o1": _p("15.00", "60.00", "7.50"),
        "o1-mini": _p("1.10", "4.40", "0.55"),
        "o3": _p("2.00", "8.00", "0.50"),
        "o3-mini": _p("1.10", "4.40", "0.55"),
        "o4-mini": _p("1.10", "4.40", "0.275"),
        "text-embedding-3-small": _p("0.02", "0"),
        "text-embedding-3-large": _p("0.13", "0"),
        "text-embedding-ada-002": _p("0.10", "0"),
    },
    "anthropic": {
        "claude-opus-4-5": _OPUS_45,
        "claude-opus-4-1": _OPUS_4,
        "claude-opus-4": _OPUS_4,
        "claude-opus-4-0": _OPUS_4,
        "claude-sonnet-4-5": _SONNET,
        "claude-sonnet-4": _SONNET,
        "claude-sonnet-4-0": _SONNET,
        "claude-haiku-4-5": _p("1", "5", "0.10", "1.25"),
        "claude-3-7-sonnet": _p("3", "15", "0.30", "3.75"),
        "claude-3-5-haiku": _p("0.80", "4", "0.08", "1"),
    },
    "google": {
        "gemini-2.5-pro": _p("1.25", "10.00", "0.125", None, (200_000, "2.50", "15.00", "0.25", None)),
        "gemini-2.5-flash": _p("0.30", "2.50", "0.03"),
        "gemini-2.5-flash-lite": _p("0.10", "0.40", "0.01"),
        "gemini-embedding-001": _p("0.15", "0"),
    },
}

# a dated snapshot is priced as its model: gpt-4o-2024-08-06, claude-sonnet-4-5-20250929,
# claude-sonnet-4-5@20250929 (Vertex), claude-3-5-haiku-latest
_SNAPSHOT = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-latest)$")


def names(model: str) -> tuple[str, ...]:
    """The names ``model`` may be listed under: as served, then without its snapshot date."""
    name = model.removeprefix("models/").lower()
    bare = _SNAPSHOT.sub("", name)
    return (name,) if bare == name else (name, bare)


def lookup(table: dict[str, Price], model: str) -> Price | None:
    for name in names(model):
        found = table.get(name)
        if found is not None:
            return found
    return None


def usd(amount: Decimal) -> str:
    """Plain decimal USD, no exponent, no trailing zeros: ``0.000123``, ``0``."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def usd_units(units: int, exp: int) -> str:
    """``units`` x 10**-exp USD as :func:`usd` writes it (without a Decimal)."""
    digits = str(units).rjust(exp + 1, "0")
    whole, fraction = digits[:-exp], digits[-exp:].rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole
