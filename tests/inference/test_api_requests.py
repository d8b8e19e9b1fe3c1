"""What a device did, through the REST API: its recent requests from ``usage_events`` (newest
admission first, keyset pages), its recent transcripts from Redis, and deleting its memory and
transcripts."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis as redis_lib
import redis.asyncio as aioredis
from sqlalchemy import select

from accounts.models import AuditEntry
from core.db import db
from fleet import services as fleet
from fleet.models import Device, DeviceEvent
from inference import services
from inference.directory import DeviceProfile, profile_key
from inference.sessions import Memory, memory_key
from inference.units import Units
from tests.fleet.fixtures import Vendor, make_vendor
from tests.inference.device_activity import (
    NOW_MS,
    remember_transcripts,
    usage_event,
    write_through_pipeline,
)

API = "/api/v1"


def make_device(vendor: Vendor) -> Device:
    device = fleet.create_device(vendor.product, f"SN-{uuid.uuid4().hex[:10]}")
    db.session.commit()
    return device


def test_recent_requests_service_pages_newest_admission_first(
        app: Any, redis_client: redis_lib.Redis) -> None:
    vendor = make_vendor()
    device, other = make_device(vendor), make_device(vendor)
    # Written out of admission order: the sweeper settles a crashed broker's request late.
    write_through_pipeline(app, redis_client, usage_event(device, 2), usage_event(device, 0),
                           usage_event(other, 5), usage_event(device, 1))
    write_through_pipeline(app, redis_client, usage_event(device, 3))
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
    key = remember_transcripts(app, redis_client, device, {
        "id": "r1", "kind": "text", "asked": "hi", "answer": "hello", "at": 1})
    redis_client.lpush(key, "not json", "[1]")
    assert services.recent_transcripts(device.tenant_id, device.id) == [
        {"id": "r1", "kind": "text", "asked": "hi", "answer": "hello", "at": 1}]
    assert services.recent_transcripts(uuid.uuid4(), device.id) == []


# --- through the API ------------------------------------------------------------------------


@pytest.fixture
def vendor(app: Any) -> Vendor:
    return make_vendor()


def test_a_devices_requests_newest_first_with_timing_units_and_outcome(
        client: Any, vendor: Vendor, redis_client: redis_lib.Redis) -> None:
    device, other = make_device(vendor), make_device(vendor)
    write_through_pipeline(
        client.application, redis_client,
        *(usage_event(device, n) for n in range(5)), usage_event(other, 9),
        usage_event(device, 5, kind="voice", finish="error", error_code="provider_timeout",
                    provider="openai", model="gpt-4o-mini", ttft_ms=None, first_delta_ms=None,
                    units=Units(audio_in_ms=1800), credits=0, conversation_id="c-1"))
    url = f"{API}/devices/{device.id}/requests"
    first = client.get(f"{url}?limit=2", headers=vendor.headers)
    assert first.status_code == 200, first.json
    assert [r["request_id"] for r in first.json["items"]] == ["req-5", "req-4"]
    failed, ok = first.json["items"]
    assert {k: failed[k] for k in ("kind", "finish", "error_code", "provider", "model",
                                   "ttft_ms", "first_delta_ms", "audio_in_ms", "credits",
                                   "conversation_id")} == {
        "kind": "voice", "finish": "error", "error_code": "provider_timeout",
        "provider": "openai", "model": "gpt-4o-mini", "ttft_ms": None, "first_delta_ms": None,
        "audio_in_ms": 1800, "credits": 0, "conversation_id": "c-1"}
    assert {k: ok[k] for k in ("ttft_ms", "first_delta_ms", "duration_ms", "input_tokens",
                               "output_tokens", "credits", "finish", "error_code")} == {
        "ttft_ms": 120.5, "first_delta_ms": 130.0, "duration_ms": 900.5, "input_tokens": 14,
        "output_tokens": 20, "credits": 7, "finish": "stop", "error_code": None}
    assert ok["admitted_at"].startswith("2026-") and ok["settled_at"] > ok["admitted_at"]

    seen = [r["request_id"] for r in first.json["items"]]
    cursor = first.json["next_cursor"]
    while cursor:
        page = client.get(f"{url}?limit=2&cursor={cursor}", headers=vendor.headers).json
        seen += [r["request_id"] for r in page["items"]]
        cursor = page["next_cursor"]
    assert seen == ["req-5", "req-4", "req-3", "req-2", "req-1", "req-0"]


def test_a_cursor_from_another_device_is_refused(client: Any, vendor: Vendor,
                                                 redis_client: redis_lib.Redis) -> None:
    device, other = make_device(vendor), make_device(vendor)
    write_through_pipeline(client.application, redis_client, usage_event(device, 0),
                           usage_event(other, 0), usage_event(other, 1))
    theirs = client.get(f"{API}/devices/{other.id}/requests?limit=1",
                        headers=vendor.headers).json["next_cursor"]
    answer = client.get(f"{API}/devices/{device.id}/requests?cursor={theirs}",
                        headers=vendor.headers)
    assert answer.status_code == 422
    assert list(answer.json["error"]["details"]) == ["cursor"]
    bad = client.get(f"{API}/devices/{device.id}/requests?cursor=nope", headers=vendor.headers)
    assert bad.status_code == 422 and list(bad.json["error"]["details"]) == ["cursor"]


def test_another_tenants_device_is_not_found(client: Any, vendor: Vendor,
                                             redis_client: redis_lib.Redis) -> None:
    other = make_vendor()
    theirs = make_device(other)
    write_through_pipeline(client.application, redis_client, usage_event(theirs, 0))
    key = remember_transcripts(client.application, redis_client, theirs, {
        "id": "r1", "kind": "text", "asked": "secret", "answer": "kept", "at": 1})
    for method, suffix in (("get", "requests"), ("get", "transcripts"),
                           ("delete", "inference-data")):
        answer = client.open(f"{API}/devices/{theirs.id}/{suffix}", method=method.upper(),
                             headers=vendor.headers)
        assert answer.status_code == 404, suffix
        assert "secret" not in answer.get_data(as_text=True)
    assert redis_client.exists(key) == 1
    assert len(client.get(f"{API}/devices/{theirs.id}/requests",
                          headers=other.headers).json["items"]) == 1


def test_a_devices_recent_transcripts(client: Any, vendor: Vendor,
                                      redis_client: redis_lib.Redis) -> None:
    device = make_device(vendor)
    url = f"{API}/devices/{device.id}/transcripts"
    assert client.get(url, headers=vendor.headers).json == {"items": []}
    remember_transcripts(client.application, redis_client, device,
                         {"id": "r1", "kind": "voice", "asked": "Tell me a story",
                          "answer": "Once...", "at": NOW_MS},
                         {"id": "r2", "kind": "text", "asked": "And then?", "answer": "The end.",
                          "at": NOW_MS + 5000, "extra": "ignored"})
    assert client.get(url, headers=vendor.headers).json == {"items": [
        {"id": "r2", "kind": "text", "asked": "And then?", "answer": "The end.",
         "at": NOW_MS + 5000},
        {"id": "r1", "kind": "voice", "asked": "Tell me a story", "answer": "Once...",
         "at": NOW_MS}]}


def test_deleting_a_devices_inference_data_empties_its_redis_keys(
        client: Any, vendor: Vendor, redis_client: redis_lib.Redis) -> None:
    device, other = make_device(vendor), make_device(vendor)
    prefix = client.application.config["ENSOUL_REDIS_PREFIX"]
    keys = {}
    for each in (device, other):
        recent = remember_transcripts(client.application, redis_client, each, {
            "id": "r1", "kind": "text", "asked": "hi", "answer": "hello", "at": NOW_MS})
        memory = memory_key(prefix, str(each.tenant_id), str(each.id))
        redis_client.hset(memory, "c-1", json.dumps([{"role": "user", "content": "hi"}]))
        keys[each.id] = (recent, memory)
    write_through_pipeline(client.application, redis_client, usage_event(device, 0))

    answer = client.delete(f"{API}/devices/{device.id}/inference-data", headers=vendor.headers)
    assert answer.status_code == 204
    assert redis_client.exists(*keys[device.id]) == 0
    assert redis_client.exists(*keys[other.id]) == 2
    assert client.get(f"{API}/devices/{device.id}/transcripts",
                      headers=vendor.headers).json == {"items": []}
    # Usage records hold no conversation content: they stay (billing needs them).
    assert len(client.get(f"{API}/devices/{device.id}/requests",
                          headers=vendor.headers).json["items"]) == 1
    [entry] = db.session.execute(select(AuditEntry).where(
        AuditEntry.action == "device.inference_data_delete")).scalars()
    assert (entry.tenant_id, entry.target_id) == (vendor.setup.tenant.id, str(device.id))
    assert db.session.execute(select(DeviceEvent.kind).where(
        DeviceEvent.device_id == device.id).order_by(DeviceEvent.id)).scalars().all()[-1] == (
        "inference_data_deleted")


def test_zero_transcript_retention_keeps_no_transcript(
        client: Any, vendor: Vendor, redis_client: redis_lib.Redis, redis_url: str) -> None:
    """What a children's device needs: the broker's turn leaves no transcript behind."""
    device = make_device(vendor)
    fleet.activate(device)
    db.session.commit()
    assert client.put(f"{API}/inference/settings", headers=vendor.headers, json={
        "memory_ttl_hours": 1, "memory_max_turns": 5, "memory_max_tokens": 1000,
        "transcript_retention_hours": 0}).status_code == 200
    prefix = client.application.config["ENSOUL_REDIS_PREFIX"]
    seen = DeviceProfile.from_json(redis_client.get(  # type: ignore[arg-type]
        profile_key(prefix, str(device.tenant_id), str(device.id))))

    async def one_turn() -> None:
        connection = aioredis.Redis.from_url(redis_url)
        try:
            await Memory(connection, prefix).remember(
                str(device.tenant_id), str(device.id), "c-1", [], "hi", "hello", seen.memory,
                {"id": "r1", "kind": "text", "asked": "hi", "answer": "hello", "at": NOW_MS})
        finally:
            await connection.aclose()

    asyncio.run(one_turn())
    assert client.get(f"{API}/devices/{device.id}/transcripts",
                      headers=vendor.headers).json == {"items": []}
    assert redis_client.ttl(memory_key(prefix, str(device.tenant_id), str(device.id))) > 3000
