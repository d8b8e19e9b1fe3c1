"""The fleet endpoints for the API-walking tests (see tests/core/endpoints.py)."""

from __future__ import annotations

import io
import uuid
from typing import Any

from accounts.models import Role, Tenant
from core.db import db
from fleet import activation, imports, services
from fleet.models import Device, DeviceImport, HardwareKind, Product
from tests.core.endpoints import ALL_ROLES, Endpoint

READ = "fleet:read"
WRITE = "fleet:write"
FLEET_WRITERS = frozenset({Role.OWNER, Role.DEVELOPER, Role.OPERATIONS})


def _read() -> Endpoint:
    return Endpoint(READ, ALL_ROLES)


def _write(body: Any = None) -> Endpoint:
    return Endpoint(WRITE, FLEET_WRITERS, body)


DEVICE = "/api/v1/devices/<device_id>"
IMPORT = "/api/v1/device-imports/<import_id>"

ENDPOINTS = {
    ("/api/v1/products", "GET"): _read(),
    ("/api/v1/products", "POST"): _write({"name": "Walker Glasses", "hardware_kind": "glasses"}),
    ("/api/v1/products/<product_id>", "GET"): _read(),
    ("/api/v1/products/<product_id>", "PATCH"): _write({"description": "Walked"}),
    ("/api/v1/products/<product_id>/enrolment-key", "POST"): _write(),
    ("/api/v1/devices", "GET"): _read(),
    ("/api/v1/devices", "POST"): _write(
        lambda tenant: {"product_id": str(_product(tenant).id), "serial": "WALK-1"}),
    ("/api/v1/devices/export.csv", "GET"): _read(),
    ("/api/v1/devices/bulk", "POST"): _write(
        {"action": "suspend", "device_ids": [str(uuid.uuid4())]}),
    ("/api/v1/fleet/summary", "GET"): _read(),
    (DEVICE, "GET"): _read(),
    (DEVICE, "PATCH"): _write({"name": "Walked", "group": "walkers", "tags": ["walk"]}),
    (f"{DEVICE}/activate", "POST"): _write(),
    (f"{DEVICE}/suspend", "POST"): _write(),
    (f"{DEVICE}/resume", "POST"): _write(),
    (f"{DEVICE}/retire", "POST"): _write(),
    (f"{DEVICE}/reset", "POST"): _write(),
    (f"{DEVICE}/transfer", "POST"): _write({"end_user_ref": "walker-user"}),
    (f"{DEVICE}/credentials", "POST"): _write(),
    (f"{DEVICE}/credentials", "DELETE"): _write(),
    (f"{DEVICE}/events", "GET"): _read(),
    ("/api/v1/device-imports", "GET"): _read(),
    ("/api/v1/device-imports", "POST"): Endpoint(WRITE, FLEET_WRITERS, lambda tenant: {
        "product_id": str(_product(tenant).id),
        "file": (io.BytesIO(b"serial\nWALK-1\n"), "walk.csv")}, multipart=True),
    (IMPORT, "GET"): _read(),
    (f"{IMPORT}/credentials.csv", "POST"): _write(),
    ("/api/v1/activation-codes/claim", "POST"): _write(
        lambda tenant: {"code": _code_shown_by_a_device(tenant)}),
}


def _product(tenant: Tenant) -> Product:
    product, _ = services.create_product(tenant.id, f"Walker {uuid.uuid4().hex[:8]}",
                                         HardwareKind.OTHER)
    db.session.commit()
    return product


def _device(tenant: Tenant) -> Device:
    """Active with credentials, so every device action has something to change."""
    device = services.create_device(_product(tenant), f"WALK-{uuid.uuid4().hex[:12]}",
                                    end_user_ref="walker-owner")
    services.activate(device)
    services.issue_credentials(device)
    db.session.commit()
    return device


def _import(tenant: Tenant) -> DeviceImport:
    """With its one-time credentials file still there to take."""
    batch = imports.import_devices(_product(tenant), f"serial\nWALK-{uuid.uuid4().hex[:12]}\n"
                                   .encode(), filename="walk.csv", issue_credentials=True)
    db.session.commit()
    return batch


def _code_shown_by_a_device(tenant: Tenant) -> str:
    """The activation code a device of ``tenant`` shows after bootstrapping."""
    device = services.create_device(_product(tenant), f"WALK-{uuid.uuid4().hex[:12]}")
    code = activation.challenge_for(device).code
    db.session.commit()
    return code


CREATORS: dict[type, Any] = {
    Product: _product,
    Device: _device,
    DeviceImport: _import,
}
