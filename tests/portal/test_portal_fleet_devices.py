"""The device list: filters, keyset pages, the live summary, CSV export, bulk actions and adding
a device; roles and tenancy."""

from __future__ import annotations

import csv
import io
import re
import uuid
from typing import Any

from sqlalchemy import func, select

from accounts.models import Role
from core.db import db
from fleet import presence, services
from fleet.models import Device, DeviceStatus, HardwareKind
from tests.factories import UserFactory
from tests.fleet.fixtures import Vendor
from tests.portal.fleet_helpers import fresh, log_in_as, make_device, serials
from tests.portal.helpers import login, post, text


def online(device: Device) -> None:
    """What the presence tracker records when the device publishes its retained "online"."""
    presence.record(str(device.tenant_id), str(device.id), "status", {"state": "online"},
                    retained=False)


def test_filters(client: Any, vendor: Vendor) -> None:
    other_product, _ = services.create_product(vendor.setup.tenant.id, "Capsule",
                                               HardwareKind.CAPSULE)
    db.session.commit()
    a = make_device(vendor.product, "BEAR-001", name="Kitchen bear", group="batch-7",
                    tags=["eu", "beta"], status=DeviceStatus.ACTIVE)
    b = make_device(vendor.product, "BEAR-002", group="batch-8", tags=["eu"])
    c = make_device(other_product, "CAP-001", status=DeviceStatus.SUSPENDED)
    c.firmware_version = "2.1.0"
    db.session.commit()
    online(a)
    log_in_as(client, vendor)

    def found(query: str) -> list[str]:
        response = client.get(f"/fleet/devices{query}")
        assert response.status_code == 200, query
        return serials(response)

    assert found("") == ["BEAR-001", "BEAR-002", "CAP-001"]
    assert found("?q=BEAR") == ["BEAR-001", "BEAR-002"]
    assert found("?q=Kitchen") == ["BEAR-001"]
    assert found("?q=%25") == []  # a LIKE wildcard is a character like any other
    assert found("?status=suspended") == ["CAP-001"]
    assert found("?group=batch-8") == ["BEAR-002"]
    assert found("?tag=beta") == ["BEAR-001"]
    assert found("?tag=eu&group=batch-7") == ["BEAR-001"]
    assert found(f"?product_id={other_product.id}") == ["CAP-001"]
    assert found("?firmware_version=2.1.0") == ["CAP-001"]
    assert found("?online=yes") == ["BEAR-001"]
    assert found("?online=no") == ["BEAR-002", "CAP-001"]
    assert found("?q=BEAR&online=no") == [b.serial]
    page = text(client.get("/fleet/devices?q=nothing"))
    assert "No device matches" in page and 'data-testid="device-search-clear"' in page


def test_an_invalid_filter_is_shown_not_searched(client: Any, vendor: Vendor) -> None:
    make_device(vendor.product, "BEAR-001")
    log_in_as(client, vendor)
    for query in ("?q=a%00b", "?status=lost", f"?q={'x' * 65}", "?product_id=nope"):
        response = client.get(f"/fleet/devices{query}")
        assert response.status_code == 422, query
        assert serials(response) == []
        assert "is-invalid" in text(response)
    assert client.get("/fleet/devices?cursor=%25%25").status_code == 422


def test_keyset_pages_keep_the_filter(client: Any, vendor: Vendor) -> None:
    made = [make_device(vendor.product, f"SN-{n:03d}", group="line-1").serial for n in range(55)]
    make_device(vendor.product, "OTHER-1", group="line-2")
    log_in_as(client, vendor)
    first = client.get("/fleet/devices?group=line-1")
    assert serials(first) == made[:50]
    assert 'data-testid="devices-first"' not in text(first)
    link = re.search(r'href="(/fleet/devices\?[^"]*cursor=[^"]+)" data-testid="devices-next"',
                     text(first))
    assert link and "group=line-1" in link.group(1)
    second = client.get(link.group(1).replace("&amp;", "&"))
    assert serials(second) == made[50:]
    assert 'data-testid="devices-next"' not in text(second)
    assert 'data-testid="devices-first"' in text(second)


def test_summary_counts_this_tenants_devices(client: Any, vendor: Vendor,
                                             other_vendor: Vendor) -> None:
    a = make_device(vendor.product, status=DeviceStatus.ACTIVE)
    make_device(vendor.product)
    make_device(vendor.product, status=DeviceStatus.RETIRED)
    stranger = make_device(other_vendor.product, status=DeviceStatus.ACTIVE)
    online(a)
    online(stranger)
    log_in_as(client, vendor)
    response = client.get("/fleet/summary.json")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert response.json == {"total": 3, "online": 1, "by_status": {
        "provisioned": 1, "active": 1, "suspended": 0, "retired": 1}}
    page = text(client.get("/fleet/devices"))
    assert re.search(r'data-testid="fleet-online-count"[^>]*>1<', page)
    assert re.search(r'data-testid="fleet-total-count"[^>]*>3<', page)
    assert 'data-fleet-summary="/fleet/summary.json"' in page and "fleet.js" in page
    with client.get("/static/fleet.js") as script:
        assert script.status_code == 200 and b"data-fleet-summary" in script.data


