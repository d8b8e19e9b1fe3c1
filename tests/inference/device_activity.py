"""What a device did, as the API and portal tests set it up: usage events written through the
real pipeline (the tenant's Redis stream, then the usage writer) and recent transcripts as the
broker's memory keeps them."""

from __future__ import annotations

import json
from typing import Any

import redis as redis_lib

from fleet.models import Device
from inference.sessions import recent_key
from inference.units import Units
from inference.usage import UsageEvent, UsageWriter, append_event

NOW_MS = 1_796_000_000_000  # 2026-11-30 09:33:20 UTC


def usage_event(device: Device, n: int, **changes: Any) -> UsageEvent:
    """The ``n``-th settled text request of ``device``, admitted ``n`` seconds after NOW_MS."""
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


def write_through_pipeline(app: Any, redis_client: redis_lib.Redis,
                           *events: UsageEvent) -> None:
    """Through the real pipeline: the tenant's usage stream, then the usage writer."""
    for item in events:
        append_event(redis_client, item)
    writer = UsageWriter(app, "writer-test", block_ms=10)
    while writer.drain_once():
        pass


def remember_transcripts(app: Any, redis_client: redis_lib.Redis, device: Device,
                         *records: dict[str, Any]) -> str:
    """Recent transcripts as the broker's memory writes them (oldest first here); returns
    their Redis key."""
    key = recent_key(app.config["ENSOUL_REDIS_PREFIX"], str(device.tenant_id), str(device.id))
    for record in records:
        redis_client.lpush(key, json.dumps(record))
    return key
