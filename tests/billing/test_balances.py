"""Redis balances kept equal to the ledger (docs/billing.md, "Rebuild and reconcile" and
"Packages: loading and expiry"), on real Redis and Postgres with the usage writer posting the
ledger: rebuild after lost data, reconcile and repair, package expiry, duplicate events, and
the invariant under random purchases and requests."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from billing import balances, ledger
from billing.balances import Difference
from billing.enforcement import CreditHook, billing_keys
from billing.models import CreditPackage, DeviceLicence, EntryKind, LedgerEntry
from billing.settlement import usage_cause
from core.db import db, utcnow
from core.redis import connect_async, get_redis
from inference.hook import Admission, Refused
from inference.models import UsageEventRecord
from inference.units import Units
from inference.usage import UsageEvent, entry_data, usage_stream
from tests.billing.credit import (
    CHUNK,
    Billed,
    allow_overage,
    billed_tenant,
    billing_state,
    buy_package,
    drain,
    event_for,
    live,
    open_stream,
    run,
    serve,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.committed


def whole_months(billed: Billed) -> None:
    """Licences that began last month: this month's allowance is the plan's whole allowance
    (not prorated by today's date), so the figures below hold on any day."""
    for licence in db.session.scalars(select(DeviceLicence).where(
            DeviceLicence.tenant_id == billed.tenant_id)):
        licence.starts_at -= dt.timedelta(days=40)
    db.session.commit()


def entries(tenant_id: uuid.UUID) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The tenant's usage stream: settled events the writer has not taken yet."""
    return cast(Any, get_redis().xrange(usage_stream(tenant_id)))


def acct_key(tenant_id: uuid.UUID) -> str:
    from flask import current_app
    return billing_keys(current_app.config["ENSOUL_REDIS_PREFIX"], str(tenant_id))["acct"]


def a_busy_tenant(committed_app: Any) -> tuple[Billed, dict[str, str]]:
    """Two devices with a 4-credit allowance each, two packages and capped overage, after
    requests that used one allowance, the earlier package, part of the later one and some
    overage; every event written to the ledger."""
    billed = billed_tenant(devices=2, allowance=4)
    whole_months(billed)
    early = buy_package(billed.tenant_id, 5, days=30)
    late = buy_package(billed.tenant_id, 7, days=60)
    allow_overage(billed.tenant_id, cap=50)

    async def scenario(hook: CreditHook) -> list[UsageEvent]:
        return [await serve(hook, billed, 900),  # 10: allowance 4, early 5, late 1
                await serve(hook, billed, 250, index=1),  # 4: the second device's allowance
                await serve(hook, billed, 1050, index=1)]  # 12: late 6, overage 6
    events = run(scenario)
    assert [e.credits for e in events] == [10, 4, 12]
    drain(committed_app)
    month = utcnow().strftime("%Y-%m")  # the test tenant's zone is UTC
    return billed, {"early": ledger.package_account(early.id),
                    "late": ledger.package_account(late.id),
                    "overage": ledger.overage_account(month),
                    "allowance": ledger.allowance_account(billed.devices[0].id, month),
                    "allowance-1": ledger.allowance_account(billed.devices[1].id, month)}


# --- rebuild --------------------------------------------------------------------------------


def test_rebuild_after_flushdb_restores_identical_balances(committed_app: Any) -> None:
    billed, accounts = a_busy_tenant(committed_app)
    before = billing_state(billed.tenant_id)
    assert live(billed.tenant_id) == {accounts["allowance"]: 0, accounts["allowance-1"]: 0,
                                      accounts["early"]: 0, accounts["late"]: 0,
                                      accounts["overage"]: 6}
    get_redis().flushdb()
    assert billing_state(billed.tenant_id) == ({}, [], {})

    assert balances.rebuild(billed.tenant_id)
    assert billing_state(billed.tenant_id) == before
    assert balances.reconcile(billed.tenant_id) == ([], False)


def test_rebuild_restores_what_requests_then_spend(committed_app: Any) -> None:
    """After a rebuild the burn order goes on where it stopped: the rebuilt allowance is not
    granted again and the packages keep their expiry order."""
    billed = billed_tenant(allowance=4)
    whole_months(billed)
    early = buy_package(billed.tenant_id, 5, days=30)
    late = buy_package(billed.tenant_id, 5, days=60)

    async def first(hook: CreditHook) -> UsageEvent:
        return await serve(hook, billed, 150)  # 3 of the allowance's 4
    run(first)
    drain(committed_app)
    get_redis().flushdb()
    assert balances.rebuild(billed.tenant_id)

    async def second(hook: CreditHook) -> UsageEvent:
        return await serve(hook, billed, 250)  # 4: the allowance's last, then 3 of `early`
    event = run(second)
    month = utcnow().strftime("%Y-%m")
    assert event.credit_split == {ledger.allowance_account(billed.devices[0].id, month): 1,
                                  ledger.package_account(early.id): 3}
    assert live(billed.tenant_id)[ledger.package_account(late.id)] == 5
    drain(committed_app)
    assert balances.reconcile(billed.tenant_id) == ([], False)


def test_an_allowance_nothing_was_spent_from_is_granted_again_after_a_rebuild(
        committed_app: Any) -> None:
    """A refused request still creates the month's allowance in Redis; its grant reaches the
    ledger only with an event that spends from it. A rebuild leaves it out (the one way the
    rebuilt hash differs), and the next request grants it again: the same credits."""
    billed = billed_tenant(allowance=4)
    whole_months(billed)
    allowance = ledger.allowance_account(billed.devices[0].id, utcnow().strftime("%Y-%m"))

    async def too_big(hook: CreditHook) -> str:
        try:
            await open_stream(hook, billed, input_tokens=5000)  # 5 credits + 1 > 4
        except Refused as refused:
            return refused.code
        raise AssertionError("admitted")
    assert run(too_big) == "quota_exhausted"
    assert live(billed.tenant_id) == {allowance: 4}
    assert ledger.balances(billed.tenant_id) == {}
    assert balances.reconcile(billed.tenant_id) == ([], False)

    get_redis().flushdb()
    assert balances.rebuild(billed.tenant_id)
    assert billing_state(billed.tenant_id) == ({}, [], {})

    event = run(lambda hook: serve(hook, billed, 150))  # 3 credits
    assert event.credit_split == {allowance: 3}
    [(_, fields)] = entries(billed.tenant_id)
    assert entry_data(fields)["grants"] == {allowance: 4}  # granted again
    drain(committed_app)
    assert ledger.balance(billed.tenant_id, allowance) == 1 == live(billed.tenant_id)[allowance]
    assert balances.reconcile(billed.tenant_id) == ([], False)


def test_rebuild_refuses_while_a_reservation_is_open(committed_app: Any) -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 10)
    account = ledger.package_account(package.id)
    admission = run(lambda hook: open_stream(hook, billed))
    assert live(billed.tenant_id)[account] == 8  # 1 for the input, 1 for a chunk

    assert not balances.rebuild(billed.tenant_id)
    assert balances.rebuild_all() == (0, 1)  # (rebuilt, busy)
    assert live(billed.tenant_id)[account] == 8  # nothing written

    settle(admission, Units(input_tokens=10, output_tokens=40))
    drain(committed_app)
    get_redis().hset(acct_key(billed.tenant_id), account, 1000)  # corrupt it, then rebuild
    assert balances.rebuild(billed.tenant_id)
    assert live(billed.tenant_id)[account] == 8
    assert balances.rebuild_all() == (1, 0)


