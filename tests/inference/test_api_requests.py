"""What a device did, through the REST API: its recent requests from ``usage_events`` (newest
admission first, keyset pages), its recent transcripts from Redis, and deleting its memory and
transcripts."""

from __future__ import annotations

import json
import uuid
from typing import Any

import redis as redis_lib

from core.db import db
from fleet import services as fleet
from fleet.models import Device
from inference import services
from inference.sessions import recent_key
from inference.units import Units
from inference.usage import UsageEvent, UsageWriter, append_event
from tests.fleet.fixtures import Vendor, make_vendor

API = "/api/v1"
NOW_MS = 1_796_000_000_000


def make_device(vendor: Vendor) -> Device:
    device = fleet.create_device(vendor.product, f"SN-{uuid.uuid4().hex[:10]}")
    db.session.commit()
    return device


def event(device: Device, n: int, **changes: Any) -> UsageEvent:
    values: dict[str, Any] = {
        "tenant_id": str(device.tenant_id), "device_id": str(device.id),
        "product_id": str(device.product_id), "request_id": f"req-{n}",
        "admitted_at_ms": NOW_MS + n * 1000, "settled_at_ms": NOW_MS + n * 1000 + 900,
        "stream_id": f"broker-1-{n}", "kind": "text", "provider": "local", "model": "echo",
        "units": Units(input_tokens=10 + n, output_tokens=20), "credits": 3 + n,
        "ttft_ms": 120.5, "first_delta_ms": 130.0, "duration_ms": 900.5, "finish": "stop",
        "broker": "broker-1"}
    values.update(changes)
    return UsageEvent(**values)


def write(app: Any, redis_client: redis_lib.Redis, *events: UsageEvent) -> None:
    """Through the real pipeline: the tenant's usage stream, then the usage writer."""
    for item in events:
        append_event(redis_client, item)
    writer = UsageWriter(app, "writer-test", block_ms=10)
    while writer.drain_once():
        pass


def transcripts(app: Any, redis_client: redis_lib.Redis, device: Device,
                *records: dict[str, Any]) -> str:
    key = recent_key(app.config["ENSOUL_REDIS_PREFIX"], str(device.tenant_id), str(device.id))
    for record in records:
        redis_client.lpush(key, json.dumps(record))
    return key


def test_recent_requests_service_pages_newest_admission_first(
        app: Any, redis_client: redis_lib.Redis) -> None:
    vendor = make_vendor()
    device, other = make_device(vendor), make_device(vendor)
    # Written out of admission order: the sweeper settles a crashed broker's request late.
    write(app, redis_client, event(device, 2), event(device, 0), event(other, 5),
          event(device, 1))
    write(app, redis_client, event(device, 3))
    tenant_id = vendor.setup.tenant.id
    first = services.recent_requests(tenant_id, device.id, None, 2)
    assert [r.request_id for r in first["items"]] == ["req-3", "req-2"]
    second = services.recent_requests(tenant_id, device.id, first["next_cursor"], 2)
    assert [r.request_id for r in second["items"]] == ["req-1", "req-0"]
    assert second["next_cursor"] is None
    assert services.recent_requests(uuid.uuid4(), device.id, None, 10)["items"] == []


def test_recent_transcripts_service_skips_what_is_not_a_record(
        app: Any, redis_client: redis_lib.Redis) -> None:
    vendor = make_vendor()
    device = make_device(vendor)
    key = transcripts(app, redis_client, device,
                      {"id": "r1", "kind": "text", "asked": "hi", "answer": "hello", "at": 1})
    redis_client.lpush(key, "not json", "[1]")
    assert services.recent_transcripts(device.tenant_id, device.id) == [
        {"id": "r1", "kind": "text", "asked": "hi", "answer": "hello", "at": 1}]
    assert services.recent_transcripts(uuid.uuid4(), device.id) == []
