"""Marshmallow schemas of the fleet API: separate input and output schemas."""

from __future__ import annotations

import marshmallow as ma

from core.fields import Name, Text
from core.pagination import PageArgsSchema, page_schema
from fleet.models import DeviceStatus, HardwareKind

STATUS_VALUES = [s.value for s in DeviceStatus]
KIND_VALUES = [k.value for k in HardwareKind]
SERIAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
TAG_PATTERN = SERIAL_PATTERN
MAC_PATTERN = r"^[0-9A-Fa-f]{2}([:-]?[0-9A-Fa-f]{2}){5}$"
HEX_KEY_PATTERN = r"^([0-9A-Fa-f]{2}){16,64}$"
CODE_PATTERN = r"^[0-9]{6}$"


def _pattern(pattern: str, error: str) -> ma.validate.Regexp:
    return ma.validate.Regexp(pattern, error=error)


def _limit(high: int, what: str) -> ma.fields.Integer:
    return ma.fields.Integer(
        strict=True, allow_none=True, validate=ma.validate.Range(min=1, max=high),
        metadata={"description": f"{what} per device of this product. It can only tighten the "
                                 "platform's limit (the smaller one applies, never a larger "
                                 "one); null: the platform's limit."})


class _ProductLimits(ma.Schema):
    requests_per_minute = _limit(100_000, "Inference requests per minute")
    concurrent_streams = _limit(1000, "Inference streams at once")
    daily_request_cap = _limit(10_000_000, "Inference requests per day (the tenant's day)")


class ProductIn(_ProductLimits):
    name = Name(required=True, validate=ma.validate.Length(min=1, max=200))
    hardware_kind = ma.fields.Enum(HardwareKind, by_value=True, required=True)
    description = Text(load_default="", validate=ma.validate.Length(max=2000))
    requires_hardware_binding = ma.fields.Boolean(load_default=False)
    allow_self_registration = ma.fields.Boolean(load_default=True)


class ProductUpdateIn(_ProductLimits):
    name = Name(validate=ma.validate.Length(min=1, max=200))
    description = Text(validate=ma.validate.Length(max=2000))
    requires_hardware_binding = ma.fields.Boolean()
    allow_self_registration = ma.fields.Boolean()


class ProductOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    name = ma.fields.String(required=True)
    hardware_kind = ma.fields.Function(lambda p: p.hardware_kind.value, required=True,
                                       metadata={"enum": KIND_VALUES})
    description = ma.fields.String(required=True)
    enrolment_key_prefix = ma.fields.String(required=True)
    requires_hardware_binding = ma.fields.Boolean(required=True)
    allow_self_registration = ma.fields.Boolean(required=True)
    requests_per_minute = ma.fields.Integer(required=True, allow_none=True)
    concurrent_streams = ma.fields.Integer(required=True, allow_none=True)
    daily_request_cap = ma.fields.Integer(required=True, allow_none=True)
    created_at = ma.fields.AwareDateTime(required=True)


class ProductCreatedOut(ProductOut):
    enrolment_key = ma.fields.String(
        attribute="secret", required=True, allow_none=True,
        metadata={"description": "Shown only in this answer (null on an idempotent replay)."})


class DeviceIn(ma.Schema):
    product_id = ma.fields.UUID(required=True)
    serial = ma.fields.String(required=True, validate=_pattern(SERIAL_PATTERN, "Invalid serial."))
    mac = ma.fields.String(validate=_pattern(MAC_PATTERN, "Invalid MAC address."))
    name = Text(load_default="", validate=ma.validate.Length(max=200))
    group = Text(validate=ma.validate.Length(max=100))
    tags = ma.fields.List(
        ma.fields.String(validate=_pattern(TAG_PATTERN, "Invalid tag.")),
        load_default=list, validate=ma.validate.Length(max=20))
    hardware_key = ma.fields.String(
        validate=_pattern(HEX_KEY_PATTERN, "A hex key of 16 to 64 bytes."), load_only=True,
        metadata={"description": "Per-device key for HMAC activation; stored encrypted, "
                                 "never returned."})
    end_user_ref = Text(validate=ma.validate.Length(max=200))


class DeviceUpdateIn(ma.Schema):
    name = Name(validate=ma.validate.Length(min=1, max=200))
    group = Text(validate=ma.validate.Length(max=100), allow_none=True,
                 metadata={"description": "null or empty removes the device from its group."})
    tags = ma.fields.List(ma.fields.String(validate=_pattern(TAG_PATTERN, "Invalid tag.")),
                          validate=ma.validate.Length(max=20))
    end_user_ref = Text(validate=ma.validate.Length(max=200), allow_none=True)


class DeviceOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    product_id = ma.fields.UUID(required=True)
    serial = ma.fields.String(required=True)
    mac = ma.fields.String(required=True, allow_none=True)
    name = ma.fields.String(required=True)
    group = ma.fields.String(attribute="group_name", required=True, allow_none=True)
    tags = ma.fields.List(ma.fields.String(), attribute="tag_names", required=True)
    status = ma.fields.Function(lambda d: d.status.value, required=True,
                                metadata={"enum": STATUS_VALUES})
    online = ma.fields.Boolean(required=True, allow_none=True, dump_default=None)
    firmware_version = ma.fields.String(required=True, allow_none=True)
    config_version = ma.fields.String(required=True, allow_none=True)
    board = ma.fields.String(required=True, allow_none=True)
    end_user_ref = ma.fields.String(required=True, allow_none=True)
    mqtt_username = ma.fields.String(required=True)
    topic_prefix = ma.fields.String(required=True)
    has_credentials = ma.fields.Function(lambda d: d.mqtt_password_hash is not None,
                                         required=True)
    has_hardware_key = ma.fields.Function(lambda d: d.hardware_key_encrypted is not None,
                                          required=True)
    created_at = ma.fields.AwareDateTime(required=True)
    activated_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    last_seen_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    credentials_issued_at = ma.fields.AwareDateTime(required=True, allow_none=True)


class DeviceSearchArgs(PageArgsSchema):
    q = Text(validate=ma.validate.Length(max=64),
             metadata={"description": "Prefix of the serial or the name."})
    serial = Text(validate=ma.validate.Length(max=64))
    status = ma.fields.String(validate=ma.validate.OneOf(STATUS_VALUES))
    group = Text(validate=ma.validate.Length(max=100))
    tag = Text(validate=ma.validate.Length(max=64))
    product_id = ma.fields.UUID()
    firmware_version = Text(validate=ma.validate.Length(max=64))
    online = ma.fields.Boolean()


class CredentialsOut(ma.Schema):
    device_id = ma.fields.UUID(required=True)
    mqtt = ma.fields.Dict(required=True, allow_none=True, metadata={
        "description": "endpoint, client_id, username, password (shown once; null on a "
                       "replay), publish_topic, subscribe_topic, topic_prefix, keepalive, tls"})


class TransferIn(ma.Schema):
    end_user_ref = Text(required=True, allow_none=True, validate=ma.validate.Length(max=200))


class BulkActionIn(ma.Schema):
    action = ma.fields.String(required=True, validate=ma.validate.OneOf(
        ["suspend", "resume", "retire", "move_group"]))
    device_ids = ma.fields.List(ma.fields.UUID(), required=True,
                                validate=ma.validate.Length(min=1, max=1000))
    group = Text(validate=ma.validate.Length(max=100), allow_none=True)


class BulkActionOut(ma.Schema):
    changed = ma.fields.List(ma.fields.String(), required=True)
    failed = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.String(), required=True)


class ClaimIn(ma.Schema):
    code = ma.fields.String(required=True, validate=_pattern(CODE_PATTERN, "Six digits."))
    end_user_ref = Text(validate=ma.validate.Length(max=200))


class DeviceEventOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    kind = ma.fields.String(required=True)
    actor = ma.fields.String(required=True)
    details = ma.fields.Dict(required=True)
    created_at = ma.fields.AwareDateTime(required=True)


class ImportIn(ma.Schema):
    product_id = ma.fields.UUID(required=True)
    issue_credentials = ma.fields.Boolean(load_default=False, metadata={
        "description": "Issue MQTT credentials now; the answer offers a one-time file."})
    activate = ma.fields.Boolean(load_default=False)
    file = ma.fields.Raw(required=True, metadata={
        "type": "string", "format": "binary",
        "description": "CSV: serial (required), mac, name, group, tags (;-separated), "
                       "hardware_key"})


class ImportOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    product_id = ma.fields.UUID(required=True)
    filename = ma.fields.String(required=True)
    row_count = ma.fields.Integer(required=True)
    issued_credentials = ma.fields.Boolean(required=True)
    activated = ma.fields.Boolean(required=True)
    credentials_file_available = ma.fields.Boolean(required=True)
    credentials_downloaded_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    created_at = ma.fields.AwareDateTime(required=True)


class FleetSummaryOut(ma.Schema):
    total = ma.fields.Integer(required=True)
    online = ma.fields.Integer(required=True)
    by_status = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Integer(), required=True)


ProductPage = page_schema(ProductOut, "ProductPage")
DevicePage = page_schema(DeviceOut, "DevicePage")
DeviceEventPage = page_schema(DeviceEventOut, "DeviceEventPage")
ImportPage = page_schema(ImportOut, "ImportPage")
