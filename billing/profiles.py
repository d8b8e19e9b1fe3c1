"""Billing's part of a device's profile: what the credit hook checks without Postgres.

:func:`licence_parts` runs in the profile projection (web and worker processes, after the
registry commits). For each device it describes its licence (state, term, grace, modalities,
allowance, the plan's limits), the rate card in effect and the next one if it is already
published, and the tenant's overage limit. A licence renewed ahead of time (one starting where
the previous ends) extends the window, so a renewal needs no projection at the moment it starts.
"""

from __future__ import annotations

import calendar
import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.models import BillingPolicy, DeviceLicence, Plan, RateCard
from billing.pricing import RateTable
from core.db import utcnow
from fleet.models import Device

NO_OVERAGE = -1
POSTPAID_UNTIL = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)  # a postpaid licence has no term
UNCAPPED_OVERAGE = 2**50


def prorated_allowance(allowance: int, starts_at: dt.datetime, zone: ZoneInfo) -> int:
    """The first month's allowance: the share of the month's days from the activation day
    (included), rounded down."""
    local = starts_at.astimezone(zone)
    days = calendar.monthrange(local.year, local.month)[1]
    return allowance * (days - local.day + 1) // days


def overage_limit(policy: BillingPolicy | None) -> int:
    if policy is None or not policy.overage_allowed:
        return NO_OVERAGE
    return UNCAPPED_OVERAGE if policy.overage_cap_credits is None else policy.overage_cap_credits


def _card(card: RateCard) -> dict[str, Any]:
    table = RateTable.from_rate_card(card)
    return {"version": table.version, "rates": table.as_dict()["rates"]}


def _cards(session: Session, plan_ids: Iterable[uuid.UUID], now: dt.datetime
           ) -> dict[uuid.UUID, tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Per plan: the card in effect now, and the next one (with its start) if published."""
    found: dict[uuid.UUID, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {}
    for plan_id in plan_ids:
        cards = list(session.scalars(select(RateCard).where(RateCard.plan_id == plan_id)
                                     .order_by(RateCard.effective_from, RateCard.version)))
        current = [c for c in cards if c.effective_from <= now]
        upcoming = [c for c in cards if c.effective_from > now]
        following = None
        if upcoming:
            following = {**_card(upcoming[0]),
                         "from": _epoch(upcoming[0].effective_from)}
        found[plan_id] = (_card(current[-1]) if current else None, following)
    return found


def _epoch(moment: dt.datetime) -> float:
    return moment.replace(tzinfo=dt.UTC).timestamp() if moment.tzinfo is None \
        else moment.timestamp()


def licence_parts(session: Session, tenant_id: uuid.UUID, device_ids: list[uuid.UUID],
                  timezone: str) -> dict[str, dict[str, Any]]:
    """Device id -> its ``licence`` part (``{"state": "none"}`` for a device without one)."""
    now = utcnow()
    zone = ZoneInfo(timezone)
    rows = list(session.scalars(select(DeviceLicence).where(
        DeviceLicence.tenant_id == tenant_id, DeviceLicence.device_id.in_(device_ids))
        .order_by(DeviceLicence.starts_at)))
    by_device: dict[uuid.UUID, list[DeviceLicence]] = {}
    for row in rows:
        by_device.setdefault(row.device_id, []).append(row)
    plans = {p.id: p for p in session.scalars(select(Plan).where(
        Plan.id.in_({row.plan_id for row in rows})))} if rows else {}
    cards = _cards(session, plans, now)
    policy = session.scalar(select(BillingPolicy).where(BillingPolicy.tenant_id == tenant_id))
    limit = overage_limit(policy)
    postpaid = session.get(Plan, policy.postpaid_plan_id) \
        if policy is not None and policy.postpaid_plan_id is not None else None
    if postpaid is not None:
        cards.update(_cards(session, [postpaid.id], now))
    activated = {device_id: at for device_id, at in session.execute(
        select(Device.id, Device.activated_at).where(Device.id.in_(device_ids)))} \
        if postpaid is not None else {}
    parts: dict[str, dict[str, Any]] = {}
    for device_id in device_ids:
        chain = by_device.get(device_id, [])
        live = [row for row in chain if row.grace_ends_at > now]
        if not live and postpaid is not None:  # licensed by the postpaid plan, no seat
            starts = (activated.get(device_id) or now).astimezone(dt.UTC)
            parts[str(device_id)] = _part(postpaid, cards[postpaid.id], starts,
                                          POSTPAID_UNTIL, POSTPAID_UNTIL, zone, limit)
            continue
        if not live:
            parts[str(device_id)] = {"state": "expired" if chain else "none"}
            continue
        first = live[0]
        window_end = first
        for row in live[1:]:  # renewals that start before the window ends extend it
            if row.starts_at <= window_end.ends_at:
                window_end = row
        parts[str(device_id)] = _part(plans[first.plan_id], cards[first.plan_id],
                                      first.starts_at, window_end.ends_at,
                                      window_end.grace_ends_at, zone, limit)
    return parts


def _part(plan: Plan, cards: tuple[dict[str, Any] | None, dict[str, Any] | None],
          starts: dt.datetime, ends: dt.datetime, grace_ends: dt.datetime, zone: ZoneInfo,
          limit: int) -> dict[str, Any]:
    current, following = cards
    start_utc = starts.replace(tzinfo=dt.UTC) if starts.tzinfo is None else starts
    part: dict[str, Any] = {
        "state": "licensed", "plan": plan.code, "billing": plan.billing.value,
        "starts": _epoch(starts), "ends": _epoch(ends), "grace_ends": _epoch(grace_ends),
        "modalities": list(plan.modalities), "allowance": plan.allowance_credits,
        "first_month": start_utc.astimezone(zone).strftime("%Y-%m"),
        "first_month_allowance": prorated_allowance(plan.allowance_credits, start_utc, zone),
        "limits": {"requests_per_minute": plan.requests_per_minute,
                   "concurrent_streams": plan.concurrent_streams,
                   "daily_request_cap": plan.daily_request_cap},
        "rates": current or {"version": None, "rates": {}},
        "overage_limit": limit,
    }
    if following is not None:
        part["next_rates"] = following
    return part
