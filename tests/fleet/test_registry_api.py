"""The device registry through the REST API: products and their enrolment keys, devices and
their validation, search, keyset pages, export, bulk actions, status changes, credentials,
reset and transfer, history, the audit trail.

What one tenant can see or change of another's is in test_registry_isolation.py.
"""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from accounts.models import AuditEntry, TokenScope
from core.crypto import sha256_hex
from core.db import db
from fleet import credentials, hooks, presence, services
from fleet.models import Device, DeviceEvent, DeviceStatus, HardwareKind, Product
from tests.factories import auth, make_token
from tests.fleet.fixtures import Vendor, make_vendor, upload

API = "/api/v1"
HARDWARE_KEY = "a1" * 16


@pytest.fixture
def vendor(app: Any) -> Vendor:
    return make_vendor()


def make_device(vendor: Vendor, serial: str | None = None, **kwargs: Any) -> Device:
    device = services.create_device(vendor.product, serial or f"SN-{uuid.uuid4().hex[:10]}",
                                    **kwargs)
    db.session.commit()
    return device


def device_in(vendor: Vendor, status: DeviceStatus) -> Device:
    """A device brought to ``status`` the way the platform does it."""
    device = make_device(vendor)
    if status is not DeviceStatus.PROVISIONED:
        services.activate(device)
    if status in (DeviceStatus.SUSPENDED, DeviceStatus.RETIRED):
        services.change_status(device, "suspend" if status is DeviceStatus.SUSPENDED
                               else "retire")
    db.session.commit()
    return device


def audit(vendor: Vendor, action: str | None = None) -> list[AuditEntry]:
    stmt = select(AuditEntry).where(AuditEntry.tenant_id == vendor.setup.tenant.id)
    if action:
        stmt = stmt.where(AuditEntry.action == action)
    return list(db.session.execute(stmt.order_by(AuditEntry.id)).scalars())


def error_of(response: Any) -> tuple[int, str]:
    return response.status_code, response.json["error"]["code"]


def bootstrap(client: Any, key: str, mac: str = "a4:cf:12:34:56:78") -> Any:
    return client.post("/bootstrap/ota/", json={"application": {"version": "1.0.0"}},
                       headers={"Enrolment-Key": key, "Device-Id": mac})


# --- products ------------------------------------------------------------------------------


def test_product_crud_shows_the_enrolment_key_only_at_creation(
        client: Any, vendor: Vendor) -> None:
    created = client.post(f"{API}/products", json={
        "name": "  Reading Glasses ", "hardware_kind": "glasses", "description": "G2",
        "requires_hardware_binding": True}, headers=vendor.headers)
    assert created.status_code == 201, created.json
    body = created.json
    key = body["enrolment_key"]
    assert key.startswith("enr") and body["enrolment_key_prefix"] == key[:12]
    assert (body["name"], body["hardware_kind"], body["description"]) == (
        "Reading Glasses", "glasses", "G2")
    assert body["requires_hardware_binding"] is True and body["allow_self_registration"] is True
    product = db.session.get(Product, uuid.UUID(body["id"]))
    assert product is not None and product.enrolment_key_hash == sha256_hex(key)
    assert key not in str(vars(product))

    shown = client.get(f"{API}/products/{body['id']}", headers=vendor.headers)
    assert shown.status_code == 200 and "enrolment_key" not in shown.json
    assert shown.json["enrolment_key_prefix"] == key[:12]
    listed = client.get(f"{API}/products", headers=vendor.headers).json
    assert [p["name"] for p in listed["items"]] == ["Companion Bear", "Reading Glasses"]
    assert key not in str(listed)

    patched = client.patch(f"{API}/products/{body['id']}", headers=vendor.headers, json={
        "name": "Sun Glasses", "description": "", "allow_self_registration": False})
    assert patched.status_code == 200, patched.json
    assert (patched.json["name"], patched.json["description"],
            patched.json["allow_self_registration"]) == ("Sun Glasses", "", False)
    assert "enrolment_key" not in patched.json

    assert [e.details for e in audit(vendor, "product.update")] == [
        {"name": "Sun Glasses", "description": "", "allow_self_registration": False}]
    unchanged = client.patch(f"{API}/products/{body['id']}", json={"name": "Sun Glasses"},
                             headers=vendor.headers)
    assert unchanged.status_code == 200
    assert len(audit(vendor, "product.update")) == 1  # nothing changed, nothing audited


def test_product_names_are_unique_per_tenant(client: Any, vendor: Vendor) -> None:
    same = client.post(f"{API}/products", json={"name": "Companion Bear",
                                                "hardware_kind": "toy"}, headers=vendor.headers)
    assert error_of(same) == (409, "product_exists")
    other = client.post(f"{API}/products", json={"name": "Capsule", "hardware_kind": "capsule"},
                        headers=vendor.headers).json
    renamed = client.patch(f"{API}/products/{other['id']}", json={"name": "Companion Bear"},
                           headers=vendor.headers)
    assert error_of(renamed) == (409, "product_exists")
    elsewhere = make_vendor()
    assert client.post(f"{API}/products", json={"name": "Capsule", "hardware_kind": "capsule"},
                       headers=elsewhere.headers).status_code == 201


