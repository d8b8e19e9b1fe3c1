"""The demo tenant's fleet for the embedded quickstart: a product and simulated devices.

Composes the accounts and fleet domains, so it sits above them like ``processes.py``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from accounts.cli import seed_demo
from core.db import db
from core.tenancy import scoped
from fleet import services, topics
from fleet.models import Device, DeviceStatus, HardwareKind, Product

DEMO_PRODUCT = "Companion Bear (demo)"


def demo_device_credentials(count: int) -> list[tuple[str, dict[str, Any]]]:
    """Make sure the demo tenant has ``count`` active devices; issue each a fresh password.

    Returns ``(serial, mqtt connection info with the password)`` per device, committed.
    """
    tenant, _ = seed_demo()
    product = db.session.execute(
        scoped(Product, tenant.id).where(Product.name == DEMO_PRODUCT)).scalar_one_or_none()
    if product is None:
        product, _ = services.create_product(tenant.id, DEMO_PRODUCT, HardwareKind.TOY,
                                             description="Simulated by `serve --demo-devices`.")
    existing = {d.serial: d for d in db.session.execute(
        select(Device).where(Device.product_id == product.id)).scalars()}
    result = []
    for number in range(1, count + 1):
        serial = f"DEMO-{number:04d}"
        device = existing.get(serial) or services.create_device(
            product, serial, name=f"Demo bear {number}", group="demo", tags=["demo"])
        if device.status is DeviceStatus.PROVISIONED:
            services.activate(device, actor="demo")
        if device.status is not DeviceStatus.ACTIVE:
            continue  # suspended or retired by someone trying the portal: leave it so
        password = services.issue_credentials(device)
        result.append((serial, topics.connection_info(device, password)))
    db.session.commit()
    return result
