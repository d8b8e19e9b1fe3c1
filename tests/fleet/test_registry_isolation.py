"""One vendor's fleet is invisible and untouchable to another, beyond the generic walks.

tests/core/test_tenancy.py checks that every endpoint taking an id answers 404 for another
tenant's row and that plain lists never show one; here: ids in bodies and filters (bulk
actions, ``product_id``), searches that would match another tenant's devices, the summary and
export, presence, and idempotency keys. (Claiming another tenant's code is in
test_bootstrap.py.)
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from accounts.models import AuditEntry
from core.db import db
from fleet import presence, services
from fleet.models import Device
from tests.fleet.fixtures import Vendor, make_vendor

API = "/api/v1"


@pytest.fixture
def mine(app: Any) -> Vendor:
    return make_vendor()


@pytest.fixture
def theirs(app: Any) -> Vendor:
    return make_vendor()


def make_device(vendor: Vendor, serial: str, **kwargs: Any) -> Device:
    device = services.create_device(vendor.product, serial, **kwargs)
    db.session.commit()
    return device


def stored(device: Device) -> tuple[Any, ...]:
    db.session.refresh(device)
    return (device.status, device.group_name, device.mqtt_password_hash, device.end_user_ref,
            device.tag_names)


def audit_count(vendor: Vendor) -> int:
    return db.session.execute(select(func.count()).select_from(AuditEntry).where(
        AuditEntry.tenant_id == vendor.setup.tenant.id)).scalar_one()


@pytest.mark.parametrize("action", ["suspend", "resume", "retire", "move_group"])
def test_bulk_actions_report_another_tenants_devices_as_not_found(
        client: Any, mine: Vendor, theirs: Vendor, action: str) -> None:
    own = make_device(mine, "SN-MINE")
    services.activate(own)
    foreign = make_device(theirs, "SN-THEIRS", group="their-group", end_user_ref="their-user")
    services.activate(foreign)
    if action == "resume":
        services.change_status(own, "suspend")
        services.change_status(foreign, "suspend")
    services.issue_credentials(foreign)
    db.session.commit()
    before, audited = stored(foreign), audit_count(theirs)

    answer = client.post(f"{API}/devices/bulk", headers=mine.headers, json={
        "action": action, "device_ids": [str(foreign.id), str(own.id)], "group": "taken"})
    assert answer.status_code == 200, answer.json
    assert answer.json == {"changed": [str(own.id)], "failed": {str(foreign.id): "not_found"}}
    assert stored(foreign) == before
    assert audit_count(theirs) == audited


def test_another_tenants_product_cannot_take_devices(client: Any, mine: Vendor,
                                                     theirs: Vendor) -> None:
    answer = client.post(f"{API}/devices", headers=mine.headers, json={
        "product_id": str(theirs.product.id), "serial": "SN-SNEAKY"})
    assert answer.status_code == 404 and answer.json["error"]["code"] == "not_found"
    assert db.session.execute(select(Device)).first() is None


def test_searches_summary_and_export_show_only_the_callers_devices(
        client: Any, mine: Vendor, theirs: Vendor) -> None:
    own = make_device(mine, "SHARED-1", mac="a4:cf:12:00:00:01", group="g", tags=["t"])
    foreign = make_device(theirs, "SHARED-1", mac="a4:cf:12:00:00:01", group="g", tags=["t"])
    services.activate(foreign)
    db.session.commit()
    presence.record(str(theirs.setup.tenant.id), str(foreign.id), "status",
                    {"state": "online"}, retained=False)
    presence.record(str(theirs.setup.tenant.id), str(foreign.id), "state",
                    {"firmware_version": "9.9.9"}, retained=False)
    presence.flush_to_database()
    db.session.commit()

    for query in ("", "q=SHARED", "serial=SHARED-1", "group=g", "tag=t", "online=false",
                  "status=provisioned"):
        items = client.get(f"{API}/devices?{query}", headers=mine.headers).json["items"]
        assert [d["id"] for d in items] == [str(own.id)], query
        assert items[0]["online"] is False
    for query in ("online=true", "status=active", "firmware_version=9.9.9",
                  f"product_id={theirs.product.id}"):
        assert client.get(f"{API}/devices?{query}",
                          headers=mine.headers).json["items"] == [], query
        export = client.get(f"{API}/devices/export.csv?{query}", headers=mine.headers)
        assert export.get_data(as_text=True).count("\n") == 1, query
    export = client.get(f"{API}/devices/export.csv", headers=mine.headers).get_data(as_text=True)
    assert str(own.id) in export and str(foreign.id) not in export

    summary = client.get(f"{API}/fleet/summary", headers=mine.headers).json
    assert (summary["total"], summary["online"], summary["by_status"]["active"]) == (1, 0, 0)
    theirs_summary = client.get(f"{API}/fleet/summary", headers=theirs.headers).json
    assert (theirs_summary["total"], theirs_summary["online"]) == (1, 1)


def test_idempotency_keys_are_per_tenant(client: Any, mine: Vendor, theirs: Vendor) -> None:
    own = make_device(mine, "SN-1")
    foreign = make_device(theirs, "SN-1")
    for vendor, device in ((mine, own), (theirs, foreign)):
        answer = client.post(f"{API}/devices/{device.id}/credentials",
                             headers={**vendor.headers, "Idempotency-Key": "station-7"})
        assert answer.status_code == 201 and answer.json["mqtt"]["password"]
        assert "Idempotent-Replayed" not in answer.headers
        assert answer.json["device_id"] == str(device.id)
    assert stored(own)[2] and stored(foreign)[2]

