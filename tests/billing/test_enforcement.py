"""The credit hook on real Redis and Postgres: licences, the burn order, chunks, the cut,
settle pricing, and the overdraft bound with streams truly in flight at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import replace
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from billing import balances, catalog, ledger
from billing.enforcement import CreditHook, billing_keys, rates_at
from billing.models import DeviceLicence
from billing.profiles import prorated_allowance
from core.db import db, utcnow
from core.redis import get_redis
from inference.directory import DeviceProfile, profile_key
from inference.hook import Refused
from inference.units import Units
from inference.usage import UsageEvent, entry_data, usage_stream
from tests.billing.credit import (
    Billed,
    allow_overage,
    billed_tenant,
    buy_package,
    drain,
    event_for,
    live,
    run,
)

pytestmark = pytest.mark.usefixtures("committed_app")


def admit(hook: CreditHook, billed: Billed, *, index: int = 0, kind: str = "text",
          estimate: Units | None = None) -> Any:
    return hook.admit(billed.profile(index), uuid.uuid4().hex, kind, estimate or Units(),
                      stream_id=f"s-{uuid.uuid4().hex}", owner="test")


def _prefix() -> str:
    from flask import current_app
    return str(current_app.config["ENSOUL_REDIS_PREFIX"])


def test_a_device_without_a_seat_is_refused_license_required() -> None:
    billed = billed_tenant(seats=0)
    buy_package(billed.tenant_id, 100)

    async def scenario(hook: CreditHook) -> None:
        with pytest.raises(Refused) as refused:
            await admit(hook, billed)
        assert refused.value.code == "license_required"
    run(scenario)


def test_a_licence_past_its_grace_is_refused_license_expired() -> None:
    billed = billed_tenant()
    licence = db.session.query(DeviceLicence).filter_by(device_id=billed.devices[0].id).one()
    licence.starts_at = utcnow().replace(year=2020)
    licence.ends_at = licence.grace_ends_at = utcnow().replace(year=2021)
    db.session.commit()

    async def scenario(hook: CreditHook) -> None:
        with pytest.raises(Refused) as refused:
            await admit(hook, billed)
        assert refused.value.code == "license_expired"
    run(scenario)


def test_a_modality_the_plan_lacks_is_refused() -> None:
    billed = billed_tenant(modalities=["text"])
    buy_package(billed.tenant_id, 100)

    async def scenario(hook: CreditHook) -> None:
        await admit(hook, billed)
        with pytest.raises(Refused) as refused:
            await admit(hook, billed, kind="voice")
        assert refused.value.code == "license_required"
        assert "voice" in refused.value.message
    run(scenario)


def test_no_credit_anywhere_is_refused_quota_exhausted() -> None:
    billed = billed_tenant()

    async def scenario(hook: CreditHook) -> None:
        with pytest.raises(Refused) as refused:
            await admit(hook, billed)
        assert refused.value.code == "quota_exhausted"
    run(scenario)
    assert not any(live(billed.tenant_id).values())


def test_admission_reserves_one_chunk_and_the_budget_is_what_it_buys() -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 10)

    async def scenario(hook: CreditHook) -> Any:
        return await admit(hook, billed, estimate=Units(input_tokens=10))
    admission = run(scenario)
    # 1 credit for the input (ceiling of 10 / 1,000) and 1 for 50 output tokens (of 100).
    assert admission.state["reserved"] == 2
    assert live(billed.tenant_id)[ledger.package_account(package.id)] == 8
    assert admission.budget.output_tokens == 100  # the whole block the credit pays for
    assert admission.budget.input_tokens == 2000  # or one more block of input instead


def test_the_burn_order_allowance_then_packages_by_expiry_then_overage(committed_app: Any
                                                                       ) -> None:
    billed = billed_tenant(allowance=3)
    late = buy_package(billed.tenant_id, 2, days=60)
    early = buy_package(billed.tenant_id, 2, days=30)
    allow_overage(billed.tenant_id, cap=2)
    month = utcnow().strftime("%Y-%m")  # the test tenant's zone is UTC

    async def scenario(hook: CreditHook) -> list[dict[str, int]]:
        admission = await admit(hook, billed)
        splits = []
        used = Units()
        for _ in range(8):  # 100 output tokens = 1 credit each
            used = used + Units(output_tokens=100)
            await hook.extend(admission, used)
        event = event_for(admission, used)
        assert await hook.settle(admission, event)
        splits.append(event.credit_split)
        with pytest.raises(Refused) as refused:
            await admit(hook, billed)
        assert refused.value.code == "quota_exhausted"
        return splits
    [split] = run(scenario)
    allowance = ledger.allowance_account(billed.devices[0].id, month)
    # Allowance first (prorated this month), then the package expiring first, then the later
    # one, then overage up to its cap.
    grant = prorated_allowance(3, billed.devices[0].activated_at.replace(tzinfo=dt.UTC),
                               ZoneInfo("UTC"))
    assert split[allowance] == grant
    assert split[ledger.package_account(early.id)] == 2
    assert split[ledger.package_account(late.id)] == 2
    assert split[ledger.overage_account(month)] == 8 - grant - 4
    drain(committed_app)
    balances = ledger.balances(billed.tenant_id)
    assert balances[ledger.package_account(early.id)] == 0
    assert balances[ledger.package_account(late.id)] == 0
    assert balances[allowance] == 0


def test_extend_cuts_the_stream_when_nothing_is_left() -> None:
    billed = billed_tenant()
    buy_package(billed.tenant_id, 3)

    async def scenario(hook: CreditHook) -> tuple[int, UsageEvent]:
        admission = await admit(hook, billed)
        used = Units()
        steps = 0
        with pytest.raises(Refused) as refused:
            while True:
                used = used + Units(output_tokens=10)
                if not admission.budget.covers(used):
                    admission.budget = await hook.extend(admission, used)
                steps += 1
        assert refused.value.code == "quota_exhausted"
        event = event_for(admission, used, finish="quota_exhausted")
        await hook.settle(admission, event)
        return steps, event
    steps, event = run(scenario)
    assert steps == 30  # 300 tokens were paid for; the 31st step is cut
    assert event.credits == 4  # the delta past the budget: at most one chunk of overdraft
    assert event.credit_split["overdraft"] == 1


def test_settle_gives_back_what_was_not_used_and_the_event_carries_the_price(
        committed_app: Any) -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 50)

    async def scenario(hook: CreditHook) -> UsageEvent:
        admission = await admit(hook, billed, estimate=Units(input_tokens=2500))
        event = event_for(admission, Units(input_tokens=2500, output_tokens=30))
        assert await hook.settle(admission, event)
        # Sent again by the same broker (its answer lost): the same answer, settled once.
        again = replace(event, credits=0, credit_split={})
        assert await hook.settle(admission, again)
        assert (again.credits, again.credit_split) == (event.credits, event.credit_split)
        # A sweeper racing for it is told it is settled.
        assert not await hook.settle(None, replace(event, broker="sweeper-1"))
        return event
    event = run(scenario)
    assert event.credits == 3 + 1
    assert event.credit_split == {ledger.package_account(package.id): 4}
    assert live(billed.tenant_id)[ledger.package_account(package.id)] == 46
    [(_, fields)] = get_redis().xrange(usage_stream(billed.tenant_id))  # appended once
    assert orjson.loads(fields[b"e"])["credits"] == 0  # as the broker encoded it
    appended = entry_data(fields)  # with the price the settle script set beside it
    assert appended["credits"] == 4 and appended["credit_split"] == event.credit_split
    drain(committed_app)
    assert ledger.balance(billed.tenant_id, ledger.package_account(package.id)) == 46
    drain(committed_app)  # nothing twice
    assert ledger.balance(billed.tenant_id, ledger.package_account(package.id)) == 46


def test_the_sweeper_settles_a_dead_brokers_stream_from_its_reservation() -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 20)

    async def scenario(hook: CreditHook) -> UsageEvent:
        admission = await admit(hook, billed)
        await hook.extend(admission, Units(output_tokens=250))
        orphan = event_for(admission, Units(output_tokens=250), finish="error")
        assert await hook.settle(None, orphan)
        return orphan
    orphan = run(scenario)
    assert orphan.credits == 3
    assert live(billed.tenant_id)[ledger.package_account(package.id)] == 17


@pytest.mark.parametrize("streams", [200])
def test_concurrent_streams_overdraw_at_most_one_chunk_each(committed_app: Any,
                                                           streams: int) -> None:
    """Streams truly in flight at once: every one admitted before any settles, then all
    extending in interleaved steps against a balance far smaller than their demand."""
    billed = billed_tenant(devices=4)
    balance = 37
    package = buy_package(billed.tenant_id, balance)
    chunk_credits = 1  # 50 output tokens at 1 credit per 100

    async def one(hook: CreditHook, index: int, started: asyncio.Barrier) -> int:
        try:
            admission = await admit(hook, billed, index=index % 4)
        except Refused:
            await started.wait()
            return 0
        await started.wait()
        used = Units()
        finish = "stop"
        try:
            for _ in range(40):
                used = used + Units(output_tokens=20)
                if not admission.budget.covers(used):
                    admission.budget = await hook.extend(admission, used)
                await asyncio.sleep(0)
        except Refused:
            finish = "quota_exhausted"
        event = event_for(admission, used, finish=finish)
        assert await hook.settle(admission, event)
        return event.credits

    async def scenario(hook: CreditHook) -> list[int]:
        started = asyncio.Barrier(streams)
        return await asyncio.gather(*(one(hook, i, started) for i in range(streams)))
    billed_credits = run(scenario)
    admitted = sum(1 for c in billed_credits if c)
    assert admitted > 1
    assert sum(billed_credits) <= balance + chunk_credits * admitted
    assert sum(billed_credits) >= balance  # the balance was used up, not left over
    assert live(billed.tenant_id)[ledger.package_account(package.id)] == 0
    drain(committed_app)
    assert ledger.balance(billed.tenant_id, ledger.package_account(package.id)) == 0


def test_a_rate_card_published_for_later_reaches_the_profiles_and_applies_from_its_start(
        ) -> None:
    billed = billed_tenant()
    later = utcnow() + dt.timedelta(hours=1)
    catalog.publish_rate_card(billed.plan, {"output_tokens": (100, 2)}, effective_from=later)
    db.session.commit()  # after commit: the plan's devices are projected again
    raw = get_redis().get(profile_key(_prefix(), str(billed.tenant_id),
                                      str(billed.devices[0].id)))
    licence = DeviceProfile.from_json(raw).licence
    assert licence["next_rates"]["rates"] == {"output_tokens": [100, 2]}
    starts = later.replace(tzinfo=dt.UTC).timestamp()
    assert rates_at(licence, starts - 1)[1]["output_tokens"] == (100, 1)
    assert rates_at(licence, starts)[1] == {"output_tokens": (100, 2)}


def test_allowances_of_months_before_the_previous_one_are_forgotten_in_redis() -> None:
    billed = billed_tenant(allowance=5)
    k = billing_keys(_prefix(), str(billed.tenant_id))
    device = billed.devices[0].id
    get_redis().hset(k["acct"], mapping={f"allowance:{device}:2020-01": 3,
                                         f"allowance:{device}:{utcnow():%Y-%m}": 5})
    get_redis().hset(k["grants"], f"allowance:{device}:2020-01", 5)
    assert balances.prune_allowances(billed.tenant_id) == 1
    assert set(live(billed.tenant_id)) == {f"allowance:{device}:{utcnow():%Y-%m}"}
    assert not get_redis().hexists(k["grants"], f"allowance:{device}:2020-01")