@pytest.mark.parametrize(("body", "field"), [
    ({"hardware_kind": "toy"}, "name"),
    ({"name": "   ", "hardware_kind": "toy"}, "name"),
    ({"name": "x" * 201, "hardware_kind": "toy"}, "name"),
    ({"name": "Bad\x00name", "hardware_kind": "toy"}, "name"),
    ({"name": "Lamp"}, "hardware_kind"),
    ({"name": "Lamp", "hardware_kind": "lamp"}, "hardware_kind"),
    ({"name": "Lamp", "hardware_kind": "toy", "description": "d" * 2001}, "description"),
    ({"name": "Lamp", "hardware_kind": "toy", "requires_hardware_binding": "maybe"},
     "requires_hardware_binding"),
    ({"name": "Lamp", "hardware_kind": "toy", "enrolment_key": "enr_mine"}, "enrolment_key"),
])
def test_product_validation_names_the_field(client: Any, vendor: Vendor, body: dict[str, Any],
                                            field: str) -> None:
    answer = client.post(f"{API}/products", json=body, headers=vendor.headers)
    assert error_of(answer) == (422, "validation_failed")
    assert list(answer.json["error"]["details"]) == [field]
    assert len(audit(vendor, "product.create")) == 1  # the fixture's product only


def test_rotating_the_enrolment_key_refuses_the_old_one_at_bootstrap(client: Any,
                                                                     vendor: Vendor) -> None:
    old = vendor.enrolment_key
    assert bootstrap(client, old).status_code == 200
    rotated = client.post(f"{API}/products/{vendor.product.id}/enrolment-key",
                          headers=vendor.headers)
    assert rotated.status_code == 200, rotated.json
    new = rotated.json["enrolment_key"]
    assert new != old and rotated.json["enrolment_key_prefix"] == new[:12]

    refused = bootstrap(client, old)
    assert error_of(refused) == (401, "invalid_enrolment_key")
    path_refused = client.post(f"/bootstrap/{old}/ota/", json={},
                               headers={"Device-Id": "a4:cf:12:34:56:78"})
    assert error_of(path_refused) == (401, "invalid_enrolment_key")
    assert "activation" in bootstrap(client, new).json
    assert [e.target_id for e in audit(vendor, "product.rotate_enrolment_key")] == [
        str(vendor.product.id)]


