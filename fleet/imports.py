"""Factory provisioning: a CSV of up to 100,000 devices, validated whole, imported all or none.

Columns (header row required, any order): ``serial`` (required), ``mac``, ``name``, ``group``,
``tags`` (separated by ``;``), ``hardware_key`` (hex, for HMAC activation). Every bad row is
reported with its line number and nothing is imported. With ``issue_credentials`` the answer
includes a one-time credentials file (device id, MQTT username, password, topic prefix) that can
be downloaded once.
"""

from __future__ import annotations

import csv
import io
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select

from accounts import services as accounts
from core.crypto import decrypt, encrypt
from core.db import db, utcnow
from core.errors import EnsoulError, Gone, ValidationFailed
from core.ids import uuid7
from fleet import access, credentials, services
from fleet.hooks import run_activation_hooks_for_new
from fleet.models import Device, DeviceEvent, DeviceImport, DeviceStatus, DeviceTag, Product

MAX_ROWS = 100_000
MAX_BYTES = 32 * 1024 * 1024
ACTIVATION_CHUNK = 5000
COLUMNS = ("serial", "mac", "name", "group", "tags", "hardware_key")
REQUIRED = ("serial",)


class ImportInvalid(EnsoulError):
    code, http_status, message = "import_invalid", 422, "The file has errors; nothing was imported."


@dataclass
class ParsedRow:
    line: int
    serial: str
    mac: str | None
    name: str
    group: str | None
    tags: list[str]
    hardware_key: str | None


@dataclass
class ParseResult:
    rows: list[ParsedRow] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ImportInvalid("The file is not UTF-8 text.", code="import_encoding",
                            details={"line": line}) from exc


def parse(data: bytes) -> ParseResult:
    if len(data) > MAX_BYTES:
        raise ImportInvalid(f"The file is larger than {MAX_BYTES // (1024 * 1024)} MiB.",
                            code="too_large")
    if b"\x00" in data:
        raise ImportInvalid("The file is binary, not CSV text.", code="import_not_csv")
    text = _decode(data)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ImportInvalid("The file is empty.", code="import_empty") from None
    except csv.Error as exc:
        raise ImportInvalid(f"Not a CSV file: {exc}.", code="import_not_csv") from exc
    missing = [c for c in REQUIRED if c not in header]
    unknown = [h for h in header if h not in COLUMNS]
    if missing or unknown:
        raise ImportInvalid(
            "The header row must name the columns: " + ", ".join(COLUMNS) + ".",
            code="import_columns", details={"missing_columns": missing,
                                            "unknown_columns": unknown})
    result = ParseResult()
    index = {name: header.index(name) for name in COLUMNS if name in header}
    try:
        for record in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if len(result.rows) + len(result.errors) >= MAX_ROWS:
                raise ImportInvalid(f"At most {MAX_ROWS} devices per file.", code="too_large")
            if len(record) != len(header):
                result.errors.append({"line": line, "errors": {"_row": [
                    f"Expected {len(header)} fields, found {len(record)}."]}})
                continue
            result.rows.append(ParsedRow(line=line, serial="", mac=None, name="", group=None,
                                         tags=[], hardware_key=None))
            _fill(result, record, index)
    except csv.Error as exc:
        raise ImportInvalid(f"Not a CSV file: {exc}.", code="import_not_csv",
                            details={"line": reader.line_num}) from exc
    return result


def _fill(result: ParseResult, record: list[str], index: dict[str, int]) -> None:
    row = result.rows[-1]
    errors: dict[str, list[str]] = {}

    def cell(name: str) -> str:
        return record[index[name]].strip() if name in index else ""

    checks = (
        ("serial", lambda: setattr(row, "serial", services.check_serial(cell("serial")))),
        ("mac", lambda: setattr(row, "mac", services.normalize_mac(cell("mac")))),
        ("tags", lambda: setattr(row, "tags", services.normalize_tags(cell("tags").split(";")))),
        ("hardware_key", lambda: setattr(row, "hardware_key", services.check_hardware_key(
            cell("hardware_key")) if cell("hardware_key") else None)),
    )
    for name, check in checks:
        try:
            check()
        except ValidationFailed as exc:
            errors.update({name: exc.details.get(name, [exc.message])})
    row.name = cell("name")[:200] or row.serial
    row.group = cell("group")[:100] or None
    if errors:
        result.rows.pop()
        result.errors.append({"line": row.line, "errors": errors})


def _duplicates(tenant_id: uuid.UUID, result: ParseResult) -> None:
    seen_serial: dict[str, int] = {}
    seen_mac: dict[str, int] = {}
    for row in result.rows:
        for key, seen, label in ((row.serial, seen_serial, "serial"), (row.mac, seen_mac, "mac")):
            if key is None:
                continue
            if key in seen:
                result.errors.append({"line": row.line, "errors": {label: [
                    f"Duplicate of line {seen[key]}."]}})
            else:
                seen[key] = row.line
    existing_serials = _existing(tenant_id, Device.serial, list(seen_serial))
    existing_macs = _existing(tenant_id, Device.mac, list(seen_mac))
    for row in result.rows:
        if row.serial in existing_serials:
            result.errors.append({"line": row.line, "errors": {"serial": ["Already registered."]}})
        if row.mac and row.mac in existing_macs:
            result.errors.append({"line": row.line, "errors": {"mac": ["Already registered."]}})


def _existing(tenant_id: uuid.UUID, column: Any, values: list[str]) -> set[str]:
    """Which of ``values`` the tenant already has, in chunks under the bind-parameter limit."""
    found: set[str] = set()
    for start in range(0, len(values), 5000):
        chunk = values[start:start + 5000]
        found.update(db.session.execute(
            select(column).where(Device.tenant_id == tenant_id, column.in_(chunk))).scalars())
    return found