def test_export_follows_the_filter_and_has_no_secrets(client: Any, vendor: Vendor) -> None:
    a = make_device(vendor.product, "BEAR-001", tags=["eu"], status=DeviceStatus.ACTIVE)
    password = services.issue_credentials(a)
    make_device(vendor.product, "BEAR-002", hardware_key="ab" * 16)
    make_device(vendor.product, "CAP-001")
    db.session.commit()
    log_in_as(client, vendor)
    page = text(client.get("/fleet/devices?q=BEAR"))
    assert 'href="/fleet/devices/export.csv?q=BEAR"' in page
    response = client.get("/fleet/devices/export.csv?q=BEAR")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    body = response.get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [r["serial"] for r in rows] == ["BEAR-001", "BEAR-002"]
    assert rows[0]["tags"] == "eu" and rows[0]["status"] == "active"
    assert password not in body and "$7$" not in body and "ab" * 16 not in body
    assert "password" not in body and "hardware_key" not in body


def test_bulk_action_reports_every_device_it_could_not_change(client: Any, vendor: Vendor,
                                                              other_vendor: Vendor) -> None:
    active = make_device(vendor.product, "A-1", status=DeviceStatus.ACTIVE)
    provisioned = make_device(vendor.product, "P-1")
    retired = make_device(vendor.product, "R-1", status=DeviceStatus.RETIRED)
    stranger = make_device(other_vendor.product, "X-1", status=DeviceStatus.ACTIVE)
    log_in_as(client, vendor)
    response = post(client, "/fleet/devices/bulk", {
        "action": "suspend", "next": "/fleet/devices?q=A",
        "device_ids": [str(active.id), str(provisioned.id), str(retired.id), str(stranger.id)],
    }, page="/fleet/devices")
    assert response.status_code == 200
    page = text(response)
    assert "Changed: 2. Not changed: 2." in page
    assert re.search(r'data-testid="bulk-failure" data-serial="R-1" '
                     r'data-code="invalid_status_transition"', page)
    assert re.search(r'data-testid="bulk-failure" data-serial="" data-code="not_found"', page)
    assert "X-1" not in page  # nothing about another tenant's device
    assert 'href="/fleet/devices?q=A" data-testid="bulk-back"' in page
    assert fresh(active).status is DeviceStatus.SUSPENDED
    assert fresh(provisioned).status is DeviceStatus.SUSPENDED
    assert fresh(retired).status is DeviceStatus.RETIRED
    assert fresh(stranger).status is DeviceStatus.ACTIVE


def test_bulk_action_without_failures_goes_back_to_the_list(client: Any, vendor: Vendor) -> None:
    devices = [make_device(vendor.product, f"G-{n}", group="old") for n in range(3)]
    log_in_as(client, vendor)
    response = post(client, "/fleet/devices/bulk", {
        "action": "move_group", "group": "new", "next": "/fleet/devices?group=old",
        "device_ids": [str(d.id) for d in devices[:2]]}, page="/fleet/devices")
    assert response.status_code == 302
    assert response.headers["Location"] == "/fleet/devices?group=old"
    assert [fresh(d).group_name for d in devices] == ["new", "new", "old"]
    assert "Move to group: done for 2 devices." in text(client.get("/fleet/devices"))
    # No group given: the devices leave their group.
    post(client, "/fleet/devices/bulk", {"action": "move_group", "group": "",
                                         "device_ids": [str(devices[0].id)]},
         page="/fleet/devices")
    assert fresh(devices[0]).group_name is None


def test_bulk_action_needs_a_selection_and_a_known_action(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, status=DeviceStatus.ACTIVE)
    log_in_as(client, vendor)
    nothing = post(client, "/fleet/devices/bulk", {"action": "suspend"}, page="/fleet/devices")
    assert nothing.status_code == 302
    assert "Select the devices first." in text(client.get("/fleet/devices"))
    bad = post(client, "/fleet/devices/bulk", {"action": "explode", "device_ids": str(device.id)},
               page="/fleet/devices")
    assert bad.status_code == 302
    assert fresh(device).status is DeviceStatus.ACTIVE
    foreign = post(client, "/fleet/devices/bulk", {
        "action": "suspend", "next": "https://evil.example/", "device_ids": "not-a-uuid"},
        page="/fleet/devices")
    assert foreign.status_code == 200 and 'href="/fleet/devices" data-testid="bulk-back"' in text(
        foreign)