def test_a_replayed_product_creation_does_not_show_the_key_again(client: Any,
                                                                 vendor: Vendor) -> None:
    headers = {**vendor.headers, "Idempotency-Key": "product-1"}
    body = {"name": "Desk Capsule", "hardware_kind": "capsule"}
    first = client.post(f"{API}/products", json=body, headers=headers)
    again = client.post(f"{API}/products", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json["enrolment_key"] and again.json["enrolment_key"] is None
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json["id"] == first.json["id"]
    assert len(audit(vendor, "product.create")) == 2  # the fixture's product and this one


# --- devices -------------------------------------------------------------------------------


def test_device_crud(client: Any, vendor: Vendor) -> None:
    created = client.post(f"{API}/devices", headers=vendor.headers, json={
        "product_id": str(vendor.product.id), "serial": "BEAR-0001", "mac": "A4-CF-12-00-00-01",
        "group": " batch-1 ", "tags": ["red", "blue", "red"], "hardware_key": HARDWARE_KEY,
        "end_user_ref": "app-user-7"})
    assert created.status_code == 201, created.json
    body = created.json
    device_id = body["id"]
    assert (body["serial"], body["mac"], body["name"], body["group"], body["tags"]) == (
        "BEAR-0001", "a4:cf:12:00:00:01", "BEAR-0001", "batch-1", ["blue", "red"])
    assert (body["status"], body["online"], body["has_credentials"], body["has_hardware_key"]) == (
        "provisioned", False, False, True)
    assert body["end_user_ref"] == "app-user-7" and body["activated_at"] is None
    tenant_id = vendor.setup.tenant.id
    assert body["mqtt_username"] == f"{tenant_id}/d/{device_id}"
    assert body["topic_prefix"] == f"t/{tenant_id}/d/{device_id}"
    assert HARDWARE_KEY not in created.get_data(as_text=True)
    device = db.session.get(Device, uuid.UUID(device_id))
    assert device is not None and device.hardware_key_encrypted
    assert HARDWARE_KEY not in device.hardware_key_encrypted

    fetched = client.get(f"{API}/devices/{device_id}", headers=vendor.headers)
    assert fetched.status_code == 200 and fetched.json == body

    patched = client.patch(f"{API}/devices/{device_id}", headers=vendor.headers, json={
        "name": " Kitchen bear ", "group": "batch-2", "tags": ["green"], "end_user_ref": None})
    assert patched.status_code == 200, patched.json
    assert (patched.json["name"], patched.json["group"], patched.json["tags"],
            patched.json["end_user_ref"]) == ("Kitchen bear", "batch-2", ["green"], None)
    ungrouped = client.patch(f"{API}/devices/{device_id}", json={"group": None, "tags": []},
                             headers=vendor.headers)
    assert (ungrouped.json["group"], ungrouped.json["tags"]) == (None, [])
    assert ungrouped.json["name"] == "Kitchen bear"

    assert [e.details for e in audit(vendor, "device.create")] == [{"serial": "BEAR-0001"}]
    assert [e.details for e in audit(vendor, "device.update")] == [
        {"name": "Kitchen bear", "group": "batch-2", "tags": ["green"], "end_user_ref": "changed"},
        {"group": None, "tags": []}]


def test_a_patch_that_changes_nothing_is_not_audited(client: Any, vendor: Vendor) -> None:
    grouped = make_device(vendor, "SN-SAME", group="g1", tags=["t1"], end_user_ref="u1")
    bare = make_device(vendor, "SN-BARE")
    for device, body in ((grouped, {"name": "SN-SAME", "group": "g1", "tags": ["t1"],
                                    "end_user_ref": "u1"}),
                         (bare, {"group": None, "end_user_ref": None, "tags": []}),
                         (bare, {"group": "", "end_user_ref": ""})):
        same = client.patch(f"{API}/devices/{device.id}", json=body, headers=vendor.headers)
        assert same.status_code == 200, same.json
    assert [e.details for e in audit(vendor, "device.update")] == []


def test_serials_and_macs_are_unique_per_tenant(client: Any, vendor: Vendor) -> None:
    make_device(vendor, "BEAR-1", mac="a4:cf:12:00:00:01")

    def create(serial: str, mac: str | None = None, who: Vendor = vendor) -> Any:
        body = {"product_id": str(who.product.id), "serial": serial}
        if mac:
            body["mac"] = mac
        return client.post(f"{API}/devices", json=body, headers=who.headers)

    serial = create("BEAR-1")
    assert error_of(serial) == (409, "duplicate_serial")
    assert serial.json["error"]["details"] == {"serial": ["Already registered."]}
    mac = create("BEAR-2", "A4CF12000001")  # the same MAC written differently
    assert error_of(mac) == (409, "duplicate_mac")
    assert mac.json["error"]["details"] == {"mac": ["Already registered."]}
    assert create("BEAR-2").status_code == 201
    assert create("BEAR-3").status_code == 201  # devices without a MAC do not clash
    elsewhere = make_vendor()
    assert create("BEAR-1", "a4:cf:12:00:00:01", elsewhere).status_code == 201
    serials = db.session.execute(select(Device.serial).where(
        Device.tenant_id == vendor.setup.tenant.id).order_by(Device.serial)).scalars()
    assert list(serials) == ["BEAR-1", "BEAR-2", "BEAR-3"]


@pytest.mark.parametrize(("change", "field"), [
    ({"serial": None}, "serial"),
    ({"serial": ""}, "serial"),
    ({"serial": "has space"}, "serial"),
    ({"serial": "-leading-dash"}, "serial"),
    ({"serial": "S" * 65}, "serial"),
    ({"mac": "a4:cf:12:00:00"}, "mac"),
    ({"mac": "zz:cf:12:00:00:01"}, "mac"),
    ({"name": "n" * 201}, "name"),
    ({"group": "g" * 101}, "group"),
    ({"group": "bad\x07group"}, "group"),
    ({"tags": ["ok", "not ok"]}, "tags"),
    ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
    ({"tags": "red"}, "tags"),
    ({"hardware_key": "a1" * 15}, "hardware_key"),
    ({"hardware_key": "zz" * 16}, "hardware_key"),
    ({"end_user_ref": "u" * 201}, "end_user_ref"),
    ({"product_id": "not-a-uuid"}, "product_id"),
    ({"product_id": None}, "product_id"),
    ({"status": "active"}, "status"),
])
def test_device_validation_names_the_field(client: Any, vendor: Vendor, change: dict[str, Any],
                                           field: str) -> None:
    body = {"product_id": str(vendor.product.id), "serial": "SN-VALID", **change}
    body = {k: v for k, v in body.items() if v is not None}
    answer = client.post(f"{API}/devices", json=body, headers=vendor.headers)
    assert error_of(answer) == (422, "validation_failed"), answer.json
    assert list(answer.json["error"]["details"]) == [field]
    assert db.session.execute(select(Device)).first() is None


@pytest.mark.parametrize(("body", "field"), [
    ({"name": ""}, "name"),
    ({"name": " "}, "name"),
    ({"tags": ["a b"]}, "tags"),
    ({"group": "g" * 101}, "group"),
    ({"serial": "NEW-SERIAL"}, "serial"),
    ({"product_id": str(uuid.uuid4())}, "product_id"),
])
def test_device_update_validation(client: Any, vendor: Vendor, body: dict[str, Any],
                                  field: str) -> None:
    device = make_device(vendor, "SN-KEEP")
    answer = client.patch(f"{API}/devices/{device.id}", json=body, headers=vendor.headers)
    assert error_of(answer) == (422, "validation_failed")
    assert list(answer.json["error"]["details"]) == [field]
    db.session.refresh(device)
    assert (device.serial, device.name, device.product_id) == (
        "SN-KEEP", "SN-KEEP", vendor.product.id)


def test_malformed_bodies_and_ids(client: Any, vendor: Vendor) -> None:
    not_json = client.post(f"{API}/devices", data="{nope", content_type="application/json",
                           headers=vendor.headers)
    assert error_of(not_json) == (400, "malformed_json")
    a_list = client.post(f"{API}/devices", json=[{"serial": "X"}], headers=vendor.headers)
    assert a_list.status_code == 422
    for path in ("/devices/not-a-uuid", f"/devices/{uuid.uuid4()}",
                 f"/products/{uuid.uuid4()}", "/products/12"):
        assert error_of(client.get(f"{API}{path}", headers=vendor.headers)) == (404, "not_found")
    no_token = client.get(f"{API}/devices")
    assert no_token.status_code == 401


# --- search, keyset pages, export --------------------------------------------------------------


def go_online(device: Device) -> None:
    presence.record(str(device.tenant_id), str(device.id), "status", {"state": "online"},
                    retained=False)


def report_firmware(device: Device, version: str) -> None:
    """As the device's retained state message would, then the periodic flush to Postgres."""
    presence.record(str(device.tenant_id), str(device.id), "state",
                    {"firmware_version": version}, retained=False)
    presence.flush_to_database()
    db.session.commit()


def serials(client: Any, vendor: Vendor, query: str) -> list[str]:
    answer = client.get(f"{API}/devices?{query}", headers=vendor.headers)
    assert answer.status_code == 200, (query, answer.json)
    return [d["serial"] for d in answer.json["items"]]


@pytest.fixture
def fleet(vendor: Vendor) -> dict[str, Device]:
    """Devices that differ in every searchable attribute."""
    capsule, _ = services.create_product(vendor.setup.tenant.id, "Capsule", HardwareKind.CAPSULE)
    db.session.commit()
    devices = {
        "BEAR-001": make_device(vendor, "BEAR-001", name="Kitchen bear", group="g1",
                                tags=["blue", "v2"]),
        "BEAR-002": make_device(vendor, "BEAR-002", name="Bedroom", group="g1", tags=["red"]),
        "CAT-001": services.create_device(capsule, "CAT-001", name="Bear cub", group="g2",
                                          tags=["blue"]),
        "BEAR_X1": make_device(vendor, "BEAR_X1", name="Underscore"),
        "BEARX12": make_device(vendor, "BEARX12", name="No underscore"),
    }
    services.activate(devices["BEAR-001"])
    services.change_status(devices["CAT-001"], "suspend")
    services.change_status(devices["BEAR_X1"], "retire")
    db.session.commit()
    go_online(devices["BEAR-001"])
    go_online(devices["BEARX12"])
    report_firmware(devices["BEAR-001"], "1.2.0")
    report_firmware(devices["BEAR-002"], "1.3.0")
    return devices


@pytest.mark.parametrize(("query", "expected"), [
    ("", ["BEAR-001", "BEAR-002", "CAT-001", "BEAR_X1", "BEARX12"]),
    ("q=BEAR", ["BEAR-001", "BEAR-002", "BEAR_X1", "BEARX12"]),
    ("q=Bear", ["CAT-001"]),  # a name prefix
    ("q=Kitchen", ["BEAR-001"]),
    ("q=BEAR_", ["BEAR_X1"]),  # "_" is a character, not a LIKE wildcard
    ("q=%25", []),
    ("q=bear", []),
    ("q=EAR", []),  # a prefix, not a substring
    ("serial=BEAR-001", ["BEAR-001"]),
    ("serial=BEAR", []),
    ("status=active", ["BEAR-001"]),
    ("status=provisioned", ["BEAR-002", "BEARX12"]),
    ("status=suspended", ["CAT-001"]),
    ("status=retired", ["BEAR_X1"]),
    ("group=g1", ["BEAR-001", "BEAR-002"]),
    ("group=g", []),
    ("tag=blue", ["BEAR-001", "CAT-001"]),
    ("tag=v2", ["BEAR-001"]),
    ("tag=blu", []),
    ("firmware_version=1.2.0", ["BEAR-001"]),
    ("firmware_version=1.3.0", ["BEAR-002"]),
    ("online=true", ["BEAR-001", "BEARX12"]),
    ("online=false", ["BEAR-002", "CAT-001", "BEAR_X1"]),
    ("group=g1&tag=blue", ["BEAR-001"]),
    ("q=BEAR&online=false", ["BEAR-002", "BEAR_X1"]),
    ("status=provisioned&online=true", ["BEARX12"]),
    ("group=g1&status=suspended", []),
])
def test_search_filters(client: Any, vendor: Vendor, fleet: dict[str, Device], query: str,
                        expected: list[str]) -> None:
    assert serials(client, vendor, query) == expected


def test_search_by_product_and_the_online_flag_of_each_device(
        client: Any, vendor: Vendor, fleet: dict[str, Device]) -> None:
    capsule = fleet["CAT-001"].product_id
    assert serials(client, vendor, f"product_id={capsule}") == ["CAT-001"]
    assert serials(client, vendor, f"product_id={vendor.product.id}&tag=blue") == ["BEAR-001"]
    assert serials(client, vendor, f"product_id={uuid.uuid4()}") == []
    items = client.get(f"{API}/devices", headers=vendor.headers).json["items"]
    assert {d["serial"]: d["online"] for d in items} == {
        "BEAR-001": True, "BEAR-002": False, "CAT-001": False, "BEAR_X1": False,
        "BEARX12": True}
    assert {d["serial"]: d["firmware_version"] for d in items}["BEAR-001"] == "1.2.0"
    assert client.get(f"{API}/devices/{fleet['BEAR-001'].id}",
                      headers=vendor.headers).json["online"] is True


@pytest.mark.parametrize(("query", "field"), [
    ("status=lost", "status"),
    ("online=perhaps", "online"),
    ("product_id=not-a-uuid", "product_id"),
    ("limit=0", "limit"),
    ("limit=201", "limit"),
    ("cursor=not-a-cursor", "cursor"),
    (f"q={'x' * 65}", "q"),
    ("group=bad%07group", "group"),
])
def test_search_arguments_are_validated(client: Any, vendor: Vendor, query: str,
                                        field: str) -> None:
    for path in ("/devices", "/devices/export.csv"):
        answer = client.get(f"{API}{path}?{query}", headers=vendor.headers)
        assert error_of(answer) == (422, "validation_failed"), (path, answer.json)
        assert list(answer.json["error"]["details"]) == [field]


def walk(client: Any, vendor: Vendor, query: str, between: Any = None) -> list[list[str]]:
    """Every page of ``/devices?query`` (``between()`` runs after the first page)."""
    pages: list[list[str]] = []
    cursor = None
    while True:
        url = f"{API}/devices?{query}" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=vendor.headers).json
        pages.append([d["serial"] for d in page["items"]])
        cursor = page["next_cursor"]
        if len(pages) == 1 and between is not None:
            between()
        if cursor is None:
            return pages


