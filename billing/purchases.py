"""Buying licence packs and packages: a purchase is created pending (in the tenant's currency,
at the catalogue's price) and takes effect once paid. Payment belongs to the finance issue;
until then a platform administrator marks a purchase paid."""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from sqlalchemy import select

from accounts import services as accounts
from billing import balances, catalog, ledger, licences
from billing.models import (
    CreditPackage,
    EntryKind,
    LicencePack,
    PackageOffer,
    Plan,
    Purchase,
    PurchaseKind,
    PurchaseStatus,
)
from core.db import db, utcnow
from core.errors import Conflict, ValidationFailed
from fleet.access import devices_changed

log = logging.getLogger(__name__)

PACK_ACTIVATION_DAYS = 365  # a pack's seats must be taken within a year of payment
MAX_QUANTITY = 1_000_000


def order_pack(tenant_id: uuid.UUID, currency: str, plan_id: uuid.UUID | str, seats: int, *,
               user_id: uuid.UUID | None = None) -> Purchase:
    plan = catalog.get_plan(plan_id)
    if not plan.active:
        raise ValidationFailed(details={"plan_id": ["This plan is no longer sold."]})
    price = catalog.plan_price(plan, currency)
    return _order(tenant_id, PurchaseKind.LICENCE_PACK, currency, seats,
                  price.seat_price_minor, user_id, plan_id=plan.id)


def order_package(tenant_id: uuid.UUID, currency: str, offer_id: uuid.UUID | str,
                  quantity: int = 1, *, user_id: uuid.UUID | None = None) -> Purchase:
    offer = catalog.get_offer(offer_id)
    return _order(tenant_id, PurchaseKind.PACKAGE, currency, quantity,
                  catalog.offer_price(offer, currency), user_id, offer_id=offer.id)


def _order(tenant_id: uuid.UUID, kind: PurchaseKind, currency: str, quantity: int,
           unit_price: int, user_id: uuid.UUID | None, **item: uuid.UUID) -> Purchase:
    if not 0 < quantity <= MAX_QUANTITY:
        raise ValidationFailed(details={"quantity": [f"Between 1 and {MAX_QUANTITY:,}."]})
    purchase = Purchase(tenant_id=tenant_id, kind=kind, quantity=quantity, currency=currency,
                        unit_price_minor=unit_price, amount_minor=unit_price * quantity,
                        created_by_id=user_id, **item)
    db.session.add(purchase)
    db.session.flush()
    accounts.record_audit("purchase.create", tenant_id=tenant_id, target=purchase,
                          details={"kind": kind.value, "quantity": quantity,
                                   "amount_minor": purchase.amount_minor,
                                   "currency": currency})
    return purchase


def mark_paid(purchase: Purchase, *, user_id: uuid.UUID | None = None,
              at: dt.datetime | None = None) -> list[uuid.UUID]:
    """Deliver what was bought; returns the devices that received a seat on the way
    (unlicensed active devices, oldest activation first). The purchase's row is locked first:
    two administrators marking it paid at once deliver it once."""
    db.session.refresh(purchase, with_for_update=True)
    if purchase.status is PurchaseStatus.PAID:
        return []  # marking it paid again delivers nothing twice
    if purchase.status is not PurchaseStatus.PENDING:
        raise Conflict(f"A {purchase.status.value} purchase cannot be paid.")
    moment = at or utcnow()
    purchase.status = PurchaseStatus.PAID
    purchase.paid_at = moment
    purchase.paid_by_id = user_id
    licensed: list[uuid.UUID] = []
    if purchase.kind is PurchaseKind.LICENCE_PACK:
        assert purchase.plan_id is not None
        db.session.add(LicencePack(
            tenant_id=purchase.tenant_id, plan_id=purchase.plan_id, purchase_id=purchase.id,
            seats=purchase.quantity,
            activation_deadline=moment + dt.timedelta(days=PACK_ACTIVATION_DAYS)))
        db.session.flush()
        licensed = licences.assign_waiting(purchase.tenant_id, at=moment)
        if licensed:
            devices_changed(purchase.tenant_id, licensed)  # their profiles gain the licence
    else:
        bought = []
        assert purchase.offer_id is not None
        offer = catalog.get_offer(purchase.offer_id)
        for index in range(purchase.quantity):
            package = CreditPackage(
                tenant_id=purchase.tenant_id, offer_id=offer.id, purchase_id=purchase.id,
                name=offer.name, credits=offer.credits, starts_at=moment,
                expires_at=moment + dt.timedelta(days=offer.validity_days))
            db.session.add(package)
            db.session.flush()
            bought.append(package)
            ledger.post(purchase.tenant_id, [ledger.Movement(
                ledger.package_account(package.id), EntryKind.GRANT, offer.credits,
                "purchase", f"{purchase.id}:{index}", actor_user_id=user_id)])
        balances.load_packages_after_commit(purchase.tenant_id, bought)
    accounts.record_audit("purchase.paid", tenant_id=purchase.tenant_id, target=purchase,
                          details={"kind": purchase.kind.value, "licensed": len(licensed)})
    db.session.flush()
    return licensed


def cancel(purchase: Purchase) -> None:
    db.session.refresh(purchase, with_for_update=True)  # not while it is being paid
    if purchase.status is PurchaseStatus.CANCELLED:
        return
    if purchase.status is not PurchaseStatus.PENDING:
        raise Conflict("Only a pending purchase can be cancelled.")
    purchase.status = PurchaseStatus.CANCELLED
    purchase.cancelled_at = utcnow()
    accounts.record_audit("purchase.cancel", tenant_id=purchase.tenant_id, target=purchase)
    db.session.flush()


def packs(tenant_id: uuid.UUID) -> list[LicencePack]:
    return list(db.session.scalars(select(LicencePack).where(LicencePack.tenant_id == tenant_id)
                                   .order_by(LicencePack.activation_deadline)))


DEMO_SEATS = 50


def seed_demo_tenant(tenant_id: uuid.UUID, currency: str) -> None:
    """Seats and a package for the demo tenant, paid, so its simulated devices are served
    (safe to run twice)."""
    from billing.catalog import DEMO_OFFER, DEMO_PLAN

    if not packs(tenant_id):
        plan = db.session.scalar(select(Plan).where(Plan.code == DEMO_PLAN))
        if plan is not None:
            mark_paid(order_pack(tenant_id, currency, plan.id, DEMO_SEATS))
    if db.session.scalar(select(CreditPackage.id).where(CreditPackage.tenant_id == tenant_id)
                         .limit(1)) is None:
        offer = db.session.scalar(select(PackageOffer).where(PackageOffer.code == DEMO_OFFER))
        if offer is not None:
            mark_paid(order_package(tenant_id, currency, offer.id, 1))