def import_devices(product: Product, data: bytes, *, filename: str = "",
                   issue_credentials: bool = False, activate: bool = False) -> DeviceImport:
    result = parse(data)
    _duplicates(product.tenant_id, result)
    if result.errors:
        rows = sorted(result.errors, key=lambda e: e["line"])
        raise ImportInvalid(details={"rows": rows, "bad_rows": len({e["line"] for e in rows})})
    if not result.rows:
        raise ImportInvalid("The file has no devices.", code="import_empty")

    now = utcnow()
    actor = accounts.current_actor_label()
    tenant_id = product.tenant_id
    device_rows: list[dict[str, Any]] = []
    tag_rows: list[dict[str, Any]] = []
    event_rows: list[dict[str, Any]] = []
    secrets_out: list[tuple[uuid.UUID, str, str]] = []
    for row in result.rows:
        device_id = uuid7()
        password = credentials.new_password() if issue_credentials else None
        device_rows.append({
            "id": device_id, "tenant_id": tenant_id, "product_id": product.id,
            "serial": row.serial, "mac": row.mac, "name": row.name, "group_name": row.group,
            "status": DeviceStatus.ACTIVE if activate else DeviceStatus.PROVISIONED,
            "activated_at": now if activate else None, "created_at": now,
            "mqtt_password_hash": credentials.hash_password(password) if password else None,
            "credentials_issued_at": now if password else None,
            "hardware_key_encrypted": encrypt(row.hardware_key) if row.hardware_key else None,
        })
        tag_rows.extend({"tenant_id": tenant_id, "device_id": device_id, "tag": t}
                        for t in row.tags)
        event_rows.append({"id": uuid7(), "tenant_id": tenant_id, "device_id": device_id,
                           "kind": "created", "actor": actor, "details": {"via": "import"},
                           "created_at": now})
        if password:
            secrets_out.append((device_id, row.serial, password))
    db.session.execute(insert(Device), device_rows)
    if tag_rows:
        db.session.execute(insert(DeviceTag), tag_rows)
    db.session.execute(insert(DeviceEvent), event_rows)
    if activate:
        _activate_imported(tenant_id, [r["id"] for r in device_rows], actor, now)

    batch = DeviceImport(tenant_id=tenant_id, product_id=product.id, filename=filename[:255],
                         row_count=len(device_rows), issued_credentials=issue_credentials,
                         activated=activate, created_by=actor,
                         credentials_file_encrypted=(encrypt(_credentials_csv(tenant_id,
                                                                              secrets_out))
                                                     if secrets_out else None))
    db.session.add(batch)
    db.session.flush()
    accounts.record_audit("device.import", tenant_id=tenant_id, target=batch, details={
        "rows": len(device_rows), "product": product.name,
        "issued_credentials": issue_credentials, "activated": activate})
    access.devices_changed(tenant_id, [r["id"] for r in device_rows])
    return batch


def _activate_imported(tenant_id: uuid.UUID, device_ids: list[uuid.UUID], actor: str,
                       now: Any) -> None:
    """Activation hooks run for every imported device, in the import's transaction."""
    for start in range(0, len(device_ids), ACTIVATION_CHUNK):  # under Postgres' 65,535 params
        chunk = device_ids[start:start + ACTIVATION_CHUNK]
        devices = list(db.session.execute(select(Device).where(Device.id.in_(chunk))).scalars())
        run_activation_hooks_for_new(tenant_id, devices)
        db.session.execute(insert(DeviceEvent), [
            {"id": uuid7(), "tenant_id": tenant_id, "device_id": device.id, "kind": "activated",
             "actor": actor, "details": {"via": "import"}, "created_at": now}
            for device in devices])


def _credentials_csv(tenant_id: uuid.UUID, rows: list[tuple[uuid.UUID, str, str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["device_id", "serial", "mqtt_username", "mqtt_password", "topic_prefix"])
    for device_id, serial, password in rows:
        username = f"{tenant_id}/d/{device_id}"
        writer.writerow([device_id, serial, username, password, f"t/{username}"])
    return out.getvalue()


def take_credentials_file(batch: DeviceImport) -> str:
    """The credentials CSV, once: it is erased as it is handed out."""
    if batch.credentials_file_encrypted is None:
        if batch.issued_credentials:
            raise Gone("The credentials file was already downloaded.",
                       code="credentials_already_downloaded")
        raise Gone("This import issued no credentials.", code="no_credentials_file")
    content = decrypt(batch.credentials_file_encrypted)
    batch.credentials_file_encrypted = None
    batch.credentials_downloaded_at = utcnow()
    db.session.flush()
    accounts.record_audit("device.import_credentials_download", tenant_id=batch.tenant_id,
                          target=batch)
    return content


def export_csv(devices: list[Device]) -> str:
    """The fleet as CSV, never with secrets."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "serial", "mac", "name", "group", "tags", "status", "product_id",
                     "firmware_version", "config_version", "activated_at", "last_seen_at",
                     "created_at"])
    for d in devices:
        writer.writerow([d.id, d.serial, d.mac or "", d.name, d.group_name or "",
                         ";".join(d.tag_names), d.status.value, d.product_id,
                         d.firmware_version or "", d.config_version or "",
                         d.activated_at.isoformat() if d.activated_at else "",
                         d.last_seen_at.isoformat() if d.last_seen_at else "",
                         d.created_at.isoformat()])
    return out.getvalue()