def test_keyset_pages_cover_every_device_once_while_the_fleet_changes(
        client: Any, vendor: Vendor) -> None:
    created = [make_device(vendor, f"PAGE-{i:02d}", group="even" if i % 2 == 0 else "odd")
               for i in range(8)]
    names = [d.serial for d in created]

    assert walk(client, vendor, "limit=3") == [names[:3], names[3:6], names[6:]]
    assert walk(client, vendor, "limit=8") == [names]  # an exact fit has no empty next page
    assert walk(client, vendor, "limit=2&group=even") == [
        names[0:4:2], names[4:8:2]]

    def change_the_fleet() -> None:
        # A device of the first page leaves the filter; a new one arrives: no page shifts.
        services.change_status(created[0], "retire")
        make_device(vendor, "PAGE-NEW")

    pages = walk(client, vendor, "limit=3&status=provisioned", between=change_the_fleet)
    assert pages == [names[:3], names[3:6], [*names[6:], "PAGE-NEW"]]


def test_export_is_every_matching_device_without_secrets(client: Any, vendor: Vendor) -> None:
    rows = "".join(f"EXP-{i:03d},,,batch,a;b,\n" for i in range(250))
    assert upload(client, vendor, "serial,mac,name,group,tags,hardware_key\n" + rows,
                  activate=True).status_code == 201
    secret = make_device(vendor, "EXP-SECRET", mac="a4:cf:12:00:00:09",
                         hardware_key=HARDWARE_KEY)
    password = services.issue_credentials(secret)
    db.session.commit()
    go_online(secret)

    everything = client.get(f"{API}/devices/export.csv", headers=vendor.headers)
    assert everything.status_code == 200
    assert everything.mimetype == "text/csv"
    assert everything.headers["Content-Disposition"] == 'attachment; filename="devices.csv"'
    text = everything.get_data(as_text=True)
    table = list(csv.DictReader(io.StringIO(text)))
    assert list(table[0]) == ["id", "serial", "mac", "name", "group", "tags", "status",
                              "product_id", "firmware_version", "config_version",
                              "activated_at", "last_seen_at", "created_at"]
    assert len(table) == 251 and [r["serial"] for r in table][:2] == ["EXP-000", "EXP-001"]
    assert (table[0]["group"], table[0]["tags"], table[0]["status"]) == ("batch", "a;b",
                                                                          "active")
    last = table[-1]
    assert (last["serial"], last["mac"], last["status"], last["id"]) == (
        "EXP-SECRET", "a4:cf:12:00:00:09", "provisioned", str(secret.id))
    db.session.refresh(secret)
    for leak in (password, secret.mqtt_password_hash, "$7$", HARDWARE_KEY,
                 secret.hardware_key_encrypted, vendor.enrolment_key,
                 vendor.product.enrolment_key_hash):
        assert leak not in text

    provisioned = client.get(f"{API}/devices/export.csv?status=provisioned",
                             headers=vendor.headers).get_data(as_text=True)
    assert [r["serial"] for r in csv.DictReader(io.StringIO(provisioned))] == ["EXP-SECRET"]
    online = client.get(f"{API}/devices/export.csv?online=true&q=EXP-S",
                        headers=vendor.headers).get_data(as_text=True)
    assert [r["serial"] for r in csv.DictReader(io.StringIO(online))] == ["EXP-SECRET"]
    none = client.get(f"{API}/devices/export.csv?tag=missing", headers=vendor.headers)
    assert none.get_data(as_text=True).count("\n") == 1  # the header only


