"""Licence seats: activation takes one, a reset keeps it, no seat leaves the device unlicensed
until seats are bought (oldest activation first), imports take seats in bulk, and two
activations racing for the last seat never both get it."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from sqlalchemy import select, text

from billing import licences
from billing.models import DeviceLicence, LicencePack
from core.db import db, utcnow
from fleet import services as fleet
from fleet.models import Device, DeviceStatus
from tests.billing.helpers import buy_seats, make_plan
from tests.fleet.fixtures import Vendor, make_vendor, upload
from tests.support.waiting import wait_until


def held(device: Device) -> list[DeviceLicence]:
    return list(db.session.scalars(select(DeviceLicence).where(
        DeviceLicence.device_id == device.id).order_by(DeviceLicence.starts_at)))


def activated(vendor: Vendor, serial: str | None = None) -> Device:
    device = fleet.create_device(vendor.product, serial or f"SN-{utcnow().timestamp()}")
    fleet.activate(device)
    db.session.commit()
    return device


def test_activation_takes_a_seat_for_the_plans_term_and_grace(vendor: Vendor) -> None:
    plan = make_plan(term_months=12, grace_days=14)
    pack, _ = buy_seats(vendor.setup.tenant.id, plan, 2)
    before = utcnow()
    device = activated(vendor, "SN-1")

    [licence] = held(device)
    assert licence.pack_id == pack.id and licence.plan_id == plan.id
    assert before <= licence.starts_at <= utcnow()
    assert licence.ends_at.date() == (licence.starts_at.date().replace(
        year=licence.starts_at.year + 1))
    assert licence.grace_ends_at - licence.ends_at == dt.timedelta(days=14)
    db.session.refresh(pack)
    assert pack.seats_used == 1


def test_terms_are_calendar_months() -> None:
    start = dt.datetime(2027, 1, 31, 10, 0, tzinfo=dt.UTC)
    ends, grace = licences.period(start, 1, 3)
    assert ends == dt.datetime(2027, 2, 28, 10, 0, tzinfo=dt.UTC)
    assert grace == dt.datetime(2027, 3, 3, 10, 0, tzinfo=dt.UTC)
    assert licences.period(dt.datetime(2028, 1, 31, tzinfo=dt.UTC), 1, 0)[0] == \
        dt.datetime(2028, 2, 29, tzinfo=dt.UTC)


def test_a_reset_and_reactivation_within_the_term_keeps_the_seat(vendor: Vendor) -> None:
    plan = make_plan()
    pack, _ = buy_seats(vendor.setup.tenant.id, plan, 1)
    device = activated(vendor)
    fleet.reset(device)
    fleet.activate(device)
    db.session.commit()

    assert len(held(device)) == 1
    db.session.refresh(pack)
    assert pack.seats_used == 1


def test_without_a_free_seat_the_device_is_activated_unlicensed(vendor: Vendor) -> None:
    plan = make_plan()
    buy_seats(vendor.setup.tenant.id, plan, 1)
    first = activated(vendor)
    second = activated(vendor)

    assert second.status is DeviceStatus.ACTIVE
    assert len(held(first)) == 1 and held(second) == []
    assert licences.current_licence(second.id) is None


def test_bought_seats_go_to_unlicensed_devices_oldest_activation_first(
        vendor: Vendor) -> None:
    plan = make_plan()
    devices = [activated(vendor, f"SN-{n}") for n in range(3)]
    for n, device in enumerate(devices):  # activation order: 2, 0, 1
        device.activated_at = utcnow() - dt.timedelta(hours={0: 2, 1: 1, 2: 3}[n])
    db.session.commit()

    _, licensed = buy_seats(vendor.setup.tenant.id, plan, 2)
    assert licensed == [devices[2].id, devices[0].id]
    assert held(devices[1]) == []
    _, licensed = buy_seats(vendor.setup.tenant.id, plan, 5)
    assert licensed == [devices[1].id]


def test_a_retired_devices_seat_stays_used(vendor: Vendor) -> None:
    plan = make_plan()
    pack, _ = buy_seats(vendor.setup.tenant.id, plan, 1)
    device = activated(vendor)
    fleet.change_status(device, "retire")
    db.session.commit()
    other = activated(vendor)

    db.session.refresh(pack)
    assert pack.seats_used == 1 and held(other) == []


def test_seats_never_move_between_tenants(vendor: Vendor) -> None:
    plan = make_plan()
    buy_seats(vendor.setup.tenant.id, plan, 3)
    stranger = make_vendor()
    device = activated(stranger)
    assert held(device) == []


def test_a_pack_past_its_activation_deadline_gives_no_seat(vendor: Vendor) -> None:
    plan = make_plan()
    pack, _ = buy_seats(vendor.setup.tenant.id, plan, 3)
    pack.activation_deadline = utcnow() - dt.timedelta(seconds=1)
    db.session.commit()
    assert held(activated(vendor)) == []


def test_an_import_that_activates_takes_seats_in_bulk(vendor: Vendor, client: Any) -> None:
    plan = make_plan()
    first, _ = buy_seats(vendor.setup.tenant.id, plan, 2)
    second, _ = buy_seats(vendor.setup.tenant.id, plan, 3)
    rows = "serial\n" + "".join(f"IMP-{n:03d}\n" for n in range(7))
    response = upload(client, vendor, rows, activate=True)
    assert response.status_code == 201, response.get_json()

    devices = list(db.session.scalars(select(Device.id).where(
        Device.tenant_id == vendor.setup.tenant.id, Device.serial.like("IMP-%"))))
    licensed = db.session.scalars(select(DeviceLicence).where(
        DeviceLicence.device_id.in_(devices))).all()
    assert len(devices) == 7 and len(licensed) == 5
    assert sorted(lic.pack_id for lic in licensed) == sorted([first.id] * 2 + [second.id] * 3)
    for pack in (first, second):
        db.session.refresh(pack)
        assert pack.seats_used == pack.seats


def test_two_activations_racing_for_the_last_seat(committed_app: Any) -> None:
    """Real concurrency: the first activation holds the last seat's pack locked while the
    second one waits on that lock (seen in pg_stat_activity), then finds no seat left."""
    seller = make_vendor()
    plan = make_plan()
    pack, _ = buy_seats(seller.setup.tenant.id, plan, 1)
    devices = [fleet.create_device(seller.product, f"RACE-{n}") for n in range(2)]
    db.session.commit()
    ids = [d.id for d in devices]
    first_holds, second_waits = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def activate(device_id: Any, hold: bool) -> None:
        try:
            with committed_app.app_context():
                fleet.activate(db.session.get(Device, device_id))
                if hold:
                    first_holds.set()
                    assert second_waits.wait(20), "the second activation never waited"
                db.session.commit()
                db.session.remove()
        except BaseException as exc:  # reported below
            errors.append(exc)

    first = threading.Thread(target=activate, args=(ids[0], True))
    first.start()
    assert first_holds.wait(20), errors
    second = threading.Thread(target=activate, args=(ids[1], False))
    second.start()
    engine = committed_app.extensions["ensoul_db_engine"]
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
            wait_until(lambda: watcher.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()")).scalar(), 10,
                what="the second activation to wait for the pack's lock")
    finally:
        second_waits.set()
        first.join(30)
        second.join(30)
    assert errors == []
    db.session.expire_all()
    assert db.session.get(LicencePack, pack.id).seats_used == 1  # type: ignore[union-attr]
    licensed = db.session.scalars(select(DeviceLicence.device_id).where(
        DeviceLicence.device_id.in_(ids))).all()
    assert licensed == [ids[0]]
    assert all(db.session.get(Device, i).status is DeviceStatus.ACTIVE  # type: ignore[union-attr]
               for i in ids)