def test_add_a_device(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    form = text(client.get(f"/fleet/devices/new?product_id={vendor.product.id}"))
    assert 'data-testid="device-form"' in form
    assert f'<option selected value="{vendor.product.id}">' in form
    response = post(client, "/fleet/devices", {
        "product_id": str(vendor.product.id), "serial": "BEAR-100", "mac": "A4-CF-12-00-01-00",
        "name": "", "group": "batch-9", "tags": "eu, beta;eu", "end_user_ref": "user-42",
        "hardware_key": "0f" * 32}, page="/fleet/devices/new")
    assert response.status_code == 302
    device = db.session.execute(select(Device).where(Device.serial == "BEAR-100")).scalar_one()
    assert response.headers["Location"] == f"/fleet/devices/{device.id}"
    assert device.mac == "a4:cf:12:00:01:00" and device.name == "BEAR-100"
    assert device.group_name == "batch-9" and device.tag_names == ["beta", "eu"]
    assert device.end_user_ref == "user-42" and device.hardware_key_encrypted
    assert device.status is DeviceStatus.PROVISIONED


def test_add_a_device_shows_what_is_wrong(client: Any, vendor: Vendor,
                                          other_vendor: Vendor) -> None:
    make_device(vendor.product, "BEAR-001")
    log_in_as(client, vendor)

    def add(**fields: str) -> Any:
        data = {"product_id": str(vendor.product.id), "serial": "BEAR-200", **fields}
        return post(client, "/fleet/devices", data, page="/fleet/devices/new")

    taken = add(serial="BEAR-001")
    assert taken.status_code == 409 and "Already registered." in text(taken)
    bad_mac = add(mac="12:34")
    assert bad_mac.status_code == 422 and "Not a MAC address (12 hex digits)." in text(bad_mac)
    bad_tag = add(tags="ok, not/ok")
    assert bad_tag.status_code == 422 and "Invalid tag" in text(bad_tag)
    bad_serial = add(serial="-starts-with-dash")
    assert bad_serial.status_code == 422
    short_key = add(hardware_key="abcd")
    assert short_key.status_code == 422 and "A hex key of 16 to 64 bytes." in text(short_key)
    foreign = add(product_id=str(other_vendor.product.id))
    assert foreign.status_code == 422  # not one of the choices
    assert db.session.execute(select(func.count()).select_from(Device)).scalar_one() == 1


def test_a_viewer_can_look_but_not_act(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, "BEAR-001", status=DeviceStatus.ACTIVE)
    log_in_as(client, vendor, Role.VIEWER)
    page = client.get("/fleet/devices")
    assert page.status_code == 200 and serials(page) == ["BEAR-001"]
    assert 'data-testid="bulk-select"' not in text(page)
    assert 'data-testid="device-add"' not in text(page)
    assert client.get("/fleet/summary.json").status_code == 200
    assert client.get("/fleet/devices/export.csv").status_code == 200
    assert client.get("/fleet/devices/new").status_code == 403
    assert post(client, "/fleet/devices/bulk", {"action": "suspend", "device_ids": str(device.id)},
                page="/fleet/devices").status_code == 403
    assert post(client, "/fleet/devices", {"product_id": str(vendor.product.id),
                                           "serial": "NEW-1"},
                page="/fleet/devices").status_code == 403
    assert fresh(device).status is DeviceStatus.ACTIVE


def test_operations_may_add_devices(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor, Role.OPERATIONS)
    assert 'data-testid="nav-fleet"' in text(client.get("/"))
    assert client.get("/fleet").headers["Location"] == "/fleet/devices"
    assert client.get("/fleet/devices/new").status_code == 200


def test_the_list_shows_only_this_tenants_devices(client: Any, vendor: Vendor,
                                                  other_vendor: Vendor) -> None:
    make_device(vendor.product, "MINE-1")
    make_device(other_vendor.product, "THEIRS-1")
    log_in_as(client, vendor)
    assert serials(client.get("/fleet/devices")) == ["MINE-1"]
    assert serials(client.get(f"/fleet/devices?product_id={other_vendor.product.id}")) == []
    export = client.get("/fleet/devices/export.csv").get_data(as_text=True)
    assert "MINE-1" in export and "THEIRS-1" not in export


def test_the_fleet_link_needs_fleet_read(client: Any, app: Any) -> None:
    user = UserFactory()
    login(client, user.email)  # a member of no tenant
    assert 'data-testid="nav-fleet"' not in text(client.get("/"))
    assert client.get("/fleet/devices").status_code == 403
    assert client.get(f"/fleet/devices/{uuid.uuid4()}").status_code == 403
