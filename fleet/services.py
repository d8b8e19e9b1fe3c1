"""Fleet operations: products, devices, status, credentials, reset and transfer, search.

Services flush; the request, job or command commits. Every change that affects what a device
may do on MQTT goes through :func:`fleet.access.devices_changed`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, Uuid, all_, any_, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import selectinload

from accounts import services as accounts
from core.crypto import encrypt, new_token, sha256_hex
from core.db import db, utcnow
from core.errors import Conflict, EnsoulError, ValidationFailed
from core.tenancy import scoped
from fleet import access, credentials
from fleet.hooks import (
    ActivationRefused,
    register_activation_hook,
    register_reset_hook,
    run_activation_hooks,
    run_reset_hooks,
)
from fleet.models import (
    Device,
    DeviceEvent,
    DeviceStatus,
    DeviceTag,
    HardwareKind,
    Product,
)

__all__ = [
    "ActivationRefused",
    "register_activation_hook",
    "register_reset_hook",
]

ENROLMENT_PREFIX = "enr"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_TAGS = 20


class InvalidTransition(EnsoulError):
    code, http_status, message = "invalid_status_transition", 409, "The device cannot do that now."


# --- validation ---------------------------------------------------------------------------


def normalize_mac(mac: str | None, field: str = "mac") -> str | None:
    if mac is None or not mac.strip():
        return None
    raw = re.sub(r"[^0-9a-fA-F]", "", mac)
    if len(raw) != 12:
        raise ValidationFailed(details={field: ["Not a MAC address (12 hex digits)."]})
    value = ":".join(raw[i:i + 2] for i in range(0, 12, 2)).lower()
    assert MAC_RE.match(value)
    return value


def check_serial(serial: str, field: str = "serial") -> str:
    serial = serial.strip()
    if not SERIAL_RE.match(serial):
        raise ValidationFailed(details={field: [
            "1-64 characters: letters, digits, '.', '_', ':' or '-', starting with a letter "
            "or digit."]})
    return serial


def normalize_tags(tags: Iterable[str], field: str = "tags") -> list[str]:
    clean = sorted({t.strip() for t in tags if t.strip()})
    bad = [t for t in clean if not TAG_RE.match(t)]
    if bad:
        raise ValidationFailed(details={field: [f"Invalid tag {bad[0]!r}: letters, digits, "
                                                "'.', '_', ':' or '-', up to 64."]})
    if len(clean) > MAX_TAGS:
        raise ValidationFailed(details={field: [f"At most {MAX_TAGS} tags."]})
    return clean


def check_hardware_key(key: str, field: str = "hardware_key") -> str:
    key = key.strip()
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raw = b""
    if len(raw) < 16 or len(raw) > 64:
        raise ValidationFailed(details={field: ["A hex key of 16 to 64 bytes."]})
    return key.lower()


# --- events -------------------------------------------------------------------------------


def record_event(device: Device, kind: str, actor: str | None = None,
                 details: dict[str, Any] | None = None) -> DeviceEvent:
    event = DeviceEvent(tenant_id=device.tenant_id, device_id=device.id, kind=kind,
                        actor=actor or accounts.current_actor_label(), details=details or {},
                        created_at=utcnow())
    db.session.add(event)
    return event


def device_history(device: Device) -> list[DeviceEvent]:
    return list(db.session.execute(
        select(DeviceEvent).where(DeviceEvent.device_id == device.id).order_by(DeviceEvent.id)
    ).scalars())


# --- products -----------------------------------------------------------------------------


PRODUCT_LIMITS = ("requests_per_minute", "concurrent_streams", "daily_request_cap")


def _check_limits(limits: dict[str, int | None]) -> None:
    bad = {key: ["Must be at least 1 (or null)."] for key, value in limits.items()
           if value is not None and value < 1}
    if bad:
        raise ValidationFailed(details=bad)


def create_product(tenant_id: uuid.UUID, name: str, hardware_kind: HardwareKind, *,
                   description: str = "", requires_hardware_binding: bool = False,
                   allow_self_registration: bool = True, requests_per_minute: int | None = None,
                   concurrent_streams: int | None = None,
                   daily_request_cap: int | None = None) -> tuple[Product, str]:
    """A product and its enrolment key, which is shown once and stored as SHA-256.

    The inference limits (``None``: the platform's) only ever tighten the platform's."""
    name = name.strip()
    if not name:
        raise ValidationFailed(details={"name": ["Must not be empty."]})
    limits = {"requests_per_minute": requests_per_minute,
              "concurrent_streams": concurrent_streams, "daily_request_cap": daily_request_cap}
    _check_limits(limits)
    if db.session.execute(scoped(Product, tenant_id).where(Product.name == name)).first():
        raise Conflict("A product with this name exists.", code="product_exists",
                       details={"name": ["Already used."]})
    raw = new_token(ENROLMENT_PREFIX, 24)
    product = Product(tenant_id=tenant_id, name=name, hardware_kind=hardware_kind,
                      description=description.strip(), enrolment_key_hash=sha256_hex(raw),
                      enrolment_key_prefix=raw[:12],
                      requires_hardware_binding=requires_hardware_binding,
                      allow_self_registration=allow_self_registration, **limits)
    db.session.add(product)
    db.session.flush()
    accounts.record_audit("product.create", tenant_id=tenant_id, target=product,
                 details={"name": name, "hardware_kind": hardware_kind.value,
                          **{k: v for k, v in limits.items() if v is not None}})
    return product, raw


def update_product(product: Product, **changes: Any) -> Product:
    """Change the given fields; a limit given as ``None`` goes back to the platform's.

    A changed limit reaches the product's devices through :func:`access.devices_changed`
    (their admission profiles are written again after the commit)."""
    allowed = {"name", "description", "requires_hardware_binding", "allow_self_registration",
               *PRODUCT_LIMITS}
    _check_limits({k: v for k, v in changes.items() if k in PRODUCT_LIMITS})
    applied = {}
    for key, value in changes.items():
        if key not in allowed or (value is None and key not in PRODUCT_LIMITS):
            continue
        if key == "name":
            value = value.strip()
            clash = db.session.execute(scoped(Product, product.tenant_id).where(
                Product.name == value, Product.id != product.id)).first()
            if clash:
                raise Conflict("A product with this name exists.", code="product_exists",
                               details={"name": ["Already used."]})
        if getattr(product, key) != value:
            setattr(product, key, value)
            applied[key] = value
    db.session.flush()
    if applied:
        accounts.record_audit("product.update", tenant_id=product.tenant_id, target=product,
                     details=applied)
    if applied.keys() & set(PRODUCT_LIMITS):
        device_ids = list(db.session.execute(
            select(Device.id).where(Device.product_id == product.id)).scalars())
        if device_ids:
            access.devices_changed(product.tenant_id, device_ids)
    return product


def rotate_enrolment_key(product: Product) -> str:
    raw = new_token(ENROLMENT_PREFIX, 24)
    product.enrolment_key_hash = sha256_hex(raw)
    product.enrolment_key_prefix = raw[:12]
    db.session.flush()
    accounts.record_audit("product.rotate_enrolment_key", tenant_id=product.tenant_id,
                          target=product)
    return raw


def product_by_enrolment_key(raw: str) -> Product | None:
    return db.session.execute(
        select(Product).where(Product.enrolment_key_hash == sha256_hex(raw))
    ).scalar_one_or_none()


# --- devices ------------------------------------------------------------------------------


def _set_tags(device: Device, tags: list[str]) -> None:
    device.tags = [DeviceTag(tenant_id=device.tenant_id, tag=t) for t in tags]


def _unique_checks(tenant_id: uuid.UUID, serial: str, mac: str | None) -> None:
    """Friendly 409s before the insert; the unique constraints still decide under a race."""
    for column, value, label in ((Device.serial, serial, "serial"), (Device.mac, mac, "MAC")):
        if value and db.session.execute(scoped(Device, tenant_id).where(column == value)).first():
            field = column.key
            raise Conflict(f"A device with this {label} exists.", code=f"duplicate_{field}",
                           details={field: ["Already registered."]})


def create_device(product: Product, serial: str, *, mac: str | None = None, name: str = "",
                  group: str | None = None, tags: Iterable[str] = (),
                  hardware_key: str | None = None, end_user_ref: str | None = None) -> Device:
    serial = check_serial(serial)
    mac = normalize_mac(mac)
    _unique_checks(product.tenant_id, serial, mac)
    device = Device(tenant_id=product.tenant_id, product_id=product.id, serial=serial, mac=mac,
                    name=name.strip() or serial, group_name=(group or "").strip() or None,
                    end_user_ref=end_user_ref, status=DeviceStatus.PROVISIONED,
                    hardware_key_encrypted=(encrypt(check_hardware_key(hardware_key))
                                            if hardware_key else None))
    db.session.add(device)
    db.session.flush()
    _set_tags(device, normalize_tags(tags))
    record_event(device, "created")
    accounts.record_audit("device.create", tenant_id=device.tenant_id, target=device,
                 details={"serial": serial})
    db.session.flush()
    return device


def update_device(device: Device, *, name: str | None = None, group: str | None = None,
                  tags: Sequence[str] | None = None, end_user_ref: str | None = None,
                  clear_group: bool = False) -> Device:
    changes: dict[str, Any] = {}
    if name is not None and name.strip() and name.strip() != device.name:
        device.name = changes["name"] = name.strip()
    new_group = None if clear_group or group is None else group.strip() or None
    if (clear_group or group is not None) and new_group != device.group_name:
        device.group_name = changes["group"] = new_group
    if tags is not None:
        clean = normalize_tags(tags)
        if clean != device.tag_names:
            _set_tags(device, clean)
            changes["tags"] = clean
    if end_user_ref is not None and (end_user_ref or None) != device.end_user_ref:
        device.end_user_ref = end_user_ref or None
        changes["end_user_ref"] = "changed"
    db.session.flush()
    if changes:
        accounts.record_audit("device.update", tenant_id=device.tenant_id, target=device,
                              details=changes)
    return device


def activate(device: Device, *, actor: str | None = None, via: str = "api") -> Device:
    """Make a provisioned device active; activation hooks run in this same transaction."""
    if device.status is DeviceStatus.ACTIVE:
        return device
    if device.status is not DeviceStatus.PROVISIONED:
        raise InvalidTransition(f"A {device.status.value} device cannot be activated.")
    history = device_history(device)
    run_activation_hooks(device, history)
    device.status = DeviceStatus.ACTIVE
    device.activated_at = utcnow()
    record_event(device, "activated", actor, {"via": via})
    accounts.record_audit("device.activate", tenant_id=device.tenant_id, target=device,
                 details={"via": via}, actor_label=actor)
    db.session.flush()
    access.devices_changed(device.tenant_id, [device.id])
    return device


_TRANSITIONS: dict[str, tuple[set[DeviceStatus], DeviceStatus]] = {
    "suspend": ({DeviceStatus.ACTIVE, DeviceStatus.PROVISIONED}, DeviceStatus.SUSPENDED),
    "resume": ({DeviceStatus.SUSPENDED}, DeviceStatus.ACTIVE),
    "retire": ({DeviceStatus.PROVISIONED, DeviceStatus.ACTIVE, DeviceStatus.SUSPENDED},
               DeviceStatus.RETIRED),
}


def change_status(device: Device, action: str) -> Device:
    """``suspend`` / ``resume`` / ``retire``; retired is final. Broker access follows."""
    sources, target = _TRANSITIONS[action]
    if device.status is target:
        return device
    if device.status not in sources:
        raise InvalidTransition(f"A {device.status.value} device cannot {action}.")
    if action == "resume" and device.activated_at is None:
        target = DeviceStatus.PROVISIONED
    previous = device.status
    device.status = target
    if target is DeviceStatus.RETIRED:
        device.mqtt_password_hash = None
    record_event(device, action, details={"from": previous.value})
    accounts.record_audit(f"device.{action}", tenant_id=device.tenant_id, target=device,
                 details={"from": previous.value})
    db.session.flush()
    access.devices_changed(device.tenant_id, [device.id])
    return device


def issue_credentials(device: Device) -> str:
    """A new MQTT password (shown once); the previous one stops working at the next sync."""
    if device.status is DeviceStatus.RETIRED:
        raise InvalidTransition("A retired device gets no credentials.")
    password = credentials.new_password()
    rotated = device.mqtt_password_hash is not None
    device.mqtt_password_hash = credentials.hash_password(password)
    device.credentials_issued_at = utcnow()
    record_event(device, "credentials_rotated" if rotated else "credentials_issued")
    accounts.record_audit("device.credentials_rotate" if rotated else "device.credentials_issue",
                 tenant_id=device.tenant_id, target=device)
    db.session.flush()
    access.devices_changed(device.tenant_id, [device.id])
    return password


def revoke_credentials(device: Device, *, reason: str = "revoked") -> None:
    if device.mqtt_password_hash is None:
        return
    device.mqtt_password_hash = None
    record_event(device, "credentials_revoked", details={"reason": reason})
    accounts.record_audit("device.credentials_revoke", tenant_id=device.tenant_id, target=device,
                 details={"reason": reason})
    db.session.flush()
    access.devices_changed(device.tenant_id, [device.id])


def reset(device: Device) -> Device:
    """Unbind a device from its end user: credentials revoked, memory deleted, new activation."""
    if device.status is DeviceStatus.RETIRED:
        raise InvalidTransition("A retired device cannot be reset.")
    revoke_credentials(device, reason="reset")
    run_reset_hooks(device)
    device.end_user_ref = None
    # Not activated any more: a suspended device resumes as provisioned, not active.
    device.activated_at = None
    if device.status is DeviceStatus.ACTIVE:
        device.status = DeviceStatus.PROVISIONED
    record_event(device, "reset")
    accounts.record_audit("device.reset", tenant_id=device.tenant_id, target=device)
    db.session.flush()
    access.devices_changed(device.tenant_id, [device.id])
    return device


def transfer(device: Device, end_user_ref: str | None) -> Device:
    """Hand a device to another end user: the previous user's memory goes, the device stays."""
    if device.status is DeviceStatus.RETIRED:
        raise InvalidTransition("A retired device cannot be transferred.")
    run_reset_hooks(device)
    device.end_user_ref = (end_user_ref or "").strip() or None
    record_event(device, "transferred")
    accounts.record_audit("device.transfer", tenant_id=device.tenant_id, target=device)
    db.session.flush()
    access.devices_changed(device.tenant_id, [device.id])
    return device


def bulk_action(tenant_id: uuid.UUID, device_ids: Sequence[uuid.UUID], action: str,
                group: str | None = None) -> dict[str, Any]:
    """Apply ``suspend`` / ``resume`` / ``retire`` / ``move_group`` to many devices.

    Devices not found in this tenant are reported as not found; devices that cannot make the
    transition are reported with the reason; the rest are changed.
    """
    devices = {d.id: d for d in db.session.execute(
        scoped(Device, tenant_id).where(Device.id.in_(device_ids))).scalars()}
    done: list[str] = []
    failed: dict[str, str] = {}
    for device_id in device_ids:
        device = devices.get(device_id)
        if device is None:
            failed[str(device_id)] = "not_found"
            continue
        try:
            if action == "move_group":
                update_device(device, group=group or "", clear_group=not group)
            else:
                change_status(device, action)
            done.append(str(device_id))
        except EnsoulError as exc:
            failed[str(device_id)] = exc.code
    return {"changed": done, "failed": failed}


# --- search -------------------------------------------------------------------------------


def search_devices(tenant_id: uuid.UUID, filters: dict[str, Any],
                   online_ids: set[str] | None = None) -> Select[Any]:
    """The tenant's devices matching every given filter (keyset pagination by id); tags are
    loaded for the whole page in one more query."""
    stmt = scoped(Device, tenant_id).options(selectinload(Device.tags))
    if filters.get("q"):
        q = filters["q"].strip()
        stmt = stmt.where((Device.serial.startswith(q, autoescape=True))
                          | (Device.name.startswith(q, autoescape=True)))
    if filters.get("serial"):
        stmt = stmt.where(Device.serial == filters["serial"])
    if filters.get("status"):
        stmt = stmt.where(Device.status == DeviceStatus(filters["status"]))
    if filters.get("group"):
        stmt = stmt.where(Device.group_name == filters["group"])
    if filters.get("product_id"):
        stmt = stmt.where(Device.product_id == filters["product_id"])
    if filters.get("firmware_version"):
        stmt = stmt.where(Device.firmware_version == filters["firmware_version"])
    if filters.get("tag"):
        stmt = stmt.where(Device.id.in_(
            select(DeviceTag.device_id).where(DeviceTag.tenant_id == tenant_id,
                                              DeviceTag.tag == filters["tag"])))
    if filters.get("online") is not None and online_ids is not None:
        stmt = stmt.where(_among(Device.id, [uuid.UUID(i) for i in online_ids],
                                 negate=not filters["online"]))
    return stmt


def _among(column: Any, ids: list[uuid.UUID], *, negate: bool) -> Any:
    """``column IN ids``; on Postgres as one bound array (``= ANY``), not a parameter per id:
    10,000 online devices are one parameter, not 10,000 (docs/benchmarks.md, finding 3)."""
    if db.session.get_bind().dialect.name != "postgresql":
        return column.not_in(ids) if negate else column.in_(ids)
    array = bindparam("device_ids", ids, type_=ARRAY(Uuid()))
    return column != all_(array) if negate else column == any_(array)


def count_by_status(tenant_id: uuid.UUID) -> dict[str, int]:
    rows = db.session.execute(
        select(Device.status, func.count()).where(Device.tenant_id == tenant_id)
        .group_by(Device.status)
    ).all()
    counts = {s.value: 0 for s in DeviceStatus}
    counts.update({status.value: n for status, n in rows})
    return counts
