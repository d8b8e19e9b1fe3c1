"""Licence seats: which device holds which seat of which pack, for which period.

Activation assigns a seat through the fleet's activation hook, inside the activation's
transaction. The rules (docs/billing.md, *Licences*):

- a device whose licence is still in its term or grace keeps it: a reset and re-activation
  never takes a second seat;
- otherwise it takes one seat from the tenant's packs that have one free and whose activation
  deadline has not passed, the pack whose deadline comes first (then the oldest);
- with no free seat it is activated all the same, unlicensed: inference refuses it with
  ``license_required`` until a seat is assigned (by hand, or automatically when seats are
  bought: oldest activation first);
- a seat once taken stays used (a retired device's seat is consumed, not returned); seats
  never move between tenants.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from dateutil.relativedelta import relativedelta
from sqlalchemy import Exists, exists, insert, select
from sqlalchemy.orm import aliased

from billing.models import DeviceLicence, LicencePack
from core.db import db, utcnow
from core.ids import uuid7

log = logging.getLogger(__name__)


def period(starts_at: dt.datetime, term_months: int, grace_days: int
           ) -> tuple[dt.datetime, dt.datetime]:
    """End of the term and of its grace for a licence starting at ``starts_at``.

    Months are calendar months (31 January + 1 month = 28/29 February)."""
    ends_at = starts_at + relativedelta(months=term_months)
    return ends_at, ends_at + dt.timedelta(days=grace_days)


def current_licence(device_id: uuid.UUID, at: dt.datetime | None = None) -> DeviceLicence | None:
    """The device's licence whose grace has not ended at ``at`` (the newest one)."""
    moment = at or utcnow()
    return db.session.scalars(
        select(DeviceLicence).where(DeviceLicence.device_id == device_id,
                                    DeviceLicence.starts_at <= moment,
                                    DeviceLicence.grace_ends_at > moment)
        .order_by(DeviceLicence.ends_at.desc()).limit(1)).first()


def free_packs(tenant_id: uuid.UUID, at: dt.datetime) -> list[LicencePack]:
    """The tenant's packs with a free seat, in the order seats are taken; their rows stay
    locked until the transaction ends, so concurrent activations queue for the same seat (the
    check constraint on ``seats_used`` is the last guard)."""
    return list(db.session.scalars(
        select(LicencePack).where(LicencePack.tenant_id == tenant_id,
                                  LicencePack.seats_used < LicencePack.seats,
                                  LicencePack.activation_deadline > at)
        .order_by(LicencePack.activation_deadline, LicencePack.created_at, LicencePack.id)
        .with_for_update()))


def assign(tenant_id: uuid.UUID, device_id: uuid.UUID, *, at: dt.datetime | None = None,
           renews: DeviceLicence | None = None) -> DeviceLicence | None:
    """Give the device a seat from the tenant's packs; ``None`` when no seat is free."""
    moment = at or utcnow()
    packs = free_packs(tenant_id, moment)
    if not packs:
        return None
    pack = packs[0]
    pack.seats_used += 1
    starts_at = renews.ends_at if renews is not None and renews.ends_at > moment else moment
    ends_at, grace_ends_at = period(starts_at, pack.plan.term_months, pack.plan.grace_days)
    licence = DeviceLicence(tenant_id=tenant_id, device_id=device_id, plan_id=pack.plan_id,
                            pack_id=pack.id, renews_id=renews.id if renews else None,
                            starts_at=starts_at, ends_at=ends_at, grace_ends_at=grace_ends_at)
    db.session.add(licence)
    db.session.flush()
    return licence


def on_activation(tenant_id: uuid.UUID, device_id: uuid.UUID) -> DeviceLicence | None:
    """The activation hook's work: keep a live licence, or take a seat if one is free."""
    moment = utcnow()
    kept = current_licence(device_id, moment)
    if kept is not None:
        return kept
    licence = assign(tenant_id, device_id, at=moment)
    if licence is None:
        log.info("device %s activated without a free seat: unlicensed", device_id)
    return licence


def has_live_licence(device_id: Any, at: dt.datetime) -> Exists:
    """A SQL condition: the device holds a licence in term or grace at ``at``."""
    return exists().where(DeviceLicence.device_id == device_id,
                          DeviceLicence.starts_at <= at, DeviceLicence.grace_ends_at > at)


