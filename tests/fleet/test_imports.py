"""Factory provisioning by CSV: every error class, all-or-nothing, one-time credentials."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from sqlalchemy import func, select

from core.db import db
from fleet import credentials
from fleet.models import Device, DeviceStatus
from tests.fleet.fixtures import upload

GOOD = (
    "serial,mac,name,group,tags,hardware_key\n"
    "BEAR-0001,AA:BB:CC:00:00:01,Kitchen bear,batch-7,blue;v2,"
    + "00112233445566778899aabbccddeeff\n"
    "BEAR-0002,aabbcc000002,,batch-7,,\n"
    "BEAR-0003,,Third,,red,\n"
)


def device_count(tenant_id: Any) -> int:
    return db.session.execute(
        select(func.count()).select_from(Device).where(Device.tenant_id == tenant_id)
    ).scalar_one()


def test_import_creates_devices_with_tags_groups_and_encrypted_keys(client: Any,
                                                                    vendor: Any) -> None:
    answer = upload(client, vendor, GOOD)
    assert answer.status_code == 201, answer.json
    assert answer.json["row_count"] == 3
    assert answer.json["credentials_file_available"] is False
    devices = {d.serial: d for d in db.session.execute(
        select(Device).where(Device.tenant_id == vendor.setup.tenant.id)).scalars()}
    assert set(devices) == {"BEAR-0001", "BEAR-0002", "BEAR-0003"}
    first = devices["BEAR-0001"]
    assert first.mac == "aa:bb:cc:00:00:01"
    assert first.group_name == "batch-7"
    assert first.tag_names == ["blue", "v2"]
    assert first.status is DeviceStatus.PROVISIONED
    assert first.hardware_key_encrypted and "00112233" not in first.hardware_key_encrypted
    assert devices["BEAR-0002"].name == "BEAR-0002"
    listed = client.get("/api/v1/devices?tag=blue", headers=vendor.headers).json["items"]
    assert [d["serial"] for d in listed] == ["BEAR-0001"]
    assert "hardware_key" not in listed[0]


def test_every_bad_row_is_reported_and_nothing_is_imported(client: Any, vendor: Any) -> None:
    client.post("/api/v1/devices", json={"product_id": str(vendor.product.id),
                                         "serial": "TAKEN-1"}, headers=vendor.headers)
    bad = (
        "serial,mac,tags,hardware_key\n"
        "OK-1,,,\n"
        "bad serial!,,,\n"  # line 3: serial
        "OK-2,not-a-mac,,\n"  # line 4: mac
        "OK-3,,has space,\n"  # line 5: tag
        "OK-4,,,abc\n"  # line 6: hardware key
        "OK-1,,,\n"  # line 7: duplicate of line 2
        "TAKEN-1,,,\n"  # line 8: already registered
        "OK-5,,\n"  # line 9: wrong field count
    )
    answer = upload(client, vendor, bad)
    assert answer.status_code == 422
    error = answer.json["error"]
    assert error["code"] == "import_invalid"
    by_line = {row["line"]: row["errors"] for row in error["details"]["rows"]}
    assert set(by_line) == {3, 4, 5, 6, 7, 8, 9}
    assert "serial" in by_line[3] and "mac" in by_line[4] and "tags" in by_line[5]
    assert "hardware_key" in by_line[6] and "Duplicate of line 2" in by_line[7]["serial"][0]
    assert by_line[8]["serial"] == ["Already registered."] and "_row" in by_line[9]
    assert device_count(vendor.setup.tenant.id) == 1  # only TAKEN-1


def test_malformed_files(client: Any, vendor: Any) -> None:
    cases = {
        "import_columns": "mac,name\naa:bb:cc:dd:ee:ff,x\n",
        "import_encoding": "serial\nBEAR-\xe9\n".encode("latin-1"),
        "import_not_csv": os.urandom(4096) + b"\x00",
        "import_empty": b"",
    }
    for code, content in cases.items():
        answer = upload(client, vendor, content)
        assert answer.status_code == 422, (code, answer.json)
        assert answer.json["error"]["code"] == code
    unknown = upload(client, vendor, "serial,colour\nX1,red\n")
    assert unknown.json["error"]["details"]["unknown_columns"] == ["colour"]
    assert device_count(vendor.setup.tenant.id) == 0


def test_ten_megabytes_of_garbage_is_refused_cleanly(client: Any, vendor: Any) -> None:
    garbage = os.urandom(10 * 1024 * 1024)
    answer = upload(client, vendor, garbage)
    assert answer.status_code == 422
    assert answer.json["error"]["code"] in {"import_encoding", "import_not_csv"}


def test_credentials_file_is_one_time_and_matches_the_stored_hashes(client: Any,
                                                                    vendor: Any) -> None:
    answer = upload(client, vendor, GOOD, issue_credentials=True)
    assert answer.status_code == 201
    assert answer.json["credentials_file_available"] is True
    url = f"/api/v1/device-imports/{answer.json['id']}/credentials.csv"
    first = client.post(url, headers=vendor.headers)
    assert first.status_code == 200
    assert first.headers["Cache-Control"] == "no-store"
    rows = list(csv.DictReader(io.StringIO(first.get_data(as_text=True))))
    assert len(rows) == 3
    for row in rows:
        device = db.session.get(Device, __import__("uuid").UUID(row["device_id"]))
        assert device is not None
        assert row["mqtt_username"] == device.mqtt_username
        assert row["topic_prefix"] == f"t/{device.mqtt_username}"
        assert device.mqtt_password_hash.startswith("$7$101$")
        assert credentials.verify_password(device.mqtt_password_hash, row["mqtt_password"])
    again = client.post(url, headers=vendor.headers)
    assert again.status_code == 410
    assert again.json["error"]["code"] == "credentials_already_downloaded"
    export = client.get("/api/v1/devices/export.csv", headers=vendor.headers)
    text = export.get_data(as_text=True)
    assert all(row["mqtt_password"] not in text for row in rows)
    assert "BEAR-0001" in text


def test_import_with_activation_activates_every_device(client: Any, vendor: Any) -> None:
    answer = upload(client, vendor, GOOD, activate=True)
    assert answer.status_code == 201
    statuses = set(db.session.execute(select(Device.status).where(
        Device.tenant_id == vendor.setup.tenant.id)).scalars())
    assert statuses == {DeviceStatus.ACTIVE}


def test_another_tenants_product_cannot_be_imported_into(client: Any, vendor: Any,
                                                         other_vendor: Any) -> None:
    foreign = other_vendor._replace(setup=vendor.setup)
    answer = upload(client, foreign, GOOD)
    assert answer.status_code == 404
    assert device_count(other_vendor.setup.tenant.id) == 0
