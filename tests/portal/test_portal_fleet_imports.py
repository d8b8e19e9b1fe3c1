"""CSV import page: the row-error report (nothing imported), file-level errors, the import
summary and its one-time credentials file; roles and tenancy."""

from __future__ import annotations

import csv
import io
import re
import uuid
from typing import Any

from sqlalchemy import func, select
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from accounts.models import Role
from core.db import db
from fleet import credentials
from fleet.models import Device, DeviceImport, DeviceStatus
from tests.fleet.fixtures import Vendor
from tests.portal.fleet_helpers import log_in_as
from tests.portal.helpers import csrf, text

GOOD = ("serial,mac,name,group,tags\n"
        "SN-001,a4:cf:12:00:00:01,Bear 1,batch-7,eu;beta\n"
        "SN-002,a4:cf:12:00:00:02,Bear 2,batch-7,eu\n")


def upload(client: Any, vendor: Vendor, data: str | bytes, *, filename: str = "devices.csv",
           **options: bool) -> Any:
    """POST the import form. The body is encoded here: werkzeug's test client would spool a
    large one to a temporary file that it never closes."""
    content = data.encode() if isinstance(data, str) else data
    form: dict[str, Any] = {"csrf_token": csrf(client, "/fleet/imports"),
                            "product_id": str(vendor.product.id),
                            "file": FileStorage(io.BytesIO(content), filename=filename,
                                                content_type="text/csv")}
    form.update({name: "y" for name, on in options.items() if on})
    boundary, body = encode_multipart(form)
    return client.post("/fleet/imports", data=body,
                       content_type=f"multipart/form-data; boundary={boundary}")


def device_count() -> int:
    return db.session.execute(select(func.count()).select_from(Device)).scalar_one()


def error_rows(page: str) -> dict[int, str]:
    rows = re.findall(r'data-testid="import-error-row" data-line="(\d+)">(.*?)</tr>', page,
                      re.S)
    return {int(line): re.sub(r"<[^>]+>|\s+", " ", body) for line, body in rows}


def download(client: Any, batch_id: Any) -> Any:
    page = f"/fleet/imports/{batch_id}"
    return client.post(f"{page}/credentials.csv", data={"csrf_token": csrf(client, page)})


