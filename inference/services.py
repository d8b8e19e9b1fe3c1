"""Inference's side of the other domains: profiles follow the registry, resets forget."""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

from flask import Flask, current_app
from sqlalchemy import select, tuple_

from core.db import db
from core.errors import ValidationFailed
from core.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from core.redis import get_redis
from fleet.hooks import register_registry_hook, register_reset_hook
from fleet.models import Device
from inference.directory import project_devices
from inference.models import UsageEventRecord
from inference.sessions import RECENT_MAX, memory_key, recent_key


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
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
