"""Helpers for the fleet pages' tests: a vendor (tenant, owner, product), members in other
roles, devices made through the fleet services, and reading rows out of the pages."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from accounts.models import Role, User
from core.db import db
from fleet import hooks, services
from fleet.models import Device, DeviceEvent, DeviceStatus, Product
from tests.factories import MembershipFactory, UserFactory
from tests.fleet.fixtures import Vendor, make_vendor
from tests.portal.helpers import login, text


@pytest.fixture
def vendor(app: Any) -> Vendor:
    return make_vendor()


@pytest.fixture
def other_vendor(app: Any) -> Vendor:
    return make_vendor()


def member(vendor: Vendor, role: Role) -> User:
    user = UserFactory()
    MembershipFactory(tenant=vendor.setup.tenant, user=user, role=role)
    return user


def log_in_as(client: Any, vendor: Vendor, role: Role = Role.OWNER) -> User:
    user = vendor.setup.owner if role is Role.OWNER else member(vendor, role)
    login(client, user.email)
    return user


def make_device(product: Product, serial: str | None = None, *,
                status: DeviceStatus = DeviceStatus.PROVISIONED, **options: Any) -> Device:
    device = services.create_device(product, serial or f"SN-{uuid.uuid4().hex[:10]}", **options)
    if status is not DeviceStatus.PROVISIONED:
        services.activate(device)
    if status in (DeviceStatus.SUSPENDED, DeviceStatus.RETIRED):
        services.change_status(device, "suspend" if status is DeviceStatus.SUSPENDED
                               else "retire")
    db.session.commit()
    return device


def fresh(device: Device) -> Device:
    db.session.expire_all()
    found = db.session.get(Device, device.id)
    assert found is not None
    return found


def serials(response: Any) -> list[str]:
    """The serials of the device rows on a device list page, in order."""
    return re.findall(r'data-testid="device-row" data-serial="([^"]+)"', text(response))


def event_kinds(device: Device) -> list[str]:
    return list(db.session.execute(
        select(DeviceEvent.kind).where(DeviceEvent.device_id == device.id)
        .order_by(DeviceEvent.id)).scalars())


@pytest.fixture
def refusing_hook() -> Iterator[list[Device]]:
    """An activation hook that writes (as a seat assignment would) and then refuses."""
    seen: list[Device] = []

    def refuse(device: Device, history: list[DeviceEvent]) -> None:
        seen.append(device)
        services.record_event(device, "seat_checked")
        db.session.flush()
        raise hooks.ActivationRefused("No free licence seat.", code="license_required")

    hooks.register_activation_hook(refuse)
    yield seen
    hooks.unregister_activation_hook(refuse)