def settle(admission: Admission, units: Units) -> UsageEvent:
    async def scenario(hook: CreditHook) -> UsageEvent:
        event = event_for(admission, units)
        assert await hook.settle(admission, event)
        return event
    return run(scenario)


# --- reconcile --------------------------------------------------------------------------------


def test_reconcile_finds_no_difference_on_a_consistent_tenant(committed_app: Any) -> None:
    billed, _ = a_busy_tenant(committed_app)
    assert balances.reconcile(billed.tenant_id) == ([], False)
    assert balances.reconcile(billed.tenant_id, repair=True) == ([], False)


def test_reconcile_reports_an_injected_difference_and_repairs_it_only_when_idle(
        committed_app: Any) -> None:
    billed, accounts = a_busy_tenant(committed_app)
    late = accounts["late"]
    get_redis().hincrby(acct_key(billed.tenant_id), late, 5)  # a bug gave 5 credits away
    difference = Difference(late, 5, 0)
    assert balances.reconcile(billed.tenant_id) == ([difference], False)
    assert live(billed.tenant_id)[late] == 5  # reported, not repaired

    # A request in flight: its reservation is counted, but repair is refused while it is open.
    admission = run(lambda hook: open_stream(hook, billed))
    assert live(billed.tenant_id)[late] == 3  # the free credits went to the reservation
    assert balances.reconcile(billed.tenant_id, repair=True) == (
        [Difference(late, 3, -2)], False)
    assert live(billed.tenant_id)[late] == 3

    # Settled but not yet in the ledger: counted from the usage stream; repair may go ahead.
    event = settle(admission, Units(input_tokens=10, output_tokens=30))
    assert event.credit_split == {late: 2}
    assert balances.reconcile(billed.tenant_id, repair=True) == (
        [Difference(late, 3, -2)], True)
    assert live(billed.tenant_id)[late] == -2
    assert balances.reconcile(billed.tenant_id) == ([], False)
    drain(committed_app)
    assert ledger.balance(billed.tenant_id, late) == -2 == live(billed.tenant_id)[late]
    assert balances.reconcile(billed.tenant_id) == ([], False)