def test_every_bad_row_is_reported_and_nothing_is_imported(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    bad = ("serial,mac,name,group,tags,hardware_key\n"
           "SN-001,a4:cf:12:00:00:01,ok,,,\n"
           "-bad,a4:cf:12:00:00:02,,,,\n"
           "SN-003,not-a-mac,,,,\n"
           "SN-001,a4:cf:12:00:00:01,,,,\n"
           "SN-005,,,,bad/tag,abcd\n"
           "SN-006,too,many,fields,,,,\n")
    response = upload(client, vendor, bad)
    assert response.status_code == 422
    page = text(response)
    assert 'data-testid="import-report"' in page
    assert "The file has errors; nothing was imported." in page
    assert "5 lines have errors." in page
    rows = error_rows(page)
    assert sorted(rows) == [3, 4, 5, 6, 7]
    assert "Serial" in rows[3] and "1-64 characters" in rows[3]
    assert "MAC" in rows[4] and "Not a MAC address (12 hex digits)." in rows[4]
    assert "Duplicate of line 2." in rows[5]  # serial and MAC, on one line of the report
    assert rows[5].count("Duplicate of line 2.") == 2
    assert "Invalid tag" in rows[6] and "A hex key of 16 to 64 bytes." in rows[6]
    assert "Expected 6 fields, found 8." in rows[7]
    assert device_count() == 0
    assert db.session.execute(select(func.count()).select_from(DeviceImport)).scalar_one() == 0


def test_the_report_is_translated(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    client.post("/language", data={"locale": "zh_Hans", "csrf_token": csrf(client, "/")})
    page = text(upload(client, vendor, "serial,mac\nSN-1,a4:cf:12:00:00:01\n"
                                       "SN-1,\nSN-3,,extra\nSN-4,xx\n"))
    rows = error_rows(page)
    assert "序列号" in rows[3] and "与第 2 行重复。" in rows[3]
    assert "应有 2 个字段，实际为 3 个。" in rows[4]  # noqa: RUF001
    assert "不是 MAC 地址" in rows[5]
    assert "文件有错误，未导入任何设备。" in page  # noqa: RUF001


def test_an_existing_serial_is_refused(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    assert upload(client, vendor, GOOD).status_code == 302
    again = upload(client, vendor, GOOD)
    assert again.status_code == 422
    rows = error_rows(text(again))
    assert sorted(rows) == [2, 3] and "Already registered." in rows[2]
    assert device_count() == 2


def test_file_level_errors(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    cases = {
        "serial_number,mac\nSN-1,\n": ("import_columns", "Missing columns:"),
        b"serial\nSN-\xff\n": ("import_encoding", "The file is not UTF-8 text."),
        b"\x00\x01\x02binary": ("import_not_csv", "This is not a CSV file."),
        "": ("import_empty", "The file has no devices."),
        "serial,mac\n": ("import_empty", "The file has no devices."),
    }
    for data, (code, message) in cases.items():
        response = upload(client, vendor, data)
        assert response.status_code == 422, data
        page = text(response)
        assert f'data-testid="import-report" data-code="{code}"' in page, data
        assert message in page, data
    columns = text(upload(client, vendor, "serial_number,mac\nSN-1,\n"))
    assert "<code>serial</code>" in columns and "<code>serial_number</code>" in columns
    encoding = text(upload(client, vendor, b"serial\nSN-1\nSN-\xff\n"))
    assert 'data-testid="import-report-line">At line 3.<' in encoding
    assert device_count() == 0


def test_the_form_needs_a_file_and_a_product(client: Any, vendor: Vendor,
                                             other_vendor: Vendor) -> None:
    log_in_as(client, vendor)
    missing = client.post("/fleet/imports", data={"csrf_token": csrf(client, "/fleet/imports"),
                                                  "product_id": str(vendor.product.id)})
    assert missing.status_code == 422 and "Choose a CSV file." in text(missing)
    foreign = client.post("/fleet/imports", content_type="multipart/form-data", data={
        "csrf_token": csrf(client, "/fleet/imports"), "product_id": str(other_vendor.product.id),
        "file": (io.BytesIO(GOOD.encode()), "devices.csv")})
    assert foreign.status_code == 422
    assert device_count() == 0


def test_import_with_credentials_gives_the_file_once(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    response = upload(client, vendor, GOOD, filename="line-3.csv", issue_credentials=True)
    assert response.status_code == 302
    batch = db.session.execute(select(DeviceImport)).scalar_one()
    assert response.headers["Location"] == f"/fleet/imports/{batch.id}"
    summary = text(client.get(f"/fleet/imports/{batch.id}"))
    assert "2 devices imported." in summary
    assert 'data-testid="import-row-count">2<' in summary
    assert 'data-testid="credentials-download"' in summary

    first = download(client, batch.id)
    assert first.status_code == 200 and first.mimetype == "text/csv"
    assert first.headers["Cache-Control"] == "no-store"
    assert "attachment" in first.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(first.get_data(as_text=True))))
    assert [r["serial"] for r in rows] == ["SN-001", "SN-002"]
    for row in rows:
        device = db.session.get(Device, uuid.UUID(row["device_id"]))
        assert device is not None and device.status is DeviceStatus.PROVISIONED
        assert credentials.verify_password(device.mqtt_password_hash, row["mqtt_password"])
        assert row["mqtt_username"] == device.mqtt_username
        assert row["topic_prefix"] == device.topic_prefix

    second = download(client, batch.id)
    assert second.status_code == 410
    assert "The credentials file was already downloaded." in text(second)
    assert 'data-testid="error-code">credentials_already_downloaded<' in text(second)
    summary = text(client.get(f"/fleet/imports/{batch.id}"))
    assert 'data-testid="credentials-download"' not in summary
    assert 'data-testid="credentials-downloaded"' in summary
    assert rows[0]["mqtt_password"] not in summary
    listing = text(client.get("/fleet/imports"))
    assert 'data-filename="line-3.csv"' in listing and "Downloaded" in listing


def test_import_without_credentials_has_no_file(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    assert upload(client, vendor, GOOD, activate=True).status_code == 302
    batch = db.session.execute(select(DeviceImport)).scalar_one()
    summary = text(client.get(f"/fleet/imports/{batch.id}"))
    assert 'data-testid="credentials-download"' not in summary
    assert "This import issued no credentials." in summary
    gone = download(client, batch.id)
    assert gone.status_code == 410 and "no_credentials_file" in text(gone)
    statuses = db.session.execute(select(Device.status)).scalars().all()
    assert statuses == [DeviceStatus.ACTIVE, DeviceStatus.ACTIVE]


def test_a_file_larger_than_the_usual_body_limit_is_accepted(client: Any, app: Any,
                                                             vendor: Vendor) -> None:
    lines = ["serial,name"] + [f"SN-{n:05d},{'x' * 180}" for n in range(6000)]
    data = "\n".join(lines).encode()
    assert len(data) > app.config["MAX_CONTENT_LENGTH"]
    log_in_as(client, vendor)
    response = upload(client, vendor, data)
    assert response.status_code == 302
    assert device_count() == 6000
    assert client.get("/fleet/devices?q=SN-0599").status_code == 200


def test_refused_activation_imports_nothing(client: Any, vendor: Vendor,
                                            refusing_hook: list[Device]) -> None:
    log_in_as(client, vendor)
    response = upload(client, vendor, GOOD, activate=True)
    assert response.status_code == 409 and "No free licence seat." in text(response)
    assert device_count() == 0


def test_a_viewer_sees_imports_but_cannot_import(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    upload(client, vendor, GOOD, issue_credentials=True)
    batch = db.session.execute(select(DeviceImport)).scalar_one()
    client.post("/logout", data={"csrf_token": csrf(client, "/")})
    log_in_as(client, vendor, Role.VIEWER)
    page = text(client.get("/fleet/imports"))
    assert 'data-testid="import-row"' in page and 'data-testid="import-form"' not in page
    summary = text(client.get(f"/fleet/imports/{batch.id}"))
    assert 'data-testid="credentials-download"' not in summary
    assert download(client, batch.id).status_code == 403
    assert upload(client, vendor, "serial\nSN-9\n").status_code == 403
    db.session.refresh(batch)
    assert batch.credentials_file_encrypted is not None and device_count() == 2


def test_another_tenants_import_is_not_found(client: Any, vendor: Vendor,
                                             other_vendor: Vendor) -> None:
    log_in_as(client, other_vendor)
    upload(client, other_vendor, GOOD, issue_credentials=True)
    batch = db.session.execute(select(DeviceImport)).scalar_one()
    client.post("/logout", data={"csrf_token": csrf(client, "/")})
    log_in_as(client, vendor)
    assert client.get(f"/fleet/imports/{batch.id}").status_code == 404
    assert client.get("/fleet/imports/not-an-id").status_code == 404
    response = client.post(f"/fleet/imports/{batch.id}/credentials.csv",
                           data={"csrf_token": csrf(client, "/fleet/imports")})
    assert response.status_code == 404
    assert 'data-testid="import-row"' not in text(client.get("/fleet/imports"))
    db.session.refresh(batch)
    assert batch.credentials_file_encrypted is not None
