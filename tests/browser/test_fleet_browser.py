"""The fleet pages in a real browser: import a CSV with errors, read the row report, fix it,
import, download the credentials once; claim the code a bootstrapping device shows; the online
count updating live; a bulk action on selected rows. Data is committed (the live server runs in
other threads) and truncated afterwards."""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import func, select

from accounts import services as accounts
from accounts.models import Role
from core.db import db
from fleet import credentials, presence, services
from fleet.models import Device, DeviceStatus, HardwareKind, Product

pytestmark = pytest.mark.browser

PASSWORD = "a long enough password"
LIVE = 15_000  # ms: the page polls the counts every 5 s


class Vendor(NamedTuple):
    email: str
    product: Product
    enrolment_key: str


@pytest.fixture
def vendor(committed_app: Any) -> Vendor:
    user = accounts.create_user("fleet@vendor.example", PASSWORD, "Fay Fleet")
    tenant = accounts.create_tenant("Shenzhen Toys", "CNY", "Asia/Shanghai")
    accounts.add_member(tenant, user, Role.OWNER)
    product, key = services.create_product(tenant.id, "Companion Bear", HardwareKind.TOY)
    db.session.commit()
    return Vendor(user.email, product, key)


def log_in(page: Page, base: str, email: str) -> None:
    page.goto(f"{base}/login")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("dashboard-tenant")).to_be_visible()


def choose_csv(page: Page, text: str) -> None:
    page.get_by_test_id("import-file").set_input_files(
        files=[{"name": "line-3.csv", "mimeType": "text/csv", "buffer": text.encode()}])


def devices() -> int:
    db.session.expire_all()
    return db.session.execute(select(func.count()).select_from(Device)).scalar_one()


def test_import_with_errors_fix_import_and_download_the_credentials_once(
        page: Page, live_server: str, vendor: Vendor, tmp_path: Path) -> None:
    log_in(page, live_server, vendor.email)
    page.get_by_test_id("nav-fleet").click()
    page.get_by_test_id("fleet-nav-imports").click()
    expect(page.get_by_test_id("import-form")).to_be_visible()

    choose_csv(page, "serial,mac,name\n"
                     "SN-001,a4:cf:12:00:00:01,Bear 1\n"
                     "SN 002,a4:cf:12:00:00:02,Bear 2\n"
                     "SN-003,not-a-mac,Bear 3\n"
                     "SN-001,,Bear 4\n")
    page.get_by_test_id("import-credentials").check()
    page.get_by_test_id("import-submit").click()
    expect(page.get_by_test_id("import-report")).to_contain_text("nothing was imported")
    rows = page.get_by_test_id("import-error-row")
    expect(rows).to_have_count(3)
    expect(page.locator('[data-testid="import-error-row"][data-line="3"]')).to_contain_text(
        "1-64 characters")
    expect(page.locator('[data-testid="import-error-row"][data-line="4"]')).to_contain_text(
        "Not a MAC address")
    expect(page.locator('[data-testid="import-error-row"][data-line="5"]')).to_contain_text(
        "Duplicate of line 2.")
    assert devices() == 0

    choose_csv(page, "serial,mac,name\n"
                     "SN-001,a4:cf:12:00:00:01,Bear 1\n"
                     "SN-002,a4:cf:12:00:00:02,Bear 2\n"
                     "SN-003,a4:cf:12:00:00:03,Bear 3\n"
                     "SN-004,,Bear 4\n")
    expect(page.get_by_test_id("import-credentials")).to_be_checked()  # kept from last time
    page.get_by_test_id("import-submit").click()
    expect(page.get_by_test_id("import-row-count")).to_have_text("4")
    assert devices() == 4

    with page.expect_download() as download_info:
        page.get_by_test_id("credentials-download").click()
    saved = tmp_path / "credentials.csv"
    download_info.value.save_as(saved)
    rows_out = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert [r["serial"] for r in rows_out] == ["SN-001", "SN-002", "SN-003", "SN-004"]
    for row in rows_out:
        device = db.session.get(Device, uuid.UUID(row["device_id"]))
        assert device is not None
        assert credentials.verify_password(device.mqtt_password_hash, row["mqtt_password"])

    page.get_by_test_id("credentials-download").click()  # the page still shows the button
    expect(page.get_by_test_id("gone-message")).to_contain_text("already downloaded")
    expect(page.get_by_test_id("error-code")).to_have_text("credentials_already_downloaded")
    page.go_back()
    page.reload()
    expect(page.get_by_test_id("credentials-downloaded")).to_be_visible()
    expect(page.get_by_test_id("credentials-download")).to_have_count(0)


def bootstrap(base: str, key: str, mac: str) -> dict[str, Any]:
    """The device's side: check in at the xiaozhi-style OTA endpoint."""
    body = json.dumps({"mac_address": mac, "application": {"name": "xiaozhi",
                                                            "version": "1.4.0"}}).encode()
    request = urllib.request.Request(
        f"{base}/bootstrap/ota/", data=body, method="POST",
        headers={"Content-Type": "application/json", "Device-Id": mac,
                 "Client-Id": "6f1c2d3e-0000-4000-8000-000000000001", "Enrolment-Key": key})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return dict(json.load(answer))


