"""Billing notifications: packages running low, no free seat left, a licence about to end.

The periodic jobs (``billing.notification_tasks``) evaluate each condition for every tenant at
once, in a handful of set-based queries, and turn its changes into rows:

- a condition that starts to hold creates a :class:`Notification` (and a webhook delivery);
- while it holds nothing more happens (its ``open_key`` is taken, so a second scheduler or a
  second run cannot create it twice);
- when it stops holding the notification is cleared, and the next crossing notifies again.

A licence's notification is never cleared: one per licence. Services flush; the job commits.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import case, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased

from billing import ledger, webhooks
from billing.licences import has_live_licence
from billing.models import (
    BillingPolicy,
    CreditPackage,
    DeviceLicence,
    LicencePack,
    Notification,
)
from core.db import db, utcnow
from core.ids import uuid7
from fleet.models import Device, DeviceStatus

PACKAGES_LOW = "packages.low"
SEATS_EXHAUSTED = "seats.exhausted"
LICENCE_ENDING = "licence.ending"
TYPES = (PACKAGES_LOW, SEATS_EXHAUSTED, LICENCE_ENDING)
LOW_PERCENTS = (20, 5)
ENDING_WITHIN = dt.timedelta(days=30)
LISTED = 100


def _open(types: Iterable[str]) -> dict[tuple[uuid.UUID, str], Notification]:
    """The notifications whose condition still holds, by (tenant, key)."""
    rows = db.session.scalars(select(Notification).where(
        Notification.type.in_(list(types)), Notification.open_key.is_not(None),
        Notification.cleared_at.is_(None)))
    return {(n.tenant_id, n.key): n for n in rows}


def _notify(tenant_id: uuid.UUID, type_: str, key: str, data: dict[str, Any],
            now: dt.datetime) -> uuid.UUID | None:
    """Create the notification unless one is open for ``key``; queue its webhook."""
    dialect = db.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    notification_id = uuid7()
    created = db.session.execute(insert(Notification).values(
        id=notification_id, tenant_id=tenant_id, type=type_, key=key, open_key=key, data=data,
        created_at=now).on_conflict_do_nothing(index_elements=["tenant_id", "open_key"])
        .returning(Notification.id)).first()
    if created is None:
        return None
    webhooks.queue_event(tenant_id, type_, data, event_id=notification_id, created_at=now,
                         notification_id=notification_id)
    return notification_id


def _clear(notification: Notification, now: dt.datetime) -> None:
    notification.open_key = None
    notification.cleared_at = now


def check_packages(now: dt.datetime | None = None) -> list[uuid.UUID]:
    """Live packages (started, not expired) under 20% and under 5% of the credits they were
    bought with, summed per tenant; the balances are the ledger's. Returns the new ones."""
    moment = now or utcnow()
    bought: dict[uuid.UUID, dict[uuid.UUID, int]] = defaultdict(dict)
    for tenant_id, package_id, credits in db.session.execute(
            select(CreditPackage.tenant_id, CreditPackage.id, CreditPackage.credits).where(
                CreditPackage.starts_at <= moment, CreditPackage.expires_at > moment)):
        bought[tenant_id][package_id] = credits
    still_open = _open([PACKAGES_LOW])
    created = []
    for tenant_id in set(bought) | {tenant for tenant, _ in still_open}:
        packages = bought.get(tenant_id, {})
        total = sum(packages.values())
        remaining = 0
        if packages:
            balances = ledger.balances(tenant_id, ledger.package_account(""))
            remaining = sum(balances.get(ledger.package_account(p), 0) for p in packages)
        for percent in LOW_PERCENTS:
            key = f"packages_below:{percent}"
            holds = total > 0 and remaining * 100 < percent * total
            notification = still_open.get((tenant_id, key))
            if holds and notification is None:
                data = {"threshold_percent": percent, "remaining_credits": remaining,
                        "purchased_credits": total, "live_packages": len(packages)}
                new = _notify(tenant_id, PACKAGES_LOW, key, data, moment)
                created += [new] if new else []
            elif not holds and notification is not None:
                _clear(notification, moment)
    db.session.flush()
    return created


