"""Who may log in to the broker and use which topics: the part every adapter shares.

The topic table itself is :mod:`fleet.topics`; this module adds the service account (the
platform's own MQTT login, full access under ``t/``), how a device username maps to its row,
and which devices keep broker access at all: those with credentials that are neither
suspended nor retired. A suspended device loses its login until it is resumed.
"""

from __future__ import annotations

import datetime as dt
import hmac
import re
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, select

from core.db import db
from core.mqtt import platform_target
from fleet.models import Device, DeviceStatus

NO_ACCESS = (DeviceStatus.SUSPENDED, DeviceStatus.RETIRED)
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
DEVICE_USERNAME_RE = re.compile(rf"^({_UUID})/d/({_UUID})$")
SHARE_PREFIX_RE = re.compile(r"^\$share/[^/+#]+/")


@dataclass(frozen=True)
class ServiceAccount:
    username: str
    password: str

    def matches(self, username: str | None, password: str | None) -> bool:
        return (username == self.username and password is not None
                and hmac.compare_digest(password.encode(), self.password.encode()))


def service_account(config: MutableMapping[str, Any]) -> ServiceAccount | None:
    """The platform's own login: ``core.mqtt.platform_target`` (``MQTT_URL``'s credentials, or
    the embedded broker's per-process service password)."""
    target = platform_target(config)
    if target.username and target.password:
        return ServiceAccount(target.username, target.password)
    return None


def service_may(topic: str) -> bool:
    """Service accounts read and write everything under ``t/`` (shared subscriptions included)."""
    return SHARE_PREFIX_RE.sub("", topic, count=1).startswith("t/")


def device_ids(username: str | None) -> tuple[uuid.UUID, uuid.UUID] | None:
    """``(tenant_id, device_id)`` for a device-shaped username, else ``None``."""
    match = DEVICE_USERNAME_RE.match(username or "")
    if match is None:
        return None
    return uuid.UUID(match[1]), uuid.UUID(match[2])


def has_broker_access() -> ColumnElement[bool]:
    """The SQL condition for devices the broker lets in."""
    return Device.mqtt_password_hash.is_not(None) & Device.status.not_in(NO_ACCESS)


@dataclass(frozen=True)
class DeviceLogin:
    """What the broker needs to know about one device."""

    password_hash: str | None
    status: DeviceStatus
    credentials_issued_at: dt.datetime | None

    @property
    def allowed(self) -> bool:
        return self.password_hash is not None and self.status not in NO_ACCESS


def load_device_login(username: str | None) -> DeviceLogin | None:
    """The device behind ``username`` (a query; adapters cache the answer), or ``None``."""
    ids = device_ids(username)
    if ids is None:
        return None
    tenant_id, device_id = ids
    row = db.session.execute(
        select(Device.mqtt_password_hash, Device.status, Device.credentials_issued_at)
        .where(Device.id == device_id, Device.tenant_id == tenant_id)
    ).first()
    return DeviceLogin(row[0], row[1], row[2]) if row is not None else None