def assign_waiting(tenant_id: uuid.UUID, *, at: dt.datetime | None = None) -> list[uuid.UUID]:
    """Seats for the tenant's active devices that have none, oldest activation first, while
    seats are free; returns the devices licensed."""
    from fleet.models import Device, DeviceStatus

    moment = at or utcnow()
    waiting = list(db.session.scalars(
        select(Device.id).where(Device.tenant_id == tenant_id,
                                Device.status == DeviceStatus.ACTIVE,
                                ~has_live_licence(Device.id, moment))
        .order_by(Device.activated_at, Device.id)))
    licensed = []
    for device_id in waiting:
        if assign(tenant_id, device_id, at=moment) is None:
            break
        licensed.append(device_id)
    return licensed


def assign_new(tenant_id: uuid.UUID, device_ids: list[uuid.UUID], *,
               at: dt.datetime | None = None) -> int:
    """Seats for devices activated for the first time (a factory import), in bulk: as many
    as the packs have free, in order; the rest stay unlicensed. Returns how many got one."""
    moment = at or utcnow()
    remaining = list(device_ids)
    rows: list[dict[str, Any]] = []
    for pack in free_packs(tenant_id, moment) if remaining else []:
        taken, remaining = remaining[:pack.seats - pack.seats_used], \
            remaining[pack.seats - pack.seats_used:]
        pack.seats_used += len(taken)
        ends_at, grace_ends_at = period(moment, pack.plan.term_months, pack.plan.grace_days)
        rows += [{"id": uuid7(), "tenant_id": tenant_id, "device_id": device_id,
                  "plan_id": pack.plan_id, "pack_id": pack.id, "starts_at": moment,
                  "ends_at": ends_at, "grace_ends_at": grace_ends_at, "created_at": moment}
                 for device_id in taken]
        if not remaining:
            break
    if rows:
        db.session.execute(insert(DeviceLicence), rows)
    db.session.flush()
    return len(rows)


def renewal_of(licence: DeviceLicence) -> DeviceLicence | None:
    return db.session.scalars(select(DeviceLicence).where(
        DeviceLicence.renews_id == licence.id).limit(1)).first()


def renew(tenant_id: uuid.UUID, device_id: uuid.UUID, *, at: dt.datetime | None = None,
          actor: str = "api") -> DeviceLicence:
    """A new seat for the device: starting where its live licence ends (or now, when it has
    none). One renewal ahead at most; ``Conflict`` without a free seat."""
    from accounts import services as accounts
    from core.errors import Conflict
    from fleet.access import devices_changed

    moment = at or utcnow()
    current = current_licence(device_id, moment)
    if current is not None and renewal_of(current) is not None:
        raise Conflict("The licence is already renewed.")
    licence = assign(tenant_id, device_id, at=moment, renews=current)
    if licence is None:
        raise Conflict("No free seat: buy a licence pack first.")
    accounts.record_audit("licence.renew", tenant_id=tenant_id, target=licence,
                          details={"device_id": str(device_id), "actor": actor,
                                   "renews": str(current.id) if current else None})
    devices_changed(tenant_id, [device_id])
    return licence


AUTO_RENEW_DAYS = 7


def auto_renew(at: dt.datetime | None = None) -> int:
    """Renew the licences ending within :data:`AUTO_RENEW_DAYS` of tenants that chose
    automatic renewal, while seats last; returns how many were renewed."""
    from billing.models import BillingPolicy
    from core.errors import Conflict

    moment = at or utcnow()
    renewed = 0
    renewal = aliased(DeviceLicence)
    due = db.session.execute(
        select(DeviceLicence.tenant_id, DeviceLicence.device_id, DeviceLicence.id)
        .join(BillingPolicy, BillingPolicy.tenant_id == DeviceLicence.tenant_id)
        .where(BillingPolicy.auto_renew.is_(True), DeviceLicence.ends_at > moment,
               DeviceLicence.ends_at <= moment + dt.timedelta(days=AUTO_RENEW_DAYS),
               ~exists().where(renewal.renews_id == DeviceLicence.id))).all()
    for tenant_id, device_id, _ in due:
        try:
            with db.session.begin_nested():
                renew(tenant_id, device_id, at=moment, actor="auto-renew")
            renewed += 1
        except Conflict:
            log.info("auto-renewal of device %s: no free seat", device_id)
    return renewed