def check_seats(now: dt.datetime | None = None) -> list[uuid.UUID]:
    """No free seat left in the packs whose activation deadline is ahead, for tenants that
    have packs or an active device without a licence (tenants on a postpaid plan need no
    seats). Returns the new notifications."""
    moment = now or utcnow()
    free: dict[uuid.UUID, int | None] = dict(db.session.execute(select(
        LicencePack.tenant_id,
        func.sum(case((LicencePack.activation_deadline > moment,
                       LicencePack.seats - LicencePack.seats_used), else_=0)))
        .group_by(LicencePack.tenant_id)).all())
    # Tenants with packs are covered above; those without one only need a device waiting.
    waiting = set(db.session.scalars(select(Device.tenant_id).distinct().where(
        Device.status == DeviceStatus.ACTIVE,
        ~exists().where(LicencePack.tenant_id == Device.tenant_id),
        ~has_live_licence(Device.id, moment))))
    postpaid = set(db.session.scalars(select(BillingPolicy.tenant_id).where(
        BillingPolicy.postpaid_plan_id.is_not(None))))
    exhausted = ({t for t, seats in free.items() if not seats} | waiting) - postpaid
    still_open = _open([SEATS_EXHAUSTED])
    created = []
    for tenant_id in exhausted:
        if (tenant_id, "seats_exhausted") in still_open:
            continue
        unlicensed = db.session.scalar(select(func.count()).select_from(Device).where(
            Device.tenant_id == tenant_id, Device.status == DeviceStatus.ACTIVE,
            ~has_live_licence(Device.id, moment))) or 0
        new = _notify(tenant_id, SEATS_EXHAUSTED, "seats_exhausted",
                      {"free_seats": 0, "unlicensed_devices": unlicensed}, moment)
        created += [new] if new else []
    for (tenant_id, _key), notification in still_open.items():
        if tenant_id not in exhausted:
            _clear(notification, moment)
    db.session.flush()
    return created


def check_licences(now: dt.datetime | None = None) -> list[uuid.UUID]:
    """One notification per licence whose term ends within 30 days (or has ended, in its
    grace) with no renewal after it, on a device not retired. Returns the new ones."""
    moment = now or utcnow()
    later = aliased(DeviceLicence)
    rows = db.session.execute(
        select(DeviceLicence.id, DeviceLicence.tenant_id, DeviceLicence.device_id,
               DeviceLicence.ends_at, DeviceLicence.grace_ends_at, Device.serial)
        .join(Device, Device.id == DeviceLicence.device_id)
        .where(DeviceLicence.starts_at <= moment, DeviceLicence.grace_ends_at > moment,
               DeviceLicence.ends_at <= moment + ENDING_WITHIN,
               Device.status != DeviceStatus.RETIRED,
               ~exists().where(later.device_id == DeviceLicence.device_id,
                               later.ends_at > DeviceLicence.ends_at))).all()
    created = []
    for start in range(0, len(rows), 500):
        chunk = rows[start:start + 500]
        keys = {f"licence_ending:{row.id}" for row in chunk}
        known = set(db.session.execute(select(Notification.tenant_id, Notification.key).where(
            Notification.type == LICENCE_ENDING, Notification.key.in_(keys))).all())
        for row in chunk:
            key = f"licence_ending:{row.id}"
            if (row.tenant_id, key) in known:
                continue
            data = {"licence_id": str(row.id), "device_id": str(row.device_id),
                    "device_serial": row.serial, "ends_at": row.ends_at.isoformat(),
                    "grace_ends_at": row.grace_ends_at.isoformat()}
            new = _notify(row.tenant_id, LICENCE_ENDING, key, data, moment)
            created += [new] if new else []
    db.session.flush()
    return created


def unread_count(tenant_id: uuid.UUID) -> int:
    return db.session.scalar(select(func.count()).select_from(Notification).where(
        Notification.tenant_id == tenant_id, Notification.read_at.is_(None))) or 0


def recent(tenant_id: uuid.UUID, limit: int = LISTED) -> list[Notification]:
    return list(db.session.scalars(select(Notification).where(
        Notification.tenant_id == tenant_id).order_by(Notification.id.desc()).limit(limit)))


def mark_read(notification: Notification) -> Notification:
    if notification.read_at is None:
        notification.read_at = utcnow()
        db.session.flush()
    return notification


def mark_all_read(tenant_id: uuid.UUID) -> int:
    result: Any = db.session.execute(
        update(Notification).where(Notification.tenant_id == tenant_id,
                                   Notification.read_at.is_(None))
        .values(read_at=utcnow()).execution_options(synchronize_session="fetch"))
    return int(result.rowcount or 0)
