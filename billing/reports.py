"""What the billing pages show of a tenant's licences and packages: devices without a seat,
licences about to end, and each package's balance day by day (read-only, from the rows the
other billing modules write).

Days are the tenant's calendar days: a :class:`DayWindow` holds the UTC instants of their
local midnights, so a day of a daylight-saving change is 23 or 25 hours long, and SQL buckets
rows by comparing timestamps with those instants (the same on Postgres and SQLite).
"""

from __future__ import annotations

import datetime as dt
import uuid
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Case, case, exists, func, select
from sqlalchemy.orm import aliased

from billing import ledger
from billing.licences import has_live_licence
from billing.models import CreditPackage, DeviceLicence, LedgerEntry
from core.db import db, utcnow
from fleet.models import Device, DeviceStatus

DAYS = 30
ENDING_WITHIN = dt.timedelta(days=30)
LISTED = 100  # devices listed per section; the count says how many there are


@dataclass(frozen=True, slots=True)
class DayWindow:
    """The last ``len(days)`` calendar days in a time zone, today included. ``bounds`` has one
    more instant than ``days``: day ``i`` runs from ``bounds[i]`` to ``bounds[i + 1]``."""

    days: tuple[dt.date, ...]
    bounds: tuple[dt.datetime, ...]

    @classmethod
    def ending_today(cls, timezone: str, days: int = DAYS,
                     now: dt.datetime | None = None) -> DayWindow:
        zone = zoneinfo.ZoneInfo(timezone)
        today = (now or utcnow()).astimezone(zone).date()
        dates = tuple(today - dt.timedelta(days=days - 1 - i) for i in range(days))
        edges = (*dates, today + dt.timedelta(days=1))
        return cls(dates, tuple(dt.datetime.combine(d, dt.time(), zone).astimezone(dt.UTC)
                                for d in edges))

    @property
    def start(self) -> dt.datetime:
        return self.bounds[0]

    @property
    def end(self) -> dt.datetime:
        return self.bounds[-1]

    def contains(self, column: Any) -> Any:
        return (column >= self.start) & (column < self.end)

    def day_of(self, column: Any) -> Case[Any]:
        """The index of the day ``column`` falls in (for rows :meth:`contains` selects)."""
        return case(*((column < bound, index) for index, bound in enumerate(self.bounds[1:])))


def month_start(timezone: str, now: dt.datetime | None = None) -> dt.datetime:
    """The first instant of the current calendar month in the time zone."""
    zone = zoneinfo.ZoneInfo(timezone)
    today = (now or utcnow()).astimezone(zone).date()
    return dt.datetime.combine(today.replace(day=1), dt.time(), zone).astimezone(dt.UTC)


def unlicensed_devices(tenant_id: uuid.UUID, *, at: dt.datetime | None = None,
                       limit: int = LISTED) -> tuple[list[Device], int]:
    """Active devices holding no licence in term or grace (inference refuses them once
    enforcement is on), oldest activation first as seats reach them, and how many there are."""
    moment = at or utcnow()
    where = (Device.tenant_id == tenant_id, Device.status == DeviceStatus.ACTIVE,
             ~has_live_licence(Device.id, moment))
    total = db.session.scalar(select(func.count()).select_from(Device).where(*where)) or 0
    devices = db.session.scalars(select(Device).where(*where)
                                 .order_by(Device.activated_at, Device.id).limit(limit))
    return list(devices), total


def licences_ending(tenant_id: uuid.UUID, *, at: dt.datetime | None = None,
                    within: dt.timedelta = ENDING_WITHIN, limit: int = LISTED
                    ) -> tuple[list[tuple[DeviceLicence, Device]], int]:
    """Live licences whose term ends within ``within`` (or ended, in their grace) with no
    renewal after them, soonest first, on devices not retired; and how many there are."""
    moment = at or utcnow()
    later = aliased(DeviceLicence)
    where = (DeviceLicence.tenant_id == tenant_id, DeviceLicence.starts_at <= moment,
             DeviceLicence.grace_ends_at > moment, DeviceLicence.ends_at <= moment + within,
             Device.status != DeviceStatus.RETIRED,
             ~exists().where(later.device_id == DeviceLicence.device_id,
                             later.ends_at > DeviceLicence.ends_at))
    on_device = Device.id == DeviceLicence.device_id
    total = db.session.scalar(select(func.count()).select_from(DeviceLicence)
                              .join(Device, on_device).where(*where)) or 0
    rows = db.session.execute(select(DeviceLicence, Device).join(Device, on_device)
                              .where(*where).order_by(DeviceLicence.ends_at, Device.serial)
                              .limit(limit))
    return [(licence, device) for licence, device in rows], total


def packages(tenant_id: uuid.UUID) -> list[CreditPackage]:
    """The tenant's packages, the newest first."""
    return list(db.session.scalars(select(CreditPackage).where(
        CreditPackage.tenant_id == tenant_id).order_by(CreditPackage.starts_at.desc(),
                                                       CreditPackage.id.desc())))


def package_balances(tenant_id: uuid.UUID) -> dict[uuid.UUID, int]:
    """Every package's balance now, in one query (:func:`billing.ledger.balance` per
    package, summed for all of them at once)."""
    prefix = ledger.package_account("")
    return {uuid.UUID(account.removeprefix(prefix)): credits
            for account, credits in ledger.balances(tenant_id, prefix).items()}


def burn_down(tenant_id: uuid.UUID, chosen: Sequence[CreditPackage],
              window: DayWindow) -> dict[uuid.UUID, list[int]]:
    """Per package, its ledger balance at the end of each day of the window (today: now)."""
    accounts = {ledger.package_account(p.id): p.id for p in chosen}
    if not accounts:
        return {}
    mine = (LedgerEntry.tenant_id == tenant_id, LedgerEntry.account.in_(accounts))
    opening: dict[str, int] = {account: int(total) for account, total in db.session.execute(
        select(LedgerEntry.account, func.sum(LedgerEntry.credits))
        .where(*mine, LedgerEntry.created_at < window.start).group_by(LedgerEntry.account))}
    moves = select(LedgerEntry.account, window.day_of(LedgerEntry.created_at).label("day"),
                   LedgerEntry.credits).where(*mine, window.contains(LedgerEntry.created_at)
                                              ).subquery()
    per_day: dict[tuple[str, int], int] = {
        (account, day): int(total) for account, day, total in db.session.execute(
            select(moves.c.account, moves.c.day, func.sum(moves.c.credits))
            .group_by(moves.c.account, moves.c.day))}
    series: dict[uuid.UUID, list[int]] = {}
    for account, package_id in accounts.items():
        balance = opening.get(account, 0)
        points = []
        for day in range(len(window.days)):
            balance += per_day.get((account, day), 0)
            points.append(balance)
        series[package_id] = points
    return series
