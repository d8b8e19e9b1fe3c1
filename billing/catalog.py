"""What the platform sells: licence plans with their prices, versioned rate cards, package
offers. Platform administrators run it; tenants only read it."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select

from accounts import services as accounts
from billing.models import (
    MODALITIES,
    DeviceLicence,
    OveragePrice,
    PackageOffer,
    PackageOfferPrice,
    Plan,
    PlanBilling,
    PlanPrice,
    RateCard,
    RateCardRate,
)
from billing.pricing import RateTable, check_metric
from core.db import db, get_by_id, utcnow
from core.errors import Conflict, ValidationFailed


def create_plan(code: str, name: str, *, billing: PlanBilling = PlanBilling.PREPAID,
                term_months: int = 12, grace_days: int = 0, allowance_credits: int = 0,
                requests_per_minute: int = 20, concurrent_streams: int = 2,
                daily_request_cap: int | None = None,
                modalities: list[str] | None = None,
                prices: Mapping[str, tuple[int, decimal.Decimal | str]] | None = None) -> Plan:
    """``prices``: currency -> (seat price in minor units, value of one credit in minor
    units)."""
    if db.session.scalar(select(Plan.id).where(Plan.code == code)) is not None:
        raise Conflict(f"A plan with the code {code!r} exists.")
    chosen = list(MODALITIES if modalities is None else modalities)
    unknown = sorted(set(chosen) - set(MODALITIES))
    if unknown or not chosen:
        raise ValidationFailed(details={"modalities": [
            f"One or more of {', '.join(MODALITIES)}; unknown: {', '.join(unknown)}"]})
    plan = Plan(code=code, name=name, billing=billing, term_months=term_months,
                grace_days=grace_days, allowance_credits=allowance_credits,
                requests_per_minute=requests_per_minute,
                concurrent_streams=concurrent_streams, daily_request_cap=daily_request_cap,
                modalities=chosen)
    db.session.add(plan)
    for currency, (seat_price, credit_value) in sorted((prices or {}).items()):
        plan.prices.append(PlanPrice(currency=currency.upper(), seat_price_minor=seat_price,
                                     credit_value_minor=decimal.Decimal(credit_value)))
    db.session.flush()
    accounts.record_audit("plan.create", tenant_id=None, target=plan,
                          details={"code": code, "currencies": sorted(prices or {})})
    return plan


def plan_price(plan: Plan, currency: str) -> PlanPrice:
    for price in plan.prices:
        if price.currency == currency:
            return price
    raise ValidationFailed(f"The plan {plan.code} is not sold in {currency}.",
                           details={"currency": [f"Not sold in {currency}."]})


def get_plan(plan_id: uuid.UUID | str) -> Plan:
    plan: Plan = get_by_id(Plan, plan_id, "plan")
    return plan


def publish_rate_card(plan: Plan, rates: Mapping[str, tuple[int, int]], *,
                      overage_prices: Mapping[str, decimal.Decimal | str] | None = None,
                      effective_from: dt.datetime | None = None) -> RateCard:
    """A new version of the plan's rate card. ``rates``: metric -> (units per block, credits
    per block); ``overage_prices``: currency -> price of one overage credit in minor units.
    A version cannot take effect in the past: requests already priced keep their version."""
    now = utcnow()
    starts = effective_from or now
    if starts < now - dt.timedelta(seconds=1):
        raise ValidationFailed(details={"effective_from": ["Must not be in the past."]})
    for metric in rates:
        try:
            check_metric(metric)
        except ValueError as exc:
            raise ValidationFailed(details={"rates": [str(exc)]}) from None
    version = (db.session.scalar(select(func.max(RateCard.version))
                                 .where(RateCard.plan_id == plan.id)) or 0) + 1
    card = RateCard(plan_id=plan.id, version=version, effective_from=starts)
    card.rates = [RateCardRate(metric=m, block_units=block, credits_per_block=credits)
                  for m, (block, credits) in sorted(rates.items())]
    card.overage_prices = [OveragePrice(currency=c.upper(),
                                        credit_price_minor=decimal.Decimal(p))
                           for c, p in sorted((overage_prices or {}).items())]
    db.session.add(card)
    db.session.flush()
    _reproject_plan(plan.id)
    accounts.record_audit("rate_card.publish", tenant_id=None, target=card,
                          details={"plan": plan.code, "version": version,
                                   "effective_from": starts.isoformat()})
    return card


def _reproject_plan(plan_id: uuid.UUID) -> None:
    """The devices licensed on the plan carry its current and next card in their profiles."""
    from fleet.access import devices_changed

    by_tenant: dict[uuid.UUID, list[uuid.UUID]] = {}
    for tenant_id, device_id in db.session.execute(
            select(DeviceLicence.tenant_id, DeviceLicence.device_id)
            .where(DeviceLicence.plan_id == plan_id).distinct()):
        by_tenant.setdefault(tenant_id, []).append(device_id)
    for tenant_id, device_ids in by_tenant.items():
        devices_changed(tenant_id, device_ids)


def rate_card_at(plan_id: uuid.UUID, moment: dt.datetime) -> RateCard | None:
    """The version in effect at ``moment``: the newest that had started by then."""
    return db.session.scalars(
        select(RateCard).where(RateCard.plan_id == plan_id, RateCard.effective_from <= moment)
        .order_by(RateCard.effective_from.desc(), RateCard.version.desc()).limit(1)).first()


def rate_table_at(plan_id: uuid.UUID, moment: dt.datetime) -> RateTable | None:
    card = rate_card_at(plan_id, moment)
    return None if card is None else RateTable.from_rate_card(card)


def create_package_offer(code: str, name: str, credits: int, validity_days: int,
                         prices: Mapping[str, int]) -> PackageOffer:
    if db.session.scalar(select(PackageOffer.id).where(PackageOffer.code == code)) is not None:
        raise Conflict(f"A package offer with the code {code!r} exists.")
    offer = PackageOffer(code=code, name=name, credits=credits, validity_days=validity_days)
    offer.prices = [PackageOfferPrice(currency=c.upper(), price_minor=p)
                    for c, p in sorted(prices.items())]
    db.session.add(offer)
    db.session.flush()
    accounts.record_audit("package_offer.create", tenant_id=None, target=offer,
                          details={"code": code, "credits": credits})
    return offer


def get_offer(offer_id: uuid.UUID | str) -> PackageOffer:
    offer: PackageOffer = get_by_id(PackageOffer, offer_id, "package offer")
    return offer


def set_plan_active(plan: Plan, active: bool) -> None:
    """Take a plan off sale or put it back. Only new orders see it: seats already bought,
    licences and their rate cards are untouched."""
    if plan.active is not active:
        plan.active = active
        db.session.flush()
        accounts.record_audit("plan.reactivate" if active else "plan.deactivate",
                              tenant_id=None, target=plan, details={"code": plan.code})


def set_offer_active(offer: PackageOffer, active: bool) -> None:
    """Take a package offer off sale or put it back; packages already bought are untouched."""
    if offer.active is not active:
        offer.active = active
        db.session.flush()
        accounts.record_audit("package_offer.reactivate" if active
                              else "package_offer.deactivate",
                              tenant_id=None, target=offer, details={"code": offer.code})


def offer_price(offer: PackageOffer, currency: str) -> int:
    for price in offer.prices:
        if price.currency == currency:
            return price.price_minor
    raise ValidationFailed(f"The package {offer.code} is not sold in {currency}.",
                           details={"currency": [f"Not sold in {currency}."]})


def describe(plan: Plan) -> dict[str, Any]:
    return {"code": plan.code, "name": plan.name, "billing": plan.billing.value,
            "term_months": plan.term_months, "grace_days": plan.grace_days,
            "allowance_credits": plan.allowance_credits, "modalities": list(plan.modalities)}


DEMO_PLAN = "companion-12m"
DEMO_OFFER = "credits-10k"


def seed_demo_catalogue() -> None:
    """A plan with its rate card and a package offer, so a fresh platform has something to
    sell (the demo; safe to run twice)."""
    if db.session.scalar(select(Plan.id).where(Plan.code == DEMO_PLAN)) is None:
        plan = create_plan(DEMO_PLAN, "Companion, 12 months", term_months=12, grace_days=14,
                           allowance_credits=300, requests_per_minute=20,
                           concurrent_streams=2,
                           prices={"CNY": (9000, "0.7"), "EUR": (1200, "0.1"),
                                   "USD": (1300, "0.1")})
        publish_rate_card(plan, {"input_tokens": (1000, 1), "output_tokens": (1000, 4),
                                 "audio_in_ms": (60_000, 10), "audio_out_ms": (60_000, 5),
                                 "images": (1, 2)},
                          overage_prices={"CNY": "1.0", "EUR": "0.15", "USD": "0.15"})
    if db.session.scalar(select(PackageOffer.id).where(PackageOffer.code == DEMO_OFFER)) is None:
        create_package_offer(DEMO_OFFER, "10,000 credits", 10_000, 90,
                             {"CNY": 6500, "EUR": 900, "USD": 1000})
