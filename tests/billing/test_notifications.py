"""Billing notifications: packages under 20% and 5%, no free seat, licences ending within 30
days. Each fires once per crossing (the next one only after the condition cleared and recurred)
and queues a webhook delivery when the tenant has an endpoint."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from billing import ledger, licences, notifications, purchases
from billing.models import (
    CreditPackage,
    DeviceLicence,
    EntryKind,
    Notification,
    WebhookDelivery,
)
from billing.notification_tasks import check_licences_ending, check_notifications
from core.db import db
from fleet.models import DeviceStatus
from tests.billing.helpers import buy_seats, make_offer, make_plan
from tests.billing.webhook_helpers import make_endpoint
from tests.fleet.fixtures import Vendor, make_vendor
from tests.portal.fleet_helpers import make_device


@pytest.fixture
def other(app: Any) -> Vendor:
    return make_vendor()


def of(vendor: Vendor, type_: str) -> list[Notification]:
    db.session.expire_all()
    return list(db.session.scalars(select(Notification).where(
        Notification.tenant_id == vendor.setup.tenant.id, Notification.type == type_)
        .order_by(Notification.created_at, Notification.id)))


def buy_package(vendor: Vendor, credits: int = 1000) -> CreditPackage:
    tenant = vendor.setup.tenant
    purchase = purchases.order_package(tenant.id, "EUR", make_offer(credits=credits).id, 1)
    purchases.mark_paid(purchase)
    db.session.commit()
    return db.session.scalars(select(CreditPackage).where(
        CreditPackage.purchase_id == purchase.id)).one()


def consume(vendor: Vendor, package: CreditPackage, credits: int) -> None:
    ledger.post(vendor.setup.tenant.id, [ledger.Movement(
        ledger.package_account(package.id), EntryKind.CONSUMPTION, -credits, "usage_event",
        str(uuid.uuid4()))])
    db.session.commit()


def test_packages_under_20_then_5_percent_notify_once_per_crossing(vendor: Vendor) -> None:
    package = buy_package(vendor, 1000)
    consume(vendor, package, 790)  # 21% left
    check_notifications()
    assert of(vendor, notifications.PACKAGES_LOW) == []

    consume(vendor, package, 20)  # 19%
    check_notifications()
    check_notifications()  # still under: nothing new
    [low] = of(vendor, notifications.PACKAGES_LOW)
    assert low.key == "packages_below:20" and low.cleared_at is None
    assert low.data == {"threshold_percent": 20, "remaining_credits": 190,
                        "purchased_credits": 1000, "live_packages": 1}

    consume(vendor, package, 150)  # 4%
    check_notifications()
    assert [n.key for n in of(vendor, notifications.PACKAGES_LOW)] == [
        "packages_below:20", "packages_below:5"]

    buy_package(vendor, 1000)  # 1,040 of 2,000 left: both clear
    check_notifications()
    assert all(n.cleared_at is not None and n.open_key is None
               for n in of(vendor, notifications.PACKAGES_LOW))

    consume(vendor, package, 40)  # first package empty
    second = db.session.scalars(select(CreditPackage).where(
        CreditPackage.tenant_id == vendor.setup.tenant.id, CreditPackage.id != package.id)).one()
    consume(vendor, second, 700)  # 300 of 2,000: 15%, a new crossing
    check_notifications()
    check_notifications()
    keys = [(n.key, n.cleared_at is None) for n in of(vendor, notifications.PACKAGES_LOW)]
    assert keys == [("packages_below:20", False), ("packages_below:5", False),
                    ("packages_below:20", True)]


def test_expired_packages_do_not_count(vendor: Vendor) -> None:
    package = buy_package(vendor, 1000)
    consume(vendor, package, 900)
    notifications.check_packages(package.expires_at + dt.timedelta(seconds=1))
    db.session.commit()
    assert of(vendor, notifications.PACKAGES_LOW) == []


def test_no_free_seat_notifies_once_until_seats_are_bought(vendor: Vendor) -> None:
    plan = make_plan()
    buy_seats(vendor.setup.tenant.id, plan, 1)
    make_device(vendor.product, status=DeviceStatus.ACTIVE)  # takes the only seat
    check_notifications()
    check_notifications()
    [exhausted] = of(vendor, notifications.SEATS_EXHAUSTED)
    assert exhausted.data == {"free_seats": 0, "unlicensed_devices": 0}

    buy_seats(vendor.setup.tenant.id, plan, 1)
    check_notifications()
    assert of(vendor, notifications.SEATS_EXHAUSTED)[0].cleared_at is not None

    make_device(vendor.product, status=DeviceStatus.ACTIVE)
    make_device(vendor.product, status=DeviceStatus.ACTIVE)  # no seat: unlicensed
    check_notifications()
    assert [n.data["unlicensed_devices"] for n in of(vendor, notifications.SEATS_EXHAUSTED)
            if n.cleared_at is None] == [1]


def test_a_device_without_any_pack_counts_and_a_tenant_without_devices_does_not(
        vendor: Vendor, other: Vendor) -> None:
    make_device(vendor.product, status=DeviceStatus.ACTIVE)
    make_device(other.product)  # provisioned, never activated
    check_notifications()
    assert len(of(vendor, notifications.SEATS_EXHAUSTED)) == 1
    assert of(other, notifications.SEATS_EXHAUSTED) == []


def test_a_licence_ending_within_30_days_notifies_once(vendor: Vendor) -> None:
    plan = make_plan(term_months=1, grace_days=7)
    buy_seats(vendor.setup.tenant.id, plan, 2)
    device = make_device(vendor.product, status=DeviceStatus.ACTIVE)
    licence = licences.current_licence(device.id)
    assert licence is not None
    notifications.check_licences(licence.ends_at - dt.timedelta(days=31))
    db.session.commit()
    assert of(vendor, notifications.LICENCE_ENDING) == []

    for days in (29, 10, -1):  # inside the window, and in the grace after the end
        notifications.check_licences(licence.ends_at - dt.timedelta(days=days))
        db.session.commit()
    [ending] = of(vendor, notifications.LICENCE_ENDING)
    assert ending.data["licence_id"] == str(licence.id)
    assert ending.data["device_serial"] == device.serial

    # Renewed: the new licence ends later; the old one no longer notifies, the new one will.
    renewal = licences.assign(vendor.setup.tenant.id, device.id, renews=licence)
    db.session.commit()
    assert isinstance(renewal, DeviceLicence)
    check_licences_ending()
    assert len(of(vendor, notifications.LICENCE_ENDING)) == 1
    notifications.check_licences(renewal.ends_at - dt.timedelta(days=5))
    db.session.commit()
    assert [n.data["licence_id"] for n in of(vendor, notifications.LICENCE_ENDING)] == [
        str(licence.id), str(renewal.id)]


def test_a_notification_queues_a_delivery_only_with_an_enabled_endpoint(
        vendor: Vendor, other: Vendor) -> None:
    make_endpoint(vendor.setup.tenant)
    for v in (vendor, other):
        make_device(v.product, status=DeviceStatus.ACTIVE)
    check_notifications()
    deliveries = list(db.session.scalars(select(WebhookDelivery)))
    [mine] = of(vendor, notifications.SEATS_EXHAUSTED)
    assert [(d.tenant_id, d.notification_id, d.event_id, d.event_type) for d in deliveries] == [
        (vendor.setup.tenant.id, mine.id, mine.id, "seats.exhausted")]


def test_the_api_lists_notifications_and_marks_them_read(client: Any, vendor: Vendor) -> None:
    make_device(vendor.product, status=DeviceStatus.ACTIVE)
    check_notifications()
    page = client.get("/api/v1/billing/notifications", headers=vendor.headers).get_json()
    [item] = page["items"]
    assert item["type"] == "seats.exhausted" and item["read_at"] is None
    answer = client.post(f"/api/v1/billing/notifications/{item['id']}/read",
                         headers=vendor.headers)
    assert answer.status_code == 200 and answer.get_json()["read_at"] is not None
    assert notifications.unread_count(vendor.setup.tenant.id) == 0


def test_the_periodic_jobs_include_the_checks(app: Any) -> None:
    from billing.tasks import periodic_jobs

    names = {job.__name__: every for every, job in periodic_jobs(app.config)}
    assert names["check_notifications"] == 60
    assert names["check_licences_ending"] == 3600
    assert names["dispatch_webhooks"] == 15