def test_a_settled_event_not_yet_written_is_no_difference(committed_app: Any) -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 20)
    account = ledger.package_account(package.id)

    event = run(lambda hook: serve(hook, billed, 420))
    assert event.credits == 6 and live(billed.tenant_id)[account] == 14
    assert get_redis().xlen(usage_stream(billed.tenant_id)) == 1
    assert ledger.balance(billed.tenant_id, account) == 20  # not in the ledger yet
    assert balances.reconcile(billed.tenant_id) == ([], False)

    drain(committed_app)
    assert ledger.balance(billed.tenant_id, account) == 14
    assert balances.reconcile(billed.tenant_id) == ([], False)


def test_repair_is_refused_when_an_event_was_settled_since_the_check(committed_app: Any
                                                                     ) -> None:
    """The repair's script compares the usage stream's last id with the one the check saw:
    the figures computed before that event would undo it."""
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 20)
    account = ledger.package_account(package.id)
    get_redis().hincrby(acct_key(billed.tenant_id), account, 7)
    state = balances.expected_state(billed.tenant_id)
    assert state.accounts[account] == 20

    run(lambda hook: serve(hook, billed, 90))  # 2 credits, settled after the check
    assert not balances._write(billed.tenant_id, state, replace=False)
    assert live(billed.tenant_id)[account] == 25
    assert balances.reconcile(billed.tenant_id, repair=True) == (
        [Difference(account, 25, 18)], True)
    assert live(billed.tenant_id)[account] == 18


def test_a_package_missing_from_redis_is_a_difference_and_repaired(committed_app: Any
                                                                   ) -> None:
    """Loading a package after the commit failed: the reconciler reports and loads it."""
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 20)
    account = ledger.package_account(package.id)
    keys = billing_keys(committed_app.config["ENSOUL_REDIS_PREFIX"], str(billed.tenant_id))
    get_redis().delete(keys["acct"], keys["pkgs"])

    assert balances.reconcile(billed.tenant_id, repair=True) == (
        [Difference(account, None, 20)], True)
    assert live(billed.tenant_id) == {account: 20}
    assert get_redis().zscore(keys["pkgs"], account) == int(
        package.expires_at.replace(tzinfo=dt.UTC).timestamp())
    event = run(lambda hook: serve(hook, billed, 40))
    assert event.credit_split == {account: 2}