# --- bulk actions --------------------------------------------------------------------------------


def bulk(client: Any, vendor: Vendor, action: str, devices: list[Any], **extra: Any) -> Any:
    ids = [str(getattr(d, "id", d)) for d in devices]
    return client.post(f"{API}/devices/bulk", json={"action": action, "device_ids": ids,
                                                    **extra}, headers=vendor.headers)


def test_bulk_status_changes_report_each_failure(client: Any, vendor: Vendor) -> None:
    active, provisioned, retired = device_in(vendor, A), device_in(vendor, P), device_in(vendor, R)
    services.issue_credentials(active)
    db.session.commit()
    missing = uuid.uuid4()
    audited = len(audit(vendor))

    suspended = bulk(client, vendor, "suspend", [active, provisioned, retired, missing])
    assert suspended.status_code == 200, suspended.json
    assert suspended.json == {
        "changed": [str(active.id), str(provisioned.id)],
        "failed": {str(retired.id): CONFLICT, str(missing): "not_found"}}
    assert [(e.action, e.target_id) for e in audit(vendor)[audited:]] == [
        ("device.suspend", str(active.id)), ("device.suspend", str(provisioned.id))]

    resumed = bulk(client, vendor, "resume", [active, provisioned, retired])
    assert resumed.json["failed"] == {str(retired.id): CONFLICT}
    for device, status in ((active, A), (provisioned, P), (retired, R)):
        db.session.refresh(device)
        assert device.status is status

    retire = bulk(client, vendor, "retire", [active, provisioned])
    assert retire.json == {"changed": [str(active.id), str(provisioned.id)], "failed": {}}
    db.session.refresh(active)
    assert active.status is R and active.mqtt_password_hash is None


def test_bulk_move_group(client: Any, vendor: Vendor) -> None:
    first = make_device(vendor, group="old", tags=["keep"])
    second = make_device(vendor)
    moved = bulk(client, vendor, "move_group", [first, second], group="shelf-3")
    assert moved.json == {"changed": [str(first.id), str(second.id)], "failed": {}}
    assert serials(client, vendor, "group=shelf-3") == [first.serial, second.serial]
    assert [e.details for e in audit(vendor, "device.update")] == [
        {"group": "shelf-3"}, {"group": "shelf-3"}]
    for extra in ({}, {"group": None}, {"group": ""}):
        assert bulk(client, vendor, "move_group", [first], **extra).status_code == 200
        db.session.refresh(first)
        assert first.group_name is None and first.tag_names == ["keep"]
    assert len(audit(vendor, "device.update")) == 3  # taken out once; then nothing changed


@pytest.mark.parametrize(("body", "field"), [
    ({"action": "delete", "device_ids": ["00000000-0000-0000-0000-000000000000"]}, "action"),
    ({"device_ids": ["00000000-0000-0000-0000-000000000000"]}, "action"),
    ({"action": "suspend", "device_ids": []}, "device_ids"),
    ({"action": "suspend"}, "device_ids"),
    ({"action": "suspend", "device_ids": ["not-a-uuid"]}, "device_ids"),
    ({"action": "suspend", "device_ids": [str(uuid.UUID(int=i)) for i in range(1001)]},
     "device_ids"),
    ({"action": "move_group", "device_ids": ["00000000-0000-0000-0000-000000000000"],
      "group": "g" * 101}, "group"),
])
def test_bulk_validation(client: Any, vendor: Vendor, body: dict[str, Any], field: str) -> None:
    device = make_device(vendor)
    answer = client.post(f"{API}/devices/bulk", json=body, headers=vendor.headers)
    assert error_of(answer) == (422, "validation_failed")
    assert list(answer.json["error"]["details"]) == [field]
    db.session.refresh(device)
    assert device.status is P


