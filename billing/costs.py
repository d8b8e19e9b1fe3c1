"""A device's cost this month: credits used, their money value and a forecast to month end."""

from __future__ import annotations

import calendar
import datetime as dt
import decimal
import uuid
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sqlalchemy import func, select

from billing.licences import current_licence
from billing.models import PlanPrice
from core.db import db, utcnow
from inference.models import UsageEventRecord

CENT = decimal.Decimal("0.01")


@dataclass(frozen=True, slots=True)
class DeviceCost:
    month: str
    credits: int
    forecast_credits: int
    currency: str
    money_minor: decimal.Decimal | None  # None: the device's plan gives no credit value
    forecast_money_minor: decimal.Decimal | None


def device_cost(device_id: uuid.UUID, timezone: str, currency: str,
                at: dt.datetime | None = None) -> DeviceCost:
    """Credits of the requests admitted this calendar month (the tenant's), valued at the
    credit value of the device's plan in the tenant's currency; the forecast extends the
    month's daily average to its last day."""
    moment = at or utcnow()
    local = moment.astimezone(ZoneInfo(timezone))
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(local.year, local.month)[1]
    credits = int(db.session.scalar(select(func.coalesce(func.sum(UsageEventRecord.credits), 0))
                                    .where(UsageEventRecord.device_id == device_id,
                                           UsageEventRecord.admitted_at
                                           >= start.astimezone(dt.UTC))) or 0)
    elapsed = max((local - start).total_seconds() / 86400, 1 / 24)
    forecast = credits if elapsed >= days else int(credits * days / elapsed)
    licence = current_licence(device_id, moment)
    value = None
    if licence is not None:
        value = db.session.scalar(select(PlanPrice.credit_value_minor).where(
            PlanPrice.plan_id == licence.plan_id, PlanPrice.currency == currency))
    return DeviceCost(
        month=local.strftime("%Y-%m"), credits=credits, forecast_credits=forecast,
        currency=currency,
        money_minor=None if value is None else (value * credits).quantize(CENT),
        forecast_money_minor=None if value is None else (value * forecast).quantize(CENT))