def test_reconcile_reports_no_difference_while_requests_run(committed_app: Any) -> None:
    billed = billed_tenant()
    buy_package(billed.tenant_id, 1_000_000)
    profile = billed.profile()
    url, prefix = committed_app.config["REDIS_URL"], committed_app.config["ENSOUL_REDIS_PREFIX"]
    stop = threading.Event()
    served: list[UsageEvent] = []

    class Device:  # serve() asks its tenant for the device's profile (no Postgres here)
        def profile(self, index: int = 0) -> Any:
            return profile

    def traffic() -> None:
        async def requests() -> None:
            redis = connect_async(url)
            try:
                hook = CreditHook(redis, prefix, chunk=CHUNK)
                while not stop.is_set():
                    served.append(await serve(hook, Device(), 120))  # type: ignore[arg-type]
            finally:
                await redis.aclose()
        asyncio.run(requests())

    thread = threading.Thread(target=traffic)
    thread.start()
    reported = []
    try:
        wait_until(lambda: served, 10, what="the first request")
        for _ in range(50):
            differences, _ = balances.reconcile(billed.tenant_id)
            if differences:
                reported.append(differences)
    finally:
        stop.set()
        thread.join(10)
    assert len(served) > 50  # requests ran throughout
    # The acct hash is read with the reservations and the stream, in one transaction.
    assert reported == []
    assert balances.reconcile(billed.tenant_id) == ([], False)  # at rest: consistent


# --- package expiry -----------------------------------------------------------------------------


def test_expiry_forfeits_the_remainder_once_and_waits_for_unwritten_usage(
        committed_app: Any) -> None:
    billed = billed_tenant()
    short = buy_package(billed.tenant_id, 10, days=1)
    long = buy_package(billed.tenant_id, 10, days=90)
    account, other = ledger.package_account(short.id), ledger.package_account(long.id)
    keys = billing_keys(committed_app.config["ENSOUL_REDIS_PREFIX"], str(billed.tenant_id))
    later = utcnow() + dt.timedelta(days=2)

    event = run(lambda hook: serve(hook, billed, 150))  # 3 credits, from the earlier expiry
    assert event.credit_split == {account: 3}

    # Its event is still in the usage stream: the ledger's balance is not final yet.
    assert balances.expire_packages(at=later) == 0
    db.session.commit()
    assert packages_held(billed.tenant_id) == {account: 7, other: 10}
    assert expiries(billed.tenant_id) == []

    drain(committed_app)
    assert balances.expire_packages(at=later) == 1
    db.session.commit()
    assert expiries(billed.tenant_id) == [(account, -7, "package_expiry", str(short.id))]
    assert ledger.balance(billed.tenant_id, account) == 0
    assert packages_held(billed.tenant_id) == {other: 10}
    assert get_redis().zscore(keys["pkgs"], account) is None
    assert get_redis().zscore(keys["pkgs"], other) is not None

    assert balances.expire_packages(at=later) == 0  # once
    db.session.commit()
    assert expiries(billed.tenant_id) == [(account, -7, "package_expiry", str(short.id))]
    assert balances.reconcile(billed.tenant_id) == ([], False)
    # Only the live package is spent from now on.
    event = run(lambda hook: serve(hook, billed, 40))
    assert event.credit_split == {other: 2}


def test_a_package_not_yet_past_its_margin_is_not_expired(committed_app: Any) -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 10, days=1)
    just_expired = package.expires_at + dt.timedelta(minutes=5)
    assert balances.expire_packages(at=just_expired) == 0
    assert balances.expire_packages(at=just_expired + balances.EXPIRY_MARGIN) == 1
    db.session.commit()
    assert expiries(billed.tenant_id) == [(ledger.package_account(package.id), -10,
                                           "package_expiry", str(package.id))]


def test_a_used_up_package_expires_without_an_entry(committed_app: Any) -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 2, days=1)
    run(lambda hook: serve(hook, billed, 50))  # 2 credits: all of it
    drain(committed_app)
    assert balances.expire_packages(at=utcnow() + dt.timedelta(days=2)) == 1
    db.session.commit()
    assert expiries(billed.tenant_id) == []
    assert ledger.package_account(package.id) not in live(billed.tenant_id)


