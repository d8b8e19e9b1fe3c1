"""Postpaid per-device billing, and the month's statement of what is billed in arrears.

A tenant whose policy names a postpaid plan (``BillingPolicy.postpaid_plan_id``) needs no
seats: every active device without a prepaid licence is licensed under that plan, with the
same allowance, limits and hot path, and is billed monthly in arrears by **licensed
device-days**: each calendar day (the tenant's) on which the device was active at some moment
counts once. The plan's price in the tenant's currency (``seat_price_minor``) is the price of
one device for a whole month, so a month's charge is ``device_days * price / days_in_month``,
rounded half-even to the minor unit. Overage credits of the month are priced at the rate
card's overage price.
"""

from __future__ import annotations

import calendar
import datetime as dt
import decimal
import uuid
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sqlalchemy import select

from billing import ledger
from billing.licences import has_live_licence
from billing.models import BillingPolicy, OveragePrice, Plan, PlanBilling, PlanPrice, RateCard
from core.db import db, get_by_id, utcnow
from core.errors import ValidationFailed
from fleet.models import Device, DeviceEvent

# Events that start or end a device's active time (fleet/services.py).
STARTS = {"activated", "resume"}
ENDS = {"suspend", "retire", "reset"}


def postpaid_plan(tenant_id: uuid.UUID) -> Plan | None:
    plan_id = db.session.scalar(select(BillingPolicy.postpaid_plan_id).where(
        BillingPolicy.tenant_id == tenant_id))
    return None if plan_id is None else db.session.get(Plan, plan_id)


def check_postpaid_plan(plan_id: uuid.UUID, currency: str) -> Plan:
    plan = get_by_id(Plan, plan_id, "plan")  # an unknown plan: 404, as in orders
    if plan.billing is not PlanBilling.POSTPAID or not plan.active:
        raise ValidationFailed("Not a postpaid plan on sale.",
                               details={"postpaid_plan_id": ["Not a postpaid plan on sale."]})
    if not any(price.currency == currency for price in plan.prices):
        raise ValidationFailed(f"The plan is not sold in {currency}.",
                               details={"postpaid_plan_id": [f"Not sold in {currency}."]})
    return plan


def _local_days(start: dt.datetime, end: dt.datetime, zone: ZoneInfo) -> set[dt.date]:
    """The tenant's calendar days that [start, end) touches."""
    first = start.astimezone(zone).date()
    last = (end - dt.timedelta(microseconds=1)).astimezone(zone).date()
    return {first + dt.timedelta(days=n) for n in range((last - first).days + 1)}


def device_days(tenant_id: uuid.UUID, month: str, timezone: str,
                at: dt.datetime | None = None) -> dict[uuid.UUID, int]:
    """Per device: the days of ``month`` (``YYYY-MM``, the tenant's) it was active, from the
    devices' history. Devices holding a prepaid licence are not counted on postpaid."""
    zone = ZoneInfo(timezone)
    year, number = (int(part) for part in month.split("-"))
    month_start = dt.datetime(year, number, 1, tzinfo=zone)
    days_in_month = calendar.monthrange(year, number)[1]
    month_end = month_start + dt.timedelta(days=days_in_month)
    now = at or utcnow()
    end_of_view = min(month_end, now)
    prepaid = set(db.session.scalars(select(Device.id).where(
        Device.tenant_id == tenant_id, has_live_licence(Device.id, end_of_view))))
    active_since: dict[uuid.UUID, dt.datetime] = {}
    days: dict[uuid.UUID, set[dt.date]] = {}
    events = db.session.execute(
        select(DeviceEvent.device_id, DeviceEvent.kind, DeviceEvent.created_at)
        .where(DeviceEvent.tenant_id == tenant_id, DeviceEvent.created_at < end_of_view,
               DeviceEvent.kind.in_(STARTS | ENDS))
        .order_by(DeviceEvent.created_at, DeviceEvent.id))
    for device_id, kind, moment in events:
        if kind in STARTS:
            active_since.setdefault(device_id, moment)
        elif device_id in active_since:
            since = max(active_since.pop(device_id), month_start)
            if moment > since:
                days.setdefault(device_id, set()).update(_local_days(since, moment, zone))
    for device_id, since in active_since.items():  # still active
        start = max(since, month_start)
        if end_of_view > start:
            days.setdefault(device_id, set()).update(_local_days(start, end_of_view, zone))
    return {device_id: len(dates) for device_id, dates in days.items()
            if device_id not in prepaid and dates}


@dataclass(frozen=True, slots=True)
class Statement:
    month: str
    currency: str
    plan_code: str | None
    device_days: int
    devices: int
    days_in_month: int
    device_month_price_minor: int | None
    device_days_amount_minor: int
    overage_credits: int
    overage_credit_price_minor: decimal.Decimal | None
    overage_amount_minor: int

    @property
    def total_minor(self) -> int:
        return self.device_days_amount_minor + self.overage_amount_minor


def _minor(value: decimal.Decimal) -> int:
    return int(value.quantize(decimal.Decimal(1), rounding=decimal.ROUND_HALF_EVEN))


def statement(tenant_id: uuid.UUID, month: str, timezone: str, currency: str,
              at: dt.datetime | None = None) -> Statement:
    """What the month bills in arrears: postpaid device-days and overage (so far, for the
    current month)."""
    year, number = (int(part) for part in month.split("-"))
    days_in_month = calendar.monthrange(year, number)[1]
    plan = postpaid_plan(tenant_id)
    price = None
    counted: dict[uuid.UUID, int] = {}
    if plan is not None:
        price = db.session.scalar(select(PlanPrice.seat_price_minor).where(
            PlanPrice.plan_id == plan.id, PlanPrice.currency == currency))
        counted = device_days(tenant_id, month, timezone, at)
    total_days = sum(counted.values())
    amount = _minor(decimal.Decimal(total_days * (price or 0)) / days_in_month)
    overage = -ledger.balance(tenant_id, ledger.overage_account(month))
    overage_price = _overage_price(tenant_id, currency)
    overage_amount = _minor(overage * overage_price) if overage_price is not None else 0
    return Statement(month, currency, plan.code if plan else None, total_days, len(counted),
                     days_in_month, price, amount, overage, overage_price, overage_amount)


def _overage_price(tenant_id: uuid.UUID, currency: str) -> decimal.Decimal | None:
    """The overage price of the tenant's plan: the postpaid one, else the plan of its newest
    pack, at its newest rate card."""
    from billing.models import LicencePack

    plan = postpaid_plan(tenant_id)
    plan_id = plan.id if plan is not None else db.session.scalar(
        select(LicencePack.plan_id).where(LicencePack.tenant_id == tenant_id)
        .order_by(LicencePack.created_at.desc()).limit(1))
    if plan_id is None:
        return None
    return db.session.scalar(
        select(OveragePrice.credit_price_minor).join(
            RateCard, RateCard.id == OveragePrice.rate_card_id)
        .where(RateCard.plan_id == plan_id, OveragePrice.currency == currency)
        .order_by(RateCard.effective_from.desc(), RateCard.version.desc()).limit(1))
