"""The dashboard counts the tenant's devices and those online, or says how to add them."""

from __future__ import annotations

import re
from typing import Any

from core.db import db
from fleet import presence, services
from fleet.models import HardwareKind
from tests.factories import tenant_with_owner
from tests.portal.helpers import login, text


def stat(page: str, testid: str) -> str:
    match = re.search(rf'data-testid="{testid}">([^<]*)<', page)
    assert match, testid
    return match.group(1).strip()


def test_dashboard_shows_the_fleet(app: Any, client: Any) -> None:
    setup = tenant_with_owner()
    assert login(client, setup.owner.email).status_code == 302
    empty = text(client.get("/"))
    assert 'data-testid="dashboard-fleet"' not in empty
    assert "Create a product" in empty

    product, _ = services.create_product(setup.tenant.id, "Glasses", HardwareKind.GLASSES)
    first = services.create_device(product, "G-1")
    services.create_device(product, "G-2")
    services.activate(first)
    db.session.commit()
    presence.record(str(setup.tenant.id), str(first.id), "status", {"state": "online"},
                    retained=False)

    page = text(client.get("/"))
    assert stat(page, "dashboard-devices") == "2"
    assert stat(page, "dashboard-online") == "1"