def test_a_used_up_package_is_closed_once(committed_app: Any) -> None:
    billed = billed_tenant()
    buy_package(billed.tenant_id, 2, days=1)
    run(lambda hook: serve(hook, billed, 50))  # 2 credits: all of it
    drain(committed_app)
    later = utcnow() + dt.timedelta(days=2)
    assert balances.expire_packages(at=later) == 1
    db.session.commit()
    assert balances.expire_packages(at=later) == 0


def test_a_package_expired_but_not_yet_closed_is_no_difference(committed_app: Any) -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 10, days=1)
    account = ledger.package_account(package.id)
    # Time passes: the package expired a minute ago; the expiry job has not closed it yet
    # (it waits EXPIRY_MARGIN), so Redis and the ledger both still hold its 10 credits.
    expired = utcnow() - dt.timedelta(minutes=1)
    db.session.execute(update(CreditPackage).where(CreditPackage.id == package.id).values(
        starts_at=expired - dt.timedelta(days=1), expires_at=expired))
    db.session.commit()
    keys = billing_keys(committed_app.config["ENSOUL_REDIS_PREFIX"], str(billed.tenant_id))
    get_redis().zadd(keys["pkgs"], {account: int(expired.timestamp())})
    assert packages_held(billed.tenant_id) == {account: 10}
    assert ledger.balance(billed.tenant_id, account) == 10
    # Until the expiry job closes it, Redis keeps what the ledger says is left.
    assert balances.reconcile(billed.tenant_id) == ([], False)


def packages_held(tenant_id: uuid.UUID) -> dict[str, int]:
    return {a: n for a, n in live(tenant_id).items() if a.startswith("package:")}


def expiries(tenant_id: uuid.UUID) -> list[tuple[str, int, str, str]]:
    return [(e.account, e.credits, e.cause_type, e.cause_id) for e in db.session.scalars(
        select(LedgerEntry).where(LedgerEntry.tenant_id == tenant_id,
                                  LedgerEntry.kind == EntryKind.EXPIRY))]


# --- duplicate usage events ---------------------------------------------------------------------


def test_a_usage_event_written_twice_is_counted_once(committed_app: Any) -> None:
    billed = billed_tenant(allowance=4)
    whole_months(billed)
    package = buy_package(billed.tenant_id, 20)
    account = ledger.package_account(package.id)
    event = run(lambda hook: serve(hook, billed, 420))  # 6: allowance 4, package 2
    stream = usage_stream(billed.tenant_id)
    [(_, fields)] = entries(billed.tenant_id)
    get_redis().xadd(stream, fields)  # a broker retried its append
    assert get_redis().xlen(stream) == 2

    drain(committed_app)
    assert get_redis().xlen(stream) == 0
    assert db.session.scalar(select(func.count()).select_from(UsageEventRecord).where(
        UsageEventRecord.request_id == event.request_id)) == 1
    consumption = db.session.scalars(select(LedgerEntry).where(
        LedgerEntry.tenant_id == billed.tenant_id, LedgerEntry.kind == EntryKind.CONSUMPTION,
        LedgerEntry.cause_id == usage_cause(event))).all()
    assert sorted((e.account, e.credits) for e in consumption) == sorted(
        (a, -c) for a, c in event.credit_split.items())
    assert ledger.balance(billed.tenant_id, account) == 18 == live(billed.tenant_id)[account]
    month = utcnow().strftime("%Y-%m")
    allowance = ledger.allowance_account(billed.devices[0].id, month)
    assert sorted(e.credits for e in ledger.entries(billed.tenant_id, allowance)) == [-4, 4]
    assert balances.reconcile(billed.tenant_id) == ([], False)

    # The same event in a later batch (a writer retried after a crash) changes nothing.
    get_redis().xadd(stream, fields)
    drain(committed_app)
    assert ledger.balance(billed.tenant_id, account) == 18
    assert sorted(e.credits for e in ledger.entries(billed.tenant_id, allowance)) == [-4, 4]


# --- the invariant --------------------------------------------------------------------------------