# --- status ----------------------------------------------------------------------------------

P, A, S, R = (DeviceStatus.PROVISIONED, DeviceStatus.ACTIVE, DeviceStatus.SUSPENDED,
              DeviceStatus.RETIRED)
CONFLICT = "invalid_status_transition"
# (from, action) -> the status after it, or the conflict; None = no change, nothing audited.
TRANSITIONS = [
    (P, "activate", A), (P, "suspend", S), (P, "resume", CONFLICT), (P, "retire", R),
    (A, "activate", None), (A, "suspend", S), (A, "resume", None), (A, "retire", R),
    (S, "activate", CONFLICT), (S, "suspend", None), (S, "resume", A), (S, "retire", R),
    (R, "activate", CONFLICT), (R, "suspend", CONFLICT), (R, "resume", CONFLICT),
    (R, "retire", None),
]


@pytest.mark.parametrize(("start", "action", "outcome"), TRANSITIONS,
                         ids=[f"{s.value}-{a}" for s, a, _ in TRANSITIONS])
def test_status_transitions(client: Any, vendor: Vendor, start: DeviceStatus, action: str,
                            outcome: DeviceStatus | str | None) -> None:
    device = device_in(vendor, start)
    audited = len(audit(vendor))
    answer = client.post(f"{API}/devices/{device.id}/{action}", headers=vendor.headers)
    db.session.refresh(device)
    if outcome == CONFLICT:
        assert error_of(answer) == (409, CONFLICT)
        assert start.value in answer.json["error"]["message"]
        assert device.status is start
        assert len(audit(vendor)) == audited
        return
    assert answer.status_code == 200, answer.json
    expected = start if outcome is None else outcome
    assert answer.json["status"] == expected.value and device.status is expected
    actions = [e.action for e in audit(vendor)[audited:]]
    assert actions == ([] if outcome is None else [f"device.{action}"])


def test_resuming_a_device_that_was_never_activated_keeps_it_provisioned(
        client: Any, vendor: Vendor) -> None:
    device = make_device(vendor)
    services.change_status(device, "suspend")
    db.session.commit()
    resumed = client.post(f"{API}/devices/{device.id}/resume", headers=vendor.headers)
    assert resumed.status_code == 200 and resumed.json["status"] == "provisioned"
    assert client.post(f"{API}/devices/{device.id}/activate",
                       headers=vendor.headers).json["status"] == "active"


def test_a_reset_device_needs_a_new_activation_even_when_suspended(client: Any,
                                                                   vendor: Vendor) -> None:
    """Resume must not bring a reset device back to active without its activation (hooks)."""
    device = device_in(vendor, S)
    reset = client.post(f"{API}/devices/{device.id}/reset", headers=vendor.headers)
    assert reset.status_code == 200 and reset.json["status"] == "suspended"
    assert reset.json["activated_at"] is None
    resumed = client.post(f"{API}/devices/{device.id}/resume", headers=vendor.headers)
    assert resumed.json["status"] == "provisioned"
    activations: list[list[str]] = []

    def count(device: Device, history: list[DeviceEvent]) -> None:
        activations.append([e.kind for e in history])

    hooks.register_activation_hook(count)
    try:
        again = client.post(f"{API}/devices/{device.id}/activate", headers=vendor.headers)
    finally:
        hooks.unregister_activation_hook(count)
    assert again.json["status"] == "active" and again.json["activated_at"]
    assert len(activations) == 1 and activations[0][-2:] == ["reset", "resume"]


def test_retiring_revokes_credentials_and_is_final(client: Any, vendor: Vendor) -> None:
    device = device_in(vendor, A)
    services.issue_credentials(device)
    db.session.commit()
    retired = client.post(f"{API}/devices/{device.id}/retire", headers=vendor.headers)
    assert retired.json["status"] == "retired" and retired.json["has_credentials"] is False
    for path, body in (("credentials", None), ("reset", None),
                       ("transfer", {"end_user_ref": "someone"})):
        refused = client.post(f"{API}/devices/{device.id}/{path}", json=body,
                              headers=vendor.headers)
        assert error_of(refused) == (409, CONFLICT), path
    db.session.refresh(device)
    assert device.status is R and device.mqtt_password_hash is None


# --- credentials ------------------------------------------------------------------------------


def test_credentials_are_shown_once_stored_as_mosquitto_hashes_and_rotated(
        client: Any, vendor: Vendor) -> None:
    device = device_in(vendor, A)
    issued = client.post(f"{API}/devices/{device.id}/credentials", headers=vendor.headers)
    assert issued.status_code == 201, issued.json
    mqtt = issued.json["mqtt"]
    assert issued.json["device_id"] == str(device.id)
    assert (mqtt["client_id"], mqtt["username"], mqtt["topic_prefix"]) == (
        str(device.id), device.mqtt_username, device.topic_prefix)
    assert mqtt["publish_topic"] == f"{device.topic_prefix}/up"
    assert mqtt["subscribe_topic"] == f"{device.topic_prefix}/down"
    first = mqtt["password"]
    assert len(first) >= 32
    db.session.refresh(device)
    assert device.mqtt_password_hash.startswith(f"$7${credentials.ITERATIONS}$")
    assert credentials.verify_password(device.mqtt_password_hash, first)
    stored = " ".join(str(v) for v in db.session.execute(
        select(Device.__table__).where(Device.id == device.id)).one())
    assert first not in stored

    shown = client.get(f"{API}/devices/{device.id}", headers=vendor.headers).json
    assert shown["has_credentials"] is True and shown["credentials_issued_at"]
    assert first not in str(shown) and "$7$" not in str(shown)

    rotated = client.post(f"{API}/devices/{device.id}/credentials", headers=vendor.headers)
    second = rotated.json["mqtt"]["password"]
    db.session.refresh(device)
    assert second != first
    assert credentials.verify_password(device.mqtt_password_hash, second)
    assert not credentials.verify_password(device.mqtt_password_hash, first)
    assert [e.action for e in audit(vendor) if "credentials" in e.action] == [
        "device.credentials_issue", "device.credentials_rotate"]


