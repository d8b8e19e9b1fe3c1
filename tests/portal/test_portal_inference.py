"""The device page's inference sections: recent requests (from ``usage_events``, in the tenant's
time zone) and transcripts, "Try it" (a request sent as the device, streamed back as SSE) and
deleting the conversation data; roles, tenancy, CSRF and the audit log."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from typing import Any

import pytest
import redis as redis_lib
from babel.dates import format_datetime
from sqlalchemy import select

from accounts import services as accounts
from accounts.models import AuditEntry, Role, Tenant
from core.db import db
from fleet.models import Device, DeviceStatus
from inference import protocol
from inference.service import BrokerThread
from inference.sessions import memory_key, recent_key
from inference.units import Units
from inference.usage import UsageEvent
from portal.inference_views import ANSWER_ERRORS
from tests.conftest import CommittingClient
from tests.factories import PASSWORD
from tests.fleet.fixtures import Vendor
from tests.inference.conftest import (  # noqa: F401 - fixtures
    broker,
    inference_mosquitto,
    make_fleet,
    platform,
    start_broker,
)
from tests.inference.device_activity import (
    NOW_MS,
    remember_transcripts,
    usage_event,
    write_through_pipeline,
)
from tests.portal.fleet_helpers import log_in_as, make_device
from tests.portal.helpers import csrf, login, post, text
from tests.support.waiting import free_port


def url(device: Device, action: str = "") -> str:
    return f"/fleet/devices/{device.id}" + (f"/{action}" if action else "")


def usage(device: Device, n: int, **changes: Any) -> UsageEvent:
    """Request ids unique across tests; timings with fractions the page rounds."""
    return usage_event(device, n, **{
        "request_id": f"req-{n:04d}-{uuid.uuid4().hex}", "credits": 3, "ttft_ms": 120.2,
        "first_delta_ms": 130.4, "duration_ms": 900.2, **changes})


def shown_requests(page: str) -> list[str]:
    return re.findall(r'data-testid="device-request" data-request-id="([^"]+)"', page)


def audit_actions(device: Device) -> list[tuple[str, dict[str, Any]]]:
    """This module's audit entries about ``device`` (the fleet's own are left out)."""
    db.session.expire_all()
    return [(e.action, e.details) for e in db.session.execute(
        select(AuditEntry).where(AuditEntry.target_id == str(device.id),
                                 AuditEntry.action.in_(["device.try",
                                                        "device.conversation_data_delete"]))
        .order_by(AuditEntry.created_at)).scalars()]


@pytest.fixture
def active(vendor: Vendor) -> Device:
    return make_device(vendor.product, "BEAR-001", status=DeviceStatus.ACTIVE)


def test_the_page_shows_recent_requests_in_the_tenants_time_zone(
        client: Any, app: Any, redis_client: redis_lib.Redis, vendor: Vendor,
        active: Device) -> None:
    vendor.setup.tenant.timezone = "Asia/Shanghai"
    events = [usage(active, n) for n in range(12)]
    events[11] = usage(active, 11, kind="voice", finish="error", error_code="provider_error",
                       units=Units(input_tokens=7, output_tokens=3, audio_in_ms=2400,
                                   audio_out_ms=1200), credits=1234)
    write_through_pipeline(app, redis_client, *events, usage(make_device(vendor.product), 99))
    log_in_as(client, vendor)

    page = text(client.get(url(active)))
    ids = shown_requests(page)
    assert ids == [e.request_id for e in reversed(events)][:10]  # newest first, ten of them
    newest = page[page.index(f'data-request-id="{events[11].request_id}"'):]
    newest = newest[:newest.index("</tr>")]
    for cell in ("Voice", "<code>error</code>", "provider_error", ">130<", ">120<", ">900<",
                 "7 / 3", "2,400 / 1,200", "1,234"):
        assert cell in newest, cell
    admitted = dt.datetime.fromtimestamp((NOW_MS + 11_000) / 1000, dt.UTC)
    assert format_datetime(admitted, "medium", tzinfo="Asia/Shanghai", locale="en") in newest
    assert format_datetime(admitted, "medium", tzinfo="UTC", locale="en") not in newest

    more = re.search(r'href="([^"]+)" data-testid="device-requests-more"', page)
    assert more
    everything = text(client.get(more.group(1)))
    assert shown_requests(everything) == [e.request_id for e in reversed(events)]
    assert "device-requests-older" not in everything


def test_the_requests_page_has_pages(client: Any, app: Any, redis_client: redis_lib.Redis,
                                     vendor: Vendor, active: Device) -> None:
    events = [usage(active, n) for n in range(53)]
    write_through_pipeline(app, redis_client, *events)
    log_in_as(client, vendor)
    first = text(client.get(url(active, "requests")))
    assert len(shown_requests(first)) == 50
    older = re.search(r'href="([^"]+)" data-testid="device-requests-older"', first)
    assert older
    second = text(client.get(older.group(1).replace("&amp;", "&")))
    assert shown_requests(second) == [e.request_id for e in events[2::-1]]
    assert client.get(url(active, "requests") + "?cursor=nonsense").status_code == 422


def test_without_requests_the_page_says_so(client: Any, vendor: Vendor, active: Device) -> None:
    log_in_as(client, vendor)
    page = text(client.get(url(active)))
    assert "No requests yet" in page and "No transcripts" in page
    assert 'data-testid="device-requests-more"' not in page


def test_the_page_shows_recent_transcripts_escaped(client: Any, app: Any,
                                                  redis_client: redis_lib.Redis, vendor: Vendor,
                                                  active: Device) -> None:
    remember_transcripts(app, redis_client, active,
                         {"id": "a" * 32, "kind": "text", "asked": "Hello, bear!",
                          "answer": "Hi there.", "at": NOW_MS},
                         {"id": "b" * 32, "kind": "voice", "asked": "<script>alert(1)</script>",
                          "answer": "Not today.", "at": NOW_MS + 5000})
    log_in_as(client, vendor)
    page = text(client.get(url(active)))
    asked = re.findall(r'data-testid="transcript-asked">([^<]*)<', page)
    assert asked == ["&lt;script&gt;alert(1)&lt;/script&gt;", "Hello, bear!"]
    assert "<script>alert(1)" not in page
    assert re.findall(r'data-testid="transcript-answer">([^<]*)<', page) == ["Not today.",
                                                                             "Hi there."]


@pytest.mark.parametrize("role,shown", [(Role.OPERATIONS, True), (Role.DEVELOPER, True),
                                        (Role.FINANCE, False), (Role.VIEWER, False)])
def test_transcripts_are_shown_only_to_roles_that_support_devices(
        client: Any, app: Any, redis_client: redis_lib.Redis, vendor: Vendor, active: Device,
        role: Role, shown: bool) -> None:
    """What end users said is for the people who run and support the devices."""
    remember_transcripts(app, redis_client, active,
                         {"id": "c" * 32, "kind": "text", "asked": "A private question",
                          "answer": "A private answer.", "at": NOW_MS})
    log_in_as(client, vendor, role)
    page = text(client.get(url(active)))
    assert ("A private question" in page) is shown
    assert ("Recent transcripts" in page) is shown


def test_try_it_is_offered_to_writers_on_active_devices(client: Any, vendor: Vendor,
                                                        active: Device) -> None:
    provisioned = make_device(vendor.product)
    log_in_as(client, vendor)
    page = text(client.get(url(active)))
    assert 'data-testid="try-form"' in page and f'action="{url(active, "try")}"' in page
    assert "it receives the answer too" in page
    assert 'data-testid="device-delete-conversation-data"' in page
    assert 'data-testid="try-form"' not in text(client.get(url(provisioned)))


def test_a_viewer_sees_the_requests_but_not_the_transcripts_and_cannot_try_or_delete(
        client: Any, app: Any, redis_client: redis_lib.Redis, vendor: Vendor,
        active: Device) -> None:
    write_through_pipeline(app, redis_client, usage(active, 1))
    remember_transcripts(app, redis_client, active, {
        "id": "a" * 32, "kind": "text", "asked": "Hello?", "answer": "Hi.", "at": NOW_MS})
    log_in_as(client, vendor, Role.VIEWER)
    page = text(client.get(url(active)))
    assert len(shown_requests(page)) == 1 and "Hello?" not in page  # transcripts: not theirs
    assert 'data-testid="try-form"' not in page
    assert 'data-testid="device-delete-conversation-data"' not in page
    for action in ("try", "conversation-data/delete"):
        response = post(client, url(active, action), {"text": "hi"}, page=url(active))
        assert response.status_code == 403, action
    prefix = app.config["ENSOUL_REDIS_PREFIX"]
    assert redis_client.exists(recent_key(prefix, str(active.tenant_id), str(active.id)))
    assert audit_actions(active) == []


@pytest.mark.parametrize("action", ["try", "conversation-data/delete", "requests"])
def test_another_tenants_device_is_not_found(client: Any, vendor: Vendor, other_vendor: Vendor,
                                             action: str) -> None:
    theirs = make_device(other_vendor.product, status=DeviceStatus.ACTIVE)
    log_in_as(client, vendor)
    if action == "requests":
        assert client.get(url(theirs, action)).status_code == 404
    else:
        response = post(client, url(theirs, action), {"text": "hi"}, page="/fleet/devices")
        assert response.status_code == 404
    assert audit_actions(theirs) == []


def sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.fixture
def tried(platform: Any, broker: BrokerThread) -> tuple[Any, Device, str]:  # noqa: F811
    """A client logged in as an operations member of a tenant whose active device the real
    inference broker serves (on this suite's Mosquitto); the try needs committed rows."""
    fleet = make_fleet(1)
    device = fleet.devices[0][0]
    user = accounts.create_user(f"ops-{uuid.uuid4().hex[:8]}@vendor.example", PASSWORD, "Ops")
    accounts.add_member(db.session.get(Tenant, device.tenant_id), user, Role.OPERATIONS)
    db.session.commit()
    platform.test_client_class = CommittingClient
    client = platform.test_client()
    login(client, user.email)
    return client, device, user.email


def test_try_streams_the_answer_as_server_sent_events_and_is_audited(
        tried: tuple[Any, Device, str]) -> None:
    client, device, email = tried
    response = post(client, url(device, "try"), {"text": "  Hello, 熊!  "}, page=url(device))
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-store"
    events = sse(text(response))
    assert events[0][0] == "start" and events[-1][0] == "end"
    assert {name for name, _ in events[1:-1]} == {"delta"}
    request_id = events[0][1]["id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert all(message["id"] == request_id for _, message in events)
    answer = "".join(m["text"] for name, m in events if name == "delta")
    assert answer.startswith("You asked: Hello, 熊!")  # the local provider's echo, trimmed
    end = events[-1][1]
    assert end["finish"] == "stop" and end["usage"]["output_tokens"] == 12
    db.session.expire_all()
    [entry] = db.session.execute(select(AuditEntry).where(
        AuditEntry.action == "device.try", AuditEntry.target_id == str(device.id))).scalars()
    assert entry.details == {"request_id": request_id, "chars": 9}
    assert entry.actor_label == email


@pytest.mark.parametrize(("data", "status"), [({"text": ""}, 422), ({"text": "   "}, 422),
                                              ({"text": "x" * 2001}, 422),
                                              ({"text": "a\x00b"}, 422)])
def test_try_refuses_a_bad_message(client: Any, vendor: Vendor, active: Device,
                                   data: dict[str, str], status: int) -> None:
    log_in_as(client, vendor)
    assert post(client, url(active, "try"), data, page=url(active)).status_code == status
    assert audit_actions(active) == []


def test_try_needs_the_csrf_token(client: Any, vendor: Vendor, active: Device) -> None:
    log_in_as(client, vendor)
    assert client.post(url(active, "try"), data={"text": "hi"}).status_code == 400
    assert client.post(url(active, "try"), data={"text": "hi", "csrf_token": "forged"}
                       ).status_code == 400
    assert audit_actions(active) == []


@pytest.mark.parametrize("status", [DeviceStatus.PROVISIONED, DeviceStatus.SUSPENDED,
                                    DeviceStatus.RETIRED])
def test_only_an_active_device_can_be_tried(client: Any, vendor: Vendor,
                                            status: DeviceStatus) -> None:
    device = make_device(vendor.product, status=status)
    log_in_as(client, vendor)
    response = post(client, url(device, "try"), {"text": "hi"}, page=url(device))
    assert response.status_code == 409
    assert audit_actions(device) == []


def test_an_unreachable_mqtt_broker_ends_the_stream_with_an_error(
        client: Any, app: Any, vendor: Vendor, active: Device,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.config, "MQTT_URL", f"mqtt://127.0.0.1:{free_port()}")
    log_in_as(client, vendor)
    response = post(client, url(active, "try"), {"text": "hi"}, page=url(active))
    assert response.status_code == 200
    [(name, message)] = sse(text(response))
    assert name == "error" and message["code"] == "unavailable"
    assert message["id"] == audit_actions(active)[0][1]["request_id"]


def test_without_an_inference_broker_the_stream_ends_with_a_timeout(
        client: Any, app: Any, mosquitto: Any, vendor: Vendor, active: Device,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.config, "MQTT_URL", mosquitto.url)
    monkeypatch.setattr("portal.inference_views.TRY_SECONDS", 0.5)
    log_in_as(client, vendor)
    response = post(client, url(active, "try"), {"text": "anyone there?"}, page=url(active))
    [(name, message)] = sse(text(response))
    assert name == "error" and message["code"] == "timeout"


def test_delete_conversation_data(client: Any, app: Any, redis_client: redis_lib.Redis,
                                  vendor: Vendor, active: Device) -> None:
    other = make_device(vendor.product, status=DeviceStatus.ACTIVE)
    prefix = app.config["ENSOUL_REDIS_PREFIX"]
    for device in (active, other):
        remember_transcripts(app, redis_client, device, {
            "id": "a" * 32, "kind": "text", "asked": "Remember my name: Ada.",
            "answer": "Hello, Ada.", "at": NOW_MS})
        redis_client.hset(memory_key(prefix, str(device.tenant_id), str(device.id)), "c1", "[]")
    write_through_pipeline(app, redis_client, usage(active, 1))
    log_in_as(client, vendor, Role.DEVELOPER)
    assert "Remember my name" in text(client.get(url(active)))

    token = csrf(client, url(active))
    assert client.post(url(active, "conversation-data/delete")).status_code == 400
    assert redis_client.exists(recent_key(prefix, str(active.tenant_id), str(active.id)))
    response = client.post(url(active, "conversation-data/delete"), data={"csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == url(active)
    for key in (recent_key, memory_key):
        assert not redis_client.exists(key(prefix, str(active.tenant_id), str(active.id)))
        assert redis_client.exists(key(prefix, str(other.tenant_id), str(other.id)))
    page = text(client.get(url(active)))
    assert "conversation memory and recent transcripts of BEAR-001 are deleted" in page
    assert "Remember my name" not in page and "No transcripts" in page
    assert len(shown_requests(page)) == 1  # usage is a record of what was consumed: kept
    assert audit_actions(active) == [("device.conversation_data_delete", {})]


def test_the_sections_are_translated(client: Any, vendor: Vendor, active: Device) -> None:
    log_in_as(client, vendor)
    post(client, "/language", {"locale": "zh_Hans"}, page=url(active))
    page = text(client.get(url(active)))
    for shown in ("试用", "最近的请求", "最近的对话记录", "删除对话数据", "以设备身份发送"):
        assert shown in page, shown
    labels = re.search(r"<script type=\"application/json\" data-try-labels>(.+?)</script>", page)
    assert labels
    decoded = json.loads(labels.group(1))
    assert decoded["finishes"]["stop"] != "Complete" and "{platform}" in decoded["first_delta"]


def test_every_broker_error_code_has_a_label() -> None:
    assert set(protocol.ERROR_CODES) <= set(ANSWER_ERRORS)