steps = st.lists(st.one_of(
    st.tuples(st.just("buy"), st.integers(1, 12), st.integers(1, 90)),  # credits, days
    st.tuples(st.just("use"), st.integers(0, 700), st.integers(1, 2500)),  # output, input
    st.tuples(st.just("expire"), st.integers(1, 90), st.just(0)),  # in days from now
), min_size=1, max_size=8)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(allowance=st.integers(0, 6), overage=st.one_of(st.none(), st.integers(0, 10)),
       devices=st.integers(1, 2), steps=steps)
def test_ledger_balances_equal_redis_after_the_writer_drained(
        committed_app: Any, allowance: int, overage: int | None, devices: int,
        steps: list[tuple[str, int, int]]) -> None:
    billed = billed_tenant(devices=devices, allowance=allowance)
    if overage is not None:
        allow_overage(billed.tenant_id, cap=overage)
    events: list[UsageEvent] = []
    for index, (action, first, second) in enumerate(steps):
        if action == "buy":
            buy_package(billed.tenant_id, first, days=second)
            continue
        if action == "expire":  # the job runs once the usage is in the ledger
            drain(committed_app)
            balances.expire_packages(at=utcnow() + dt.timedelta(days=first))
            db.session.commit()
            continue

        async def one(hook: CreditHook, output: int = first, prompt: int = second,
                      device: int = index % devices) -> UsageEvent | None:
            try:
                return await serve(hook, billed, output, input_tokens=prompt, index=device)
            except Exception as exc:  # refused at admission: nothing reserved or spent
                assert getattr(exc, "code", None) == "quota_exhausted", exc
                return None
        served = run(one)
        if served is not None:
            events.append(served)
    drain(committed_app)

    held = live(billed.tenant_id)
    pending_grants = {a.decode(): int(n) for a, n in billing_state(billed.tenant_id)[2].items()}
    by_kind: dict[str, dict[EntryKind, int]] = {}
    for entry in db.session.scalars(select(LedgerEntry).where(
            LedgerEntry.tenant_id == billed.tenant_id)):
        kinds = by_kind.setdefault(entry.account, {})
        kinds[entry.kind] = kinds.get(entry.kind, 0) + entry.credits
    for account in set(held) | (set(by_kind) - {"overdraft"}):
        kinds = by_kind.get(account, {})
        balance = (kinds.get(EntryKind.GRANT, 0) + kinds.get(EntryKind.CONSUMPTION, 0)
                   + kinds.get(EntryKind.EXPIRY, 0))
        assert balance == ledger.balance(billed.tenant_id, account)
        if account.startswith("overage:"):
            assert -balance == held.get(account, 0), account
            assert overage is not None and -balance <= overage
        elif account.startswith("allowance:") and EntryKind.GRANT not in kinds:
            # Granted in Redis by a request that was refused (nothing served from it yet):
            # the grant reaches the ledger with the first event that spends from it.
            assert not kinds and held[account] == pending_grants[account], account
        else:
            assert balance == held.get(account, 0), account
            assert balance >= 0, account
    spent = sum(e.credits for e in events)
    assert -sum(k.get(EntryKind.CONSUMPTION, 0) for k in by_kind.values()) == spent
    assert balances.reconcile(billed.tenant_id) == ([], False)


def test_the_embedded_profile_repairs_every_minute_what_another_process_paid_for(
        committed_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flask mark-purchase-paid` beside a running embedded `serve` writes its own in-memory
    Redis: the serve process's repair job loads the package."""
    from billing import tasks

    assert tasks.repair_embedded_balances not in [job for _, job in
                                                  tasks.periodic_jobs(committed_app.config)]
    monkeypatch.setitem(committed_app.config, "EMBEDDED", True)
    assert (tasks.EMBEDDED_REPAIR_SECONDS, tasks.repair_embedded_balances) in \
        tasks.periodic_jobs(committed_app.config)
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 20)
    keys = billing_keys(committed_app.config["ENSOUL_REDIS_PREFIX"], str(billed.tenant_id))
    get_redis().delete(keys["acct"], keys["pkgs"])  # as if paid in another process
    assert tasks.repair_embedded_balances() >= 1
    assert live(billed.tenant_id) == {ledger.package_account(package.id): 20}
