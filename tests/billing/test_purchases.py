"""Purchases: priced from the catalogue in the tenant's currency, pending until paid, paid
once; a package's credits are granted in the ledger."""

from __future__ import annotations

import datetime as dt
import decimal
import threading
from typing import Any

import pytest
from sqlalchemy import select, text

from accounts.models import AuditEntry
from billing import catalog, ledger, purchases
from billing.models import (
    CreditPackage,
    EntryKind,
    PlanBilling,
    Purchase,
    PurchaseKind,
    PurchaseStatus,
)
from core.db import db, utcnow
from core.errors import Conflict, NotFound, ValidationFailed
from tests.billing.helpers import make_offer, make_plan
from tests.fleet.fixtures import Vendor, make_vendor
from tests.support.waiting import wait_until


def test_a_pack_is_priced_per_seat_in_the_tenants_currency(vendor: Vendor) -> None:
    plan = make_plan(prices={"EUR": (1250, "0.1"), "CNY": (9000, "0.7")})
    purchase = purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, 40)
    assert (purchase.kind, purchase.status) == (PurchaseKind.LICENCE_PACK,
                                                PurchaseStatus.PENDING)
    assert (purchase.unit_price_minor, purchase.amount_minor) == (1250, 50_000)
    assert purchases.packs(vendor.setup.tenant.id) == []  # nothing until it is paid


@pytest.mark.parametrize("seats", [0, -1, 1_000_001])
def test_quantities_must_be_positive_and_bounded(vendor: Vendor, seats: int) -> None:
    plan = make_plan()
    with pytest.raises(ValidationFailed) as refused:
        purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, seats)
    assert "quantity" in refused.value.details


def test_a_currency_the_plan_is_not_sold_in_is_refused(vendor: Vendor) -> None:
    plan = make_plan(prices={"CNY": (9000, "0.7")})
    with pytest.raises(ValidationFailed) as refused:
        purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, 1)
    assert refused.value.details == {"currency": ["Not sold in EUR."]}
    offer = make_offer()
    with pytest.raises(ValidationFailed):
        purchases.order_package(vendor.setup.tenant.id, "USD", offer.id)


def test_unknown_plans_and_offers_are_not_found(vendor: Vendor) -> None:
    with pytest.raises(NotFound):
        purchases.order_pack(vendor.setup.tenant.id, "EUR", "not-a-uuid", 1)
    with pytest.raises(NotFound):
        purchases.order_package(vendor.setup.tenant.id, "EUR",
                                "0190a5d0-0000-7000-8000-000000000000")


def test_a_retired_plan_is_no_longer_sold(vendor: Vendor) -> None:
    plan = make_plan()
    plan.active = False
    db.session.commit()
    with pytest.raises(ValidationFailed):
        purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, 1)


def test_paying_a_package_grants_its_credits_once(vendor: Vendor) -> None:
    offer = make_offer(credits=5000, validity_days=30)
    tenant_id = vendor.setup.tenant.id
    purchase = purchases.order_package(tenant_id, "EUR", offer.id, 2)
    before = utcnow()
    purchases.mark_paid(purchase)
    purchases.mark_paid(purchase)  # twice: delivered once
    db.session.commit()

    rows = list(db.session.scalars(select(CreditPackage).where(
        CreditPackage.purchase_id == purchase.id)))
    assert len(rows) == 2
    for package in rows:
        assert package.credits == 5000
        assert package.expires_at - package.starts_at == dt.timedelta(days=30)
        assert package.starts_at >= before
        assert ledger.balance(tenant_id, ledger.package_account(package.id)) == 5000
        [grant] = ledger.entries(tenant_id, ledger.package_account(package.id))
        assert (grant.kind, grant.cause_type) == (EntryKind.GRANT, "purchase")
    assert purchase.status is PurchaseStatus.PAID and purchase.paid_at is not None
    audits = db.session.scalars(select(AuditEntry.action).where(
        AuditEntry.target_id == str(purchase.id))).all()
    assert sorted(audits) == ["purchase.create", "purchase.paid"]


def test_a_cancelled_purchase_cannot_be_paid_and_a_paid_one_cannot_be_cancelled(
        vendor: Vendor) -> None:
    plan = make_plan()
    cancelled = purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, 1)
    purchases.cancel(cancelled)
    with pytest.raises(Conflict):
        purchases.mark_paid(cancelled)
    paid = purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, 1)
    purchases.mark_paid(paid)
    with pytest.raises(Conflict):
        purchases.cancel(paid)


def test_plans_and_rate_cards(vendor: Vendor) -> None:
    plan = make_plan(billing=PlanBilling.PREPAID, modalities=["text", "voice"])
    assert [p.currency for p in plan.prices] == ["CNY", "EUR"]
    assert catalog.plan_price(plan, "EUR").credit_value_minor == decimal.Decimal("0.1")
    assert catalog.rate_table_at(plan.id, utcnow()) is None

    first = catalog.publish_rate_card(plan, {"output_tokens": (1000, 4)},
                                      overage_prices={"EUR": "0.15"})
    later = utcnow() + dt.timedelta(days=1)
    second = catalog.publish_rate_card(plan, {"output_tokens": (1000, 5)}, effective_from=later)
    db.session.commit()
    assert (first.version, second.version) == (1, 2)
    now_table = catalog.rate_table_at(plan.id, utcnow())
    assert now_table is not None and now_table.price({"output_tokens": 1500}) == 8
    later_table = catalog.rate_table_at(plan.id, later)
    assert later_table is not None and later_table.price({"output_tokens": 1500}) == 10

    with pytest.raises(ValidationFailed):
        catalog.publish_rate_card(plan, {"seconds": (1, 1)})
    with pytest.raises(ValidationFailed):
        catalog.publish_rate_card(plan, {"output_tokens": (1, 1)},
                                  effective_from=utcnow() - dt.timedelta(hours=1))
    with pytest.raises(ValidationFailed):
        make_plan(modalities=["telepathy"])
    with pytest.raises(Conflict):
        catalog.create_plan(plan.code, "again")


def test_two_admins_paying_at_once_deliver_once(committed_app: Any) -> None:
    """Real concurrency: the first payment holds the purchase's row while the second waits on
    it (seen in pg_stat_activity), then finds it paid and delivers nothing."""
    seller = make_vendor()
    offer = make_offer(credits=1000)
    purchase = purchases.order_package(seller.setup.tenant.id, "EUR", offer.id, 1)
    db.session.commit()
    first_holds, second_waits = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def pay(hold: bool) -> None:
        try:
            with committed_app.app_context():
                purchases.mark_paid(db.session.get(Purchase, purchase.id))
                if hold:
                    first_holds.set()
                    assert second_waits.wait(20), "the second payment never waited"
                db.session.commit()
                db.session.remove()
        except BaseException as exc:  # reported below
            errors.append(exc)

    first = threading.Thread(target=pay, args=(True,))
    first.start()
    assert first_holds.wait(20), errors
    second = threading.Thread(target=pay, args=(False,))
    second.start()
    engine = committed_app.extensions["ensoul_db_engine"]
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
            wait_until(lambda: watcher.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()")).scalar(), 10,
                what="the second payment to wait for the purchase's lock")
    finally:
        second_waits.set()
        first.join(30)
        second.join(30)
    assert errors == []
    db.session.expire_all()
    packages = db.session.scalars(select(CreditPackage).where(
        CreditPackage.purchase_id == purchase.id)).all()
    assert len(packages) == 1
    assert ledger.balance(seller.setup.tenant.id, ledger.package_account(packages[0].id)) == 1000
