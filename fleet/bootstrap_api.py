"""The device bootstrap endpoint, shaped after xiaozhi-esp32's OTA endpoint.

A device POSTs its system info to ``/bootstrap/ota/`` with ``Device-Id`` (its MAC),
``Client-Id`` and its product's enrolment key (``Enrolment-Key`` header, or in the path:
``/bootstrap/<enrolment key>/ota/`` for firmware that can only be given a URL). The answer has
``server_time``, a ``firmware`` offer and either ``activation`` (a code to claim) or ``mqtt``
(the connection settings, never the password). The device then polls ``.../ota/activate`` with
the challenge; the poll after the claim returns its MQTT credentials once.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import marshmallow as ma
from flask import current_app, request
from flask_smorest import Blueprint

from accounts import services as accounts
from core.db import db, utcnow
from core.errors import BadRequest, EnsoulError, Forbidden, NotFound, Unauthorized
from core.ratelimit import client_ip, limiter
from core.tenancy import scoped
from fleet import activation, services, topics
from fleet.models import Device, DeviceStatus, Product

blp = Blueprint("bootstrap", __name__, url_prefix="/bootstrap",
                description="Device bootstrap (xiaozhi-esp32 OTA-compatible)")
ENROLMENT_HEADER = "Enrolment-Key"


class SystemInfoIn(ma.Schema):
    """The xiaozhi-esp32 system info; unknown fields are accepted and ignored."""

    class Meta:
        unknown = ma.INCLUDE

    mac_address = ma.fields.String(validate=ma.validate.Length(max=32))
    uuid = ma.fields.String(validate=ma.validate.Length(max=64))
    application = ma.fields.Dict()
    board = ma.fields.Dict()


class ActivateIn(ma.Schema):
    class Meta:
        unknown = ma.INCLUDE

    challenge = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=64))
    hmac = ma.fields.String(validate=ma.validate.Length(max=128))
    algorithm = ma.fields.String(validate=ma.validate.OneOf(["hmac-sha256"]))
    serial_number = ma.fields.String(validate=ma.validate.Length(max=64))


class ActivationOut(ma.Schema):
    code = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    challenge = ma.fields.String(required=True)
    timeout_ms = ma.fields.Integer(required=True)


class BootstrapOut(ma.Schema):
    server_time = ma.fields.Dict(required=True, metadata={
        "description": "timestamp (ms since the epoch), timezone_offset (minutes)"})
    firmware = ma.fields.Dict(required=True, metadata={"description": "version, url"})
    activation = ma.fields.Nested(ActivationOut)
    mqtt = ma.fields.Dict(metadata={
        "description": "endpoint, client_id, username, publish_topic, subscribe_topic, "
                       "topic_prefix, keepalive, tls (no password)"})


class ActivateOut(ma.Schema):
    status = ma.fields.String(required=True, metadata={"enum": ["pending", "activated"]})
    message = ma.fields.String()
    mqtt = ma.fields.Dict(metadata={"description": "with the password, once"})


def _rate() -> str:
    return str(current_app.config["ENSOUL_BOOTSTRAP_RATE_LIMIT"])


def _product(path_key: str | None) -> Product:
    raw = path_key or request.headers.get(ENROLMENT_HEADER, "")
    if not raw:
        raise Unauthorized("Send the product's enrolment key.", code="enrolment_key_required")
    product = services.product_by_enrolment_key(raw)
    if product is None:
        raise Unauthorized("The enrolment key is not valid.", code="invalid_enrolment_key")
    tenant = accounts.get_tenant(product.tenant_id)
    accounts.ensure_tenant_active(tenant)
    return product


def _find_or_register(product: Product, info: dict[str, Any]) -> Device:
    mac_raw = request.headers.get("Device-Id") or info.get("mac_address")
    if not mac_raw:
        raise BadRequest("Send the MAC address in the Device-Id header.", code="device_id_required")
    try:
        mac = services.normalize_mac(mac_raw, field="Device-Id")
    except EnsoulError as exc:
        raise BadRequest(exc.message, code="bad_request", details=exc.details) from exc
    serial = (request.headers.get("Serial-Number") or "").strip() or None
    stmt = scoped(Device, product.tenant_id)
    stmt = stmt.where(Device.serial == serial) if serial else stmt.where(Device.mac == mac)
    device = db.session.execute(stmt).scalar_one_or_none()
    if device is None and serial:
        device = db.session.execute(
            scoped(Device, product.tenant_id).where(Device.mac == mac)).scalar_one_or_none()
    if device is None:
        if not product.allow_self_registration:
            raise NotFound("This device is not registered.", code="device_unknown")
        device = services.create_device(product, serial or (mac or "").replace(":", ""),
                                        mac=mac)
    if device.product_id != product.id:
        raise Forbidden("This device belongs to another product.", code="product_mismatch")
    if device.status in (DeviceStatus.SUSPENDED, DeviceStatus.RETIRED):
        raise Forbidden(f"This device is {device.status.value}.",
                        code=f"device_{device.status.value}")
    return device


def _section(info: dict[str, Any], key: str) -> dict[str, Any]:
    value = info.get(key)
    return value if isinstance(value, dict) else {}


def _report(device: Device, info: dict[str, Any]) -> None:
    application: dict[str, Any] = _section(info, "application")
    board: dict[str, Any] = _section(info, "board")
    version = str(application.get("version") or "")[:64] or None
    board_type = str(board.get("type") or board.get("name") or "")[:100] or None
    client_id = (request.headers.get("Client-Id") or "")[:64] or None
    if version and version != device.firmware_version:
        device.firmware_version = version
    if board_type and board_type != device.board:
        device.board = board_type
    if client_id and client_id != device.client_uuid:
        device.client_uuid = client_id
    device.last_seen_at = utcnow()


def _server_time(product: Product) -> dict[str, int]:
    tenant = accounts.get_tenant(product.tenant_id)
    now = dt.datetime.now(zoneinfo.ZoneInfo(tenant.timezone))
    offset = now.utcoffset() or dt.timedelta()
    return {"timestamp": int(now.timestamp() * 1000),
            "timezone_offset": int(offset.total_seconds() // 60)}


@blp.route("/ota/", methods=["GET", "POST"], strict_slashes=False)
@blp.route("/<path_key>/ota/", methods=["GET", "POST"], strict_slashes=False,
           endpoint="ota_with_key")
@limiter.limit(_rate, key_func=lambda: "bootstrap:" + client_ip())
@blp.arguments(SystemInfoIn, location="json", required=False)
@blp.response(200, BootstrapOut)
def ota(info: dict[str, Any] | None, path_key: str | None = None) -> Any:
    """Check in: report firmware and board; get the time, a firmware offer and either an
    activation code or the MQTT settings."""
    info = info or {}
    product = _product(path_key)
    device = _find_or_register(product, info)
    _report(device, info)
    answer: dict[str, Any] = {
        "server_time": _server_time(product),
        "firmware": {"version": device.firmware_version or "", "url": ""},
    }
    if device.status is DeviceStatus.ACTIVE and device.mqtt_password_hash is not None:
        answer["mqtt"] = topics.connection_info(device)
        return answer
    challenge = activation.challenge_for(device)
    base = current_app.config["ENSOUL_BASE_URL"]
    remaining = int((challenge.expires_at - utcnow()).total_seconds() * 1000)
    answer["activation"] = {
        "code": challenge.code,
        "message": f"{base}\n{challenge.code}",
        "challenge": challenge.challenge,
        "timeout_ms": max(remaining, 0),
    }
    return answer


@blp.route("/ota/activate", methods=["POST"])
@blp.route("/<path_key>/ota/activate", methods=["POST"], endpoint="activate_with_key")
@limiter.limit(_rate, key_func=lambda: "bootstrap:" + client_ip())
@blp.arguments(ActivateIn)
@blp.response(200, ActivateOut)
@blp.alt_response(202, schema=ActivateOut, description="Not claimed yet: poll again.")
def activate(data: dict[str, Any], path_key: str | None = None) -> Any:
    """Poll with the challenge: 202 until the code is claimed, then 200 with the MQTT
    credentials, once."""
    product = _product(path_key)
    result = activation.poll(product, data["challenge"], data.get("hmac"))
    if result is None:
        return {"status": "pending", "message": "Waiting for the code to be claimed."}, 202
    device, password = result
    return {"status": "activated", "mqtt": topics.connection_info(device, password)}
