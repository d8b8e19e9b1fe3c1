"""Pricing: metered units -> integer credits, by a rate card.

A request is priced once, at settle, from its totals: for each metric,
``ceil(units / block_units) * credits_per_block``; a reservation is priced by the same rule.
Ceiling division makes pricing *additive-safe*: splitting a request's units into parts never
prices the parts below the whole (``ceil(a/b) + ceil(c/b) >= ceil((a+c)/b)``), so a device
gains nothing by sending many small requests instead of one.

The reverse, :meth:`RateTable.units_for`, turns a credit budget into the metered units it buys
(what the broker is handed as a stream's budget): whole blocks only, so the units a budget buys
never price above it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from billing.models import METRICS, RateCard


def block_price(units: int, block_units: int, credits_per_block: int) -> int:
    """The rule, the one place in Python (the settle script has it in Lua): whole blocks."""
    return -(-units // block_units) * credits_per_block if units > 0 else 0


@dataclass(frozen=True, slots=True)
class Rate:
    block_units: int
    credits_per_block: int

    def __post_init__(self) -> None:
        if self.block_units <= 0 or self.credits_per_block < 0:
            raise ValueError("a rate needs block_units > 0 and credits_per_block >= 0")

    def price(self, units: int) -> int:
        return block_price(units, self.block_units, self.credits_per_block)

    def units_for(self, credits: int) -> int | None:
        """The most units ``credits`` pay for; ``None`` when this metric is free."""
        if self.credits_per_block == 0:
            return None
        return max(0, credits) // self.credits_per_block * self.block_units


@dataclass(frozen=True, slots=True)
class RateTable:
    """A rate card as the hot path uses it; a metric without a rate is free."""

    version: str
    rates: Mapping[str, Rate] = field(default_factory=dict)

    @classmethod
    def from_rate_card(cls, card: RateCard) -> RateTable:
        return cls(version=f"{card.plan_id}:{card.version}",
                   rates={r.metric: Rate(r.block_units, r.credits_per_block)
                          for r in card.rates})

    def price_by_metric(self, units: Mapping[str, int]) -> dict[str, int]:
        return {metric: rate.price(int(units.get(metric, 0)))
                for metric, rate in self.rates.items()}

    def price(self, units: Mapping[str, int]) -> int:
        return sum(self.price_by_metric(units).values())

    def units_for(self, credits: int, metric: str) -> int | None:
        rate = self.rates.get(metric)
        return None if rate is None else rate.units_for(credits)

    def as_dict(self) -> dict[str, object]:
        return {"version": self.version,
                "rates": {m: [r.block_units, r.credits_per_block]
                          for m, r in sorted(self.rates.items())}}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    return metric