def test_a_replayed_credentials_request_returns_no_password_and_rotates_nothing(
        client: Any, vendor: Vendor) -> None:
    device = device_in(vendor, A)
    other = device_in(vendor, A)
    headers = {**vendor.headers, "Idempotency-Key": "flash-station-1"}
    first = client.post(f"{API}/devices/{device.id}/credentials", headers=headers)
    assert first.status_code == 201 and first.json["mqtt"]["password"]
    db.session.refresh(device)
    stored = device.mqtt_password_hash

    replay = client.post(f"{API}/devices/{device.id}/credentials", headers=headers)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json == {"device_id": str(device.id), "mqtt": None}
    db.session.refresh(device)
    assert device.mqtt_password_hash == stored
    assert credentials.verify_password(stored, first.json["mqtt"]["password"])
    assert len(audit(vendor, "device.credentials_issue")) == 1

    reused = client.post(f"{API}/devices/{other.id}/credentials", headers=headers)
    assert error_of(reused) == (409, "idempotency_key_reused")
    db.session.refresh(other)
    assert other.mqtt_password_hash is None


def test_revoking_credentials(client: Any, vendor: Vendor) -> None:
    device = device_in(vendor, A)
    password = services.issue_credentials(device)
    db.session.commit()
    revoked = client.delete(f"{API}/devices/{device.id}/credentials", headers=vendor.headers)
    assert revoked.status_code == 204 and revoked.get_data() == b""
    db.session.refresh(device)
    assert device.mqtt_password_hash is None
    assert not credentials.verify_password(device.mqtt_password_hash, password)
    assert client.get(f"{API}/devices/{device.id}",
                      headers=vendor.headers).json["has_credentials"] is False
    again = client.delete(f"{API}/devices/{device.id}/credentials", headers=vendor.headers)
    assert again.status_code == 204
    assert [e.details for e in audit(vendor, "device.credentials_revoke")] == [
        {"reason": "revoked"}]


# --- reset, transfer, history ---------------------------------------------------------------


def test_reset_and_transfer_through_the_api(client: Any, vendor: Vendor) -> None:
    device = device_in(vendor, A)
    services.issue_credentials(device)
    db.session.commit()
    moved = client.post(f"{API}/devices/{device.id}/transfer",
                        json={"end_user_ref": " buyer-2 "}, headers=vendor.headers)
    assert moved.status_code == 200, moved.json
    assert (moved.json["end_user_ref"], moved.json["status"], moved.json["has_credentials"]) == (
        "buyer-2", "active", True)
    cleared = client.post(f"{API}/devices/{device.id}/transfer", json={"end_user_ref": None},
                          headers=vendor.headers)
    assert cleared.json["end_user_ref"] is None
    for body in ({}, {"end_user_ref": "x" * 201}):
        invalid = client.post(f"{API}/devices/{device.id}/transfer", json=body,
                              headers=vendor.headers)
        assert error_of(invalid) == (422, "validation_failed")
        assert list(invalid.json["error"]["details"]) == ["end_user_ref"]

    reset = client.post(f"{API}/devices/{device.id}/reset", headers=vendor.headers)
    assert (reset.json["status"], reset.json["has_credentials"], reset.json["end_user_ref"]) == (
        "provisioned", False, None)
    assert [(e.action, e.details) for e in audit(vendor) if e.action in (
        "device.transfer", "device.reset", "device.credentials_revoke")] == [
        ("device.transfer", {}), ("device.transfer", {}),
        ("device.credentials_revoke", {"reason": "reset"}), ("device.reset", {})]


def test_device_events_newest_first_and_paginated(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor)
    other = make_device(vendor)
    url = f"{API}/devices/{device.id}"
    for path in ("activate", "credentials", "credentials", "suspend", "resume", "reset"):
        assert client.post(f"{url}/{path}", headers=vendor.headers).status_code < 300
    client.post(f"{url}/transfer", json={"end_user_ref": "u2"}, headers=vendor.headers)
    client.delete(f"{url}/credentials", headers=vendor.headers)  # none left: no event

    kinds: list[str] = []
    cursor = None
    while True:
        query = f"?limit=3&cursor={cursor}" if cursor else "?limit=3"
        page = client.get(f"{url}/events{query}", headers=vendor.headers)
        assert page.status_code == 200, page.json
        kinds += [e["kind"] for e in page.json["items"]]
        cursor = page.json["next_cursor"]
        if cursor is None:
            break
    assert kinds == ["transferred", "reset", "credentials_revoked", "resume", "suspend",
                     "credentials_rotated", "credentials_issued", "activated", "created"]
    events = client.get(f"{url}/events", headers=vendor.headers).json["items"]
    label = f"token:{vendor.setup.token[:12]}"
    assert {e["actor"] for e in events} <= {label, "cli"}
    assert events[0]["actor"] == label
    assert next(e for e in events if e["kind"] == "suspend")["details"] == {"from": "active"}
    assert next(e for e in events if e["kind"] == "activated")["details"] == {"via": "api"}
    theirs = client.get(f"{API}/devices/{other.id}/events", headers=vendor.headers).json
    assert [e["kind"] for e in theirs["items"]] == ["created"]