def poll(base: str, key: str, challenge: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{base}/bootstrap/ota/activate", data=json.dumps({"challenge": challenge}).encode(),
        method="POST", headers={"Content-Type": "application/json", "Enrolment-Key": key})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status, dict(json.load(answer))


def test_claim_the_code_a_bootstrapping_device_shows(page: Page, live_server: str,
                                                     vendor: Vendor) -> None:
    shown = bootstrap(live_server, vendor.enrolment_key, "a4:cf:12:00:00:42")["activation"]
    assert poll(live_server, vendor.enrolment_key, shown["challenge"])[0] == 202

    log_in(page, live_server, vendor.email)
    page.goto(f"{live_server}/fleet/claim")
    wrong = "000000" if shown["code"] != "000000" else "111111"
    page.get_by_test_id("claim-code").fill(wrong)
    page.get_by_test_id("claim-submit").click()
    expect(page.get_by_test_id("claim-form")).to_contain_text("No device shows this code.")

    page.get_by_test_id("claim-code").fill(shown["code"])
    page.get_by_test_id("claim-end-user").fill("app-user-7")
    page.get_by_test_id("claim-submit").click()
    result = page.get_by_test_id("claim-result")
    expect(result).to_be_visible()
    expect(result.get_by_test_id("device-status")).to_have_attribute("data-status", "active")

    status, answer = poll(live_server, vendor.enrolment_key, shown["challenge"])
    assert status == 200 and answer["status"] == "activated"
    result.get_by_test_id("claim-device-link").click()
    expect(page.get_by_test_id("device-end-user")).to_have_text("app-user-7")
    expect(page.locator('[data-testid="device-event"][data-kind="activation_code_claimed"]')
           ).to_have_count(1)
    db.session.expire_all()
    device = db.session.execute(select(Device)).scalar_one()
    assert credentials.verify_password(device.mqtt_password_hash, answer["mqtt"]["password"])

    # The code is single-use: claiming it again is refused on the form.
    page.goto(f"{live_server}/fleet/claim")
    page.get_by_test_id("claim-code").fill(shown["code"])
    page.get_by_test_id("claim-submit").click()
    expect(page.get_by_test_id("claim-form")).to_contain_text("already claimed")
    with pytest.raises(urllib.error.HTTPError) as used:
        poll(live_server, vendor.enrolment_key, shown["challenge"])
    used.value.close()  # the error is also the answer, with its open connection
    assert used.value.code == 410


def test_the_counts_follow_the_fleet_live(page: Page, live_server: str, vendor: Vendor) -> None:
    device = services.create_device(vendor.product, "BEAR-LIVE")
    db.session.commit()
    log_in(page, live_server, vendor.email)
    page.goto(f"{live_server}/fleet/devices")
    online = page.get_by_test_id("fleet-online-count")
    active = page.locator('[data-testid="fleet-status-count"][data-status="active"]')
    expect(online).to_have_text("0")
    expect(active).to_have_text("0")

    # What the presence tracker records when the device publishes its retained "online".
    presence.record(str(device.tenant_id), str(device.id), "status", {"state": "online"},
                    retained=False)
    services.activate(device)
    db.session.commit()
    expect(online).to_have_text("1", timeout=LIVE)
    expect(active).to_have_text("1", timeout=LIVE)
    # The rows are not re-rendered; the list says so after a reload.
    page.reload()
    row = page.locator('[data-testid="device-row"][data-serial="BEAR-LIVE"]')
    expect(row.get_by_test_id("device-presence")).to_have_attribute("data-online", "yes")


def test_a_bulk_action_on_selected_rows(page: Page, live_server: str, vendor: Vendor) -> None:
    for n in range(3):
        services.create_device(vendor.product, f"BULK-{n}", group="line-1")
    db.session.commit()
    log_in(page, live_server, vendor.email)
    page.goto(f"{live_server}/fleet/devices?group=line-1")
    expect(page.get_by_test_id("device-row")).to_have_count(3)
    expect(page.get_by_test_id("bulk-group")).to_be_hidden()
    page.get_by_test_id("bulk-select-all").check()
    page.locator('[data-testid="device-row"][data-serial="BULK-2"]').get_by_test_id(
        "bulk-select").uncheck()
    page.get_by_test_id("bulk-action").select_option("move_group")
    page.get_by_test_id("bulk-group").fill("line-2")
    page.get_by_test_id("bulk-submit").click()  # the confirmation is accepted
    expect(page.get_by_test_id("flash")).to_contain_text("done for 2 devices")
    expect(page).to_have_url(re.compile(r"/fleet/devices\?group=line-1$"))
    expect(page.get_by_test_id("device-row")).to_have_count(1)
    db.session.expire_all()
    groups = {serial: group for serial, group in db.session.execute(
        select(Device.serial, Device.group_name))}
    assert groups == {"BULK-0": "line-2", "BULK-1": "line-2", "BULK-2": "line-1"}
    assert db.session.execute(select(Device.status).distinct()).scalars().all() == [
        DeviceStatus.PROVISIONED]
