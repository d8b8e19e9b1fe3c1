"""Inference's side of the other domains (profiles follow the registry, resets forget), what
a device did (recent requests and transcripts), and a tenant's inference settings and provider
configurations.

Services flush; the request commits. Every change to settings or providers re-projects the
tenant's device profiles once the transaction commits (:func:`profiles_changed`).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, cast

from flask import Flask, current_app
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from accounts import services as accounts
from core.crypto import encrypt
from core.db import db, on_commit, transaction_state
from core.errors import Conflict, NotFound, ValidationFailed
from core.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from core.redis import get_redis
from core.tenancy import get_owned, scoped
from fleet import services as fleet
from fleet.access import registry_channel
from fleet.hooks import register_registry_hook, register_reset_hook
from fleet.models import Device, Product
from inference.directory import project_devices
from inference.models import (
    FIRST_TOKEN_TIMEOUT_S,
    TOTAL_TIMEOUT_S,
    InferenceSettings,
    ProviderConfig,
    UsageEventRecord,
)
from inference.sessions import RECENT_MAX, memory_key, recent_key
from inference.settings import default_memory_settings

log = logging.getLogger(__name__)


def init_app(app: Flask) -> None:
    register_registry_hook(project_devices_after_commit)
    register_reset_hook(forget_device)


def project_devices_after_commit(tenant_id: uuid.UUID, device_ids: list[uuid.UUID]) -> None:
    project_devices(tenant_id, device_ids)


def delete_device_data(tenant_id: uuid.UUID, device_id: uuid.UUID) -> None:
    """Conversation memory and recent transcripts of a device (reset, transfer, a request
    from its user)."""
    prefix = current_app.config["ENSOUL_REDIS_PREFIX"]
    get_redis().delete(memory_key(prefix, str(tenant_id), str(device_id)),
                       recent_key(prefix, str(tenant_id), str(device_id)))


def forget_device(device: Device) -> None:
    delete_device_data(device.tenant_id, device.id)


# --- what a device did (the API and the portal read these) ---------------------------------


def recent_requests(tenant_id: uuid.UUID, device_id: uuid.UUID, cursor: str | None = None,
                    limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """The device's usage events, newest admission first: ``{items, next_cursor}``.

    Ordered by ``(admitted_at, id)`` rather than by id alone: ids are given when the writer
    inserts, and a request the sweeper settled late would otherwise jump ahead of newer ones.
    The cursor is still the last id seen (the API's one cursor format); its admission time is
    looked up by primary key.
    """
    stmt = select(UsageEventRecord).where(UsageEventRecord.tenant_id == tenant_id,
                                          UsageEventRecord.device_id == device_id)
    if cursor:
        after = decode_cursor(cursor)
        admitted = db.session.execute(stmt.with_only_columns(UsageEventRecord.admitted_at)
                                      .where(UsageEventRecord.id == after)).scalar_one_or_none()
        if admitted is None:
            raise ValidationFailed(details={"cursor": ["Not a valid cursor."]})
        stmt = stmt.where(tuple_(UsageEventRecord.admitted_at, UsageEventRecord.id)
                          < tuple_(admitted, after))
    stmt = stmt.order_by(UsageEventRecord.admitted_at.desc(), UsageEventRecord.id.desc())
    rows = list(db.session.execute(stmt.limit(limit + 1)).scalars())
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return {"items": rows[:limit], "next_cursor": next_cursor}


def recent_transcripts(tenant_id: uuid.UUID, device_id: uuid.UUID) -> list[dict[str, Any]]:
    """The device's recent turns from Redis, newest first: ``{id, kind, asked, answer, at}``
    (``at``: admission, epoch milliseconds). Empty once the tenant's retention has passed."""
    prefix = current_app.config["ENSOUL_REDIS_PREFIX"]
    raw = cast(list[bytes], get_redis().lrange(
        recent_key(prefix, str(tenant_id), str(device_id)), 0, RECENT_MAX - 1))
    records = []
    for item in raw:
        try:
            record = json.loads(item)
            records.append({"id": str(record["id"]), "kind": str(record["kind"]),
                            "asked": str(record.get("asked") or ""),
                            "answer": str(record.get("answer") or ""),
                            "at": int(record["at"])})
        except (ValueError, KeyError, TypeError):  # not a record this version understands
            continue
    return records


def delete_inference_data(device: Device) -> None:
    """Forget what the device's user said (memory and transcripts), at someone's request:
    Redis first, so a failure there leaves no entry claiming it was done."""
    delete_device_data(device.tenant_id, device.id)
    fleet.record_event(device, "inference_data_deleted")
    accounts.record_audit("device.inference_data_delete", tenant_id=device.tenant_id,
                          target=device)


# --- re-projection -------------------------------------------------------------------------

INVALIDATION_CHUNK = 1000  # device ids per registry message


def profiles_changed(tenant_id: uuid.UUID) -> None:
    """Re-project every device profile of the tenant once this transaction commits."""
    pending, new = transaction_state("inference_profiles_changed")
    pending[str(tenant_id)] = True
    if new:
        on_commit(lambda: _reproject(list(pending)))


def _reproject(tenant_ids: list[str]) -> None:
    """Write the profiles, then name the devices on the registry channel so brokers drop
    their cached copies at once rather than within their cache's ``max_age``."""
    for raw in tenant_ids:
        tenant_id = uuid.UUID(raw)
        try:
            project_devices(tenant_id)
            with Session(bind=db.session.get_bind()) as session:  # after commit: its own
                ids = [str(i) for i in session.scalars(
                    select(Device.id).where(Device.tenant_id == tenant_id))]
            client = get_redis()
            for start in range(0, len(ids), INVALIDATION_CHUNK):
                client.publish(registry_channel(), json.dumps(
                    {"tenant_id": raw, "device_ids": ids[start:start + INVALIDATION_CHUNK]}))
        except Exception:  # the commit stands; project_missing_profiles and `max_age` converge
            log.exception("could not re-project the device profiles of tenant %s", raw)


# --- settings ------------------------------------------------------------------------------

SETTINGS_FIELDS = ("memory_ttl_hours", "memory_max_turns", "memory_max_tokens",
                   "transcript_retention_hours")


def get_settings(tenant_id: uuid.UUID) -> dict[str, Any]:
    """The tenant's memory policy in the API's shape; the platform's while it has none."""
    row = db.session.get(InferenceSettings, tenant_id)
    if row is None:
        return {**default_memory_settings(), "platform_defaults": True, "updated_at": None}
    return {**{key: getattr(row, key) for key in SETTINGS_FIELDS},
            "platform_defaults": False, "updated_at": row.updated_at}


def put_settings(tenant_id: uuid.UUID, values: dict[str, int]) -> dict[str, Any]:
    """Replace the tenant's memory policy (every field given); from now on it no longer
    follows the platform's defaults."""
    row = db.session.get(InferenceSettings, tenant_id)
    before = get_settings(tenant_id)
    if row is None:
        row = InferenceSettings(tenant_id=tenant_id)
        db.session.add(row)
    changes = {key: values[key] for key in SETTINGS_FIELDS if before[key] != values[key]}
    for key in SETTINGS_FIELDS:
        setattr(row, key, values[key])
    db.session.flush()
    if changes or before["platform_defaults"]:
        accounts.record_audit("inference.settings.update", tenant_id=tenant_id,
                              details=changes)
        profiles_changed(tenant_id)
    return get_settings(tenant_id)


# --- provider configurations ---------------------------------------------------------------

HINT_MIN_KEY_LENGTH = 12  # a shorter key shows no hint: four characters would be too much of it


def _hint(api_key: str | None) -> str | None:
    return api_key[-4:] if api_key and len(api_key) >= HINT_MIN_KEY_LENGTH else None


def _audit_value(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    return getattr(value, "value", value)  # enums


def _check_unique(config: ProviderConfig) -> None:
    """Friendly 409s; the unique constraints still decide under a race."""
    others = scoped(ProviderConfig, config.tenant_id)
    if config.id is not None:
        others = others.where(ProviderConfig.id != config.id)
    checks = [(ProviderConfig.name == config.name, "provider_exists", "name",
               "A provider configuration with this name exists.")]
    if config.is_default:
        checks.append((ProviderConfig.is_default.is_(True), "default_provider_exists",
                       "is_default", "The tenant has a default provider configuration."))
    if config.product_id is not None:
        checks.append((ProviderConfig.product_id == config.product_id, "product_has_provider",
                       "product_id", "This product has a provider configuration."))
    for condition, code, field, message in checks:
        clash = db.session.execute(others.where(condition)).scalars().first()
        if clash is not None:
            raise Conflict(message, code=code, details={field: [f"Already {clash.name!r}."]})


_TEXT_FIELDS = ("name", "base_url", "model", "transcription_model", "speech_model", "voice")


def _apply(config: ProviderConfig, changes: dict[str, Any]) -> dict[str, Any]:
    """Set the given fields (``None`` clears an optional one); returns what changed."""
    applied: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "api_key":
            if value is None and config.api_key_encrypted is None:
                continue
            config.api_key_encrypted = encrypt(value) if value else None
            config.api_key_hint = _hint(value)
            applied["api_key"] = "set" if value else "removed"
            continue
        if key in _TEXT_FIELDS and value is not None:
            value = value.strip() or None
        if key == "product_id" and value is not None:
            try:
                get_owned(Product, value, config.tenant_id)
            except NotFound as exc:
                raise NotFound("No such product.", details={key: ["No such product."]}) from exc
        if key == "secondary_id" and value is not None:
            if value == config.id:
                raise ValidationFailed(details={key: ["A configuration cannot fail over to "
                                                      "itself."]})
            try:
                get_owned(ProviderConfig, value, config.tenant_id)
            except NotFound as exc:
                raise NotFound("No such provider configuration.",
                               details={key: ["No such provider configuration."]}) from exc
        if getattr(config, key) != value:
            setattr(config, key, value)
            applied[key] = _audit_value(value)
    return applied


def create_provider(tenant_id: uuid.UUID, data: dict[str, Any]) -> ProviderConfig:
    # Column defaults arrive only at the flush; the checks before it need them now.
    config = ProviderConfig(tenant_id=tenant_id, is_default=False, enabled=True,
                            first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S,
                            total_timeout_s=TOTAL_TIMEOUT_S)
    applied = _apply(config, data)
    _check_unique(config)
    db.session.add(config)
    db.session.flush()
    accounts.record_audit("provider.create", tenant_id=tenant_id, target=config,
                          details=applied)
    profiles_changed(tenant_id)
    return config


def update_provider(config: ProviderConfig, changes: dict[str, Any]) -> ProviderConfig:
    with db.session.no_autoflush:  # checked before the constraints see the change
        applied = _apply(config, changes)
        if applied:
            _check_unique(config)
    if applied:
        db.session.flush()
        accounts.record_audit("provider.update", tenant_id=config.tenant_id, target=config,
                              details=applied)
        profiles_changed(config.tenant_id)
    return config


def delete_provider(config: ProviderConfig) -> None:
    """Refused while another configuration fails over to this one."""
    users = db.session.execute(scoped(ProviderConfig, config.tenant_id).where(
        ProviderConfig.secondary_id == config.id).order_by(ProviderConfig.name)).scalars().all()
    if users:
        raise Conflict("Another provider configuration fails over to this one.",
                       code="provider_in_use",
                       details={"secondary_of": [u.name for u in users]})
    accounts.record_audit("provider.delete", tenant_id=config.tenant_id, target=config,
                          details={"name": config.name})
    db.session.delete(config)
    db.session.flush()
    profiles_changed(config.tenant_id)