def test_fleet_summary_counts_statuses_and_online_devices(client: Any, vendor: Vendor) -> None:
    empty = client.get(f"{API}/fleet/summary", headers=vendor.headers)
    assert empty.json == {"total": 0, "online": 0, "by_status": {
        "provisioned": 0, "active": 0, "suspended": 0, "retired": 0}}
    devices = [device_in(vendor, status) for status in (P, P, A, A, A, S, R)]
    for device in devices[2:4]:
        presence.record(str(device.tenant_id), str(device.id), "status", {"state": "online"},
                        retained=False)
    summary = client.get(f"{API}/fleet/summary", headers=vendor.headers).json
    assert summary == {"total": 7, "online": 2, "by_status": {
        "provisioned": 2, "active": 3, "suspended": 1, "retired": 1}}
    presence.record(str(devices[2].tenant_id), str(devices[2].id), "status",
                    {"state": "offline"}, retained=False)
    assert client.get(f"{API}/fleet/summary", headers=vendor.headers).json["online"] == 1


# --- the audit trail and who may write --------------------------------------------------------


def audited_action_names() -> set[str]:
    """Every audit action the fleet code can record, read from its source."""
    import inspect
    import re

    from fleet import imports

    names = set()
    for module in (services, imports):
        names |= set(re.findall(r'"((?:product|device)\.[a-z_]+)"', inspect.getsource(module)))
    return names | {f"device.{action}" for action in services._TRANSITIONS}


def test_every_fleet_mutation_is_audited_with_its_actor_and_target(client: Any,
                                                                   vendor: Vendor) -> None:
    headers = vendor.headers

    def post(path: str, **kwargs: Any) -> Any:
        answer = client.post(f"{API}{path}", headers=headers, **kwargs)
        assert answer.status_code < 300, (path, answer.json)
        return answer.json

    product = post("/products", json={"name": "Audited", "hardware_kind": "other"})
    assert client.patch(f"{API}/products/{product['id']}", json={"description": "d"},
                        headers=headers).status_code == 200
    post(f"/products/{product['id']}/enrolment-key")
    device = post("/devices", json={"product_id": product["id"], "serial": "AUD-1"})["id"]
    assert client.patch(f"{API}/devices/{device}", json={"name": "Audited device"},
                        headers=headers).status_code == 200
    for path in ("activate", "credentials", "credentials", "suspend", "resume"):
        post(f"/devices/{device}/{path}")
    post(f"/devices/{device}/transfer", json={"end_user_ref": "next-owner"})
    assert client.delete(f"{API}/devices/{device}/credentials", headers=headers).status_code == 204
    post(f"/devices/{device}/reset")
    post("/devices/bulk", json={"action": "retire", "device_ids": [device]})
    batch = upload(client, vendor, "serial\nAUD-2\n", issue_credentials=True)
    assert batch.status_code == 201
    assert client.post(f"{API}/device-imports/{batch.json['id']}/credentials.csv",
                      headers=headers).status_code == 200
    code = bootstrap(client, vendor.enrolment_key).json["activation"]["code"]
    claimed = post("/activation-codes/claim", json={"code": code})

    log = client.get(f"{API}/audit-log?limit=200", headers=headers).json["items"]
    token_label = f"token:{vendor.setup.token[:12]}"
    by_token = [e for e in log if e["actor"] == token_label]
    assert {e["action"] for e in by_token} == audited_action_names()
    assert all(e["actor_token_id"] and e["source_ip"] for e in by_token)
    targets = {(e["action"], e["target_type"], e["target_id"]) for e in by_token}
    assert ("product.rotate_enrolment_key", "product", product["id"]) in targets
    assert ("device.retire", "device", device) in targets
    assert ("device.import_credentials_download", "deviceimport", batch.json["id"]) in targets
    claim_entry = next(e for e in by_token if e["target_id"] == claimed["id"])
    assert claim_entry["details"] == {"via": "activation_code"}
    # The device that bootstrapped itself registered itself: no person acted.
    assert [e["actor"] for e in log if e["action"] == "device.create"
            and e["target_id"] == claimed["id"]] == ["anonymous"]


def test_read_tokens_change_nothing(client: Any, vendor: Vendor) -> None:
    """The walk in tests/accounts/test_permissions.py checks every endpoint's 403; this checks
    that a refused write leaves the device, its secrets and the audit log as they were."""
    device = device_in(vendor, A)
    services.issue_credentials(device)
    db.session.commit()
    before = (device.status, device.mqtt_password_hash, device.name)
    _, raw = make_token(vendor.setup.tenant, TokenScope.READ)
    audited = len(audit(vendor))
    reader = auth(raw)
    attempts = [
        ("POST", f"/devices/{device.id}/retire", None),
        ("POST", f"/devices/{device.id}/credentials", None),
        ("DELETE", f"/devices/{device.id}/credentials", None),
        ("PATCH", f"/devices/{device.id}", {"name": "Hijacked"}),
        ("POST", "/devices/bulk", {"action": "suspend", "device_ids": [str(device.id)]}),
        ("POST", f"/products/{vendor.product.id}/enrolment-key", None),
    ]
    for method, path, body in attempts:
        answer = client.open(f"{API}{path}", method=method, json=body, headers=reader)
        assert error_of(answer) == (403, "forbidden"), path
        assert answer.json["error"]["details"] == {"permission": "fleet:write"}
    db.session.refresh(device)
    assert (device.status, device.mqtt_password_hash, device.name) == before
    assert len(audit(vendor)) == audited
    assert bootstrap(client, vendor.enrolment_key).status_code == 200  # the key still works
    shown = client.get(f"{API}/devices/{device.id}", headers=reader)
    assert shown.status_code == 200 and shown.json["name"] == before[2]
