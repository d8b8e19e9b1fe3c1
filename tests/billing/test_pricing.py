"""Pricing by the rate card: ceiling division per metric, additive-safe, budgets that never
price above the credits they came from."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.models import METRICS
from billing.pricing import Rate, RateTable, check_metric

CARD = RateTable("plan:1", {"input_tokens": Rate(1000, 1), "output_tokens": Rate(1000, 4),
                            "audio_in_ms": Rate(60_000, 10), "images": Rate(1, 2)})

rates = st.builds(Rate, st.integers(1, 100_000), st.integers(0, 1000))
tables = st.dictionaries(st.sampled_from(METRICS), rates).map(lambda r: RateTable("v", r))
usage = st.fixed_dictionaries({m: st.integers(0, 10_000_000) for m in METRICS})


@pytest.mark.parametrize(("units", "credits"), [
    ({}, 0),
    ({"output_tokens": 1}, 4),  # a started block is a whole block
    ({"output_tokens": 1000}, 4),
    ({"output_tokens": 1001}, 8),
    ({"input_tokens": 2500, "output_tokens": 300}, 3 + 4),
    ({"audio_in_ms": 61_000, "images": 2}, 20 + 4),
    ({"tool_calls": 50, "audio_out_ms": 10_000}, 0),  # metrics without a rate are free
])
def test_each_metric_is_priced_by_whole_blocks(units: dict[str, int], credits: int) -> None:
    assert CARD.price(units) == credits


def test_the_price_is_split_by_metric() -> None:
    assert CARD.price_by_metric({"input_tokens": 10, "output_tokens": 2001}) == {
        "input_tokens": 1, "output_tokens": 12, "audio_in_ms": 0, "images": 0}


@given(tables, usage, st.floats(0, 1))
def test_splitting_a_request_never_lowers_its_price(table: RateTable, whole: dict[str, int],
                                                    share: float) -> None:
    first = {m: int(v * share) for m, v in whole.items()}
    second = {m: whole[m] - first[m] for m in whole}
    assert table.price(first) + table.price(second) >= table.price(whole)


@given(rates, st.integers(0, 10_000_000))
def test_the_units_a_budget_buys_never_cost_more_than_the_budget(rate: Rate,
                                                                 credits: int) -> None:
    units = rate.units_for(credits)
    if rate.credits_per_block == 0:
        assert units is None  # free: no limit from this metric
        return
    assert units is not None
    assert rate.price(units) <= credits
    assert rate.price(units + 1) > credits  # and it is the most the budget buys


def test_a_rate_needs_a_positive_block() -> None:
    with pytest.raises(ValueError, match="block_units"):
        Rate(0, 1)
    with pytest.raises(ValueError, match="credits_per_block"):
        Rate(10, -1)


def test_unknown_metrics_are_refused() -> None:
    assert check_metric("output_tokens") == "output_tokens"
    with pytest.raises(ValueError, match="unknown metric"):
        check_metric("seconds")
