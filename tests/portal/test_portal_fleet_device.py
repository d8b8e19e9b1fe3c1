"""The device page: identity, status and presence, history; activate, suspend, resume, retire,
reset, transfer, edit; credentials shown once, rotated and revoked; roles and tenancy."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from sqlalchemy import select

from accounts.models import Role
from core.db import db
from fleet import credentials, presence, services
from fleet.models import Device, DeviceEvent, DeviceStatus
from tests.fleet.fixtures import Vendor
from tests.portal.fleet_helpers import event_kinds, fresh, log_in_as, make_device
from tests.portal.helpers import post, text

PASSWORD_RE = re.compile(r'data-testid="device-password">([^<]+)<')


def url(device: Device, action: str = "") -> str:
    return f"/fleet/devices/{device.id}" + (f"/{action}" if action else "")


def act(client: Any, device: Device, action: str, data: dict[str, Any] | None = None) -> Any:
    return post(client, url(device, action), data, page=url(device))


def test_the_page_shows_identity_status_presence_and_history(client: Any,
                                                             vendor: Vendor) -> None:
    device = make_device(vendor.product, "BEAR-001", mac="a4:cf:12:00:00:01", name="Kitchen bear",
                         group="batch-7", tags=["eu", "beta"], end_user_ref="user-42",
                         status=DeviceStatus.ACTIVE)
    services.issue_credentials(device)
    db.session.commit()
    log_in_as(client, vendor)
    page = text(client.get(url(device)))
    for shown in ("BEAR-001", "a4:cf:12:00:00:01", "Kitchen bear", "Companion Bear", "batch-7",
                  "beta", "user-42", device.mqtt_username, device.topic_prefix):
        assert shown in page, shown
    assert 'data-online="no"' in page and 'data-status="active"' in page
    kinds = re.findall(r'data-testid="device-event" data-kind="([^"]+)"', page)
    assert kinds == ["credentials_issued", "activated", "created"]  # newest first
    assert device.mqtt_password_hash not in page

    presence.record(str(device.tenant_id), str(device.id), "status", {"state": "online"},
                    retained=False)
    presence.record(str(device.tenant_id), str(device.id), "state",
                    {"firmware_version": "1.4.2"}, retained=False)
    page = text(client.get(url(device)))
    assert 'data-online="yes"' in page
    assert re.search(r'data-testid="device-firmware">1\.4\.2<', page)
    assert 'data-testid="device-last-seen"><time' in page


def test_a_long_history_has_pages(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product)
    for _ in range(30):
        services.change_status(device, "suspend")
        services.change_status(device, "resume")
    db.session.commit()
    log_in_as(client, vendor)
    first = text(client.get(url(device)))
    assert len(re.findall(r'data-testid="device-event"', first)) == 50
    older = re.search(r'href="([^"]+)" data-testid="device-history-older"', first)
    assert older
    second = text(client.get(older.group(1)))
    assert re.findall(r'data-testid="device-event" data-kind="([^"]+)"', second)[-1] == "created"


def test_status_actions(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, "BEAR-001")
    log_in_as(client, vendor)
    page = text(client.get(url(device)))
    assert 'data-testid="device-activate"' in page and 'data-testid="device-resume"' not in page

    response = act(client, device, "activate")
    assert response.status_code == 302 and response.headers["Location"] == url(device)
    assert fresh(device).status is DeviceStatus.ACTIVE and fresh(device).activated_at
    assert "BEAR-001 is active." in text(client.get(url(device)))
    assert act(client, device, "suspend").status_code == 302
    assert fresh(device).status is DeviceStatus.SUSPENDED
    assert 'data-testid="device-resume"' in text(client.get(url(device)))
    assert act(client, device, "resume").status_code == 302
    assert fresh(device).status is DeviceStatus.ACTIVE
    assert act(client, device, "retire").status_code == 302
    assert fresh(device).status is DeviceStatus.RETIRED
    page = text(client.get(url(device)))
    assert 'data-testid="device-actions"' not in page and "cannot be used again" in page
    assert event_kinds(device)[-4:] == ["activated", "suspend", "resume", "retire"]


def test_an_impossible_action_is_explained(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, status=DeviceStatus.RETIRED)
    log_in_as(client, vendor)
    response = act(client, device, "resume")
    assert response.status_code == 409
    assert "The device cannot do that in its current status." in text(response)
    assert fresh(device).status is DeviceStatus.RETIRED
    assert act(client, device, "explode").status_code == 404


def test_a_refusing_activation_hook_is_shown(client: Any, vendor: Vendor,
                                             refusing_hook: list[Device]) -> None:
    device = make_device(vendor.product)
    log_in_as(client, vendor)
    response = act(client, device, "activate")
    assert response.status_code == 409
    assert "No free licence seat." in text(response)
    assert fresh(device).status is DeviceStatus.PROVISIONED
    assert "seat_checked" not in event_kinds(device)
    assert len(refusing_hook) == 1


def test_reset(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, end_user_ref="user-1", status=DeviceStatus.ACTIVE)
    services.issue_credentials(device)
    db.session.commit()
    log_in_as(client, vendor)
    assert act(client, device, "reset").status_code == 302
    device = fresh(device)
    assert device.status is DeviceStatus.PROVISIONED and device.end_user_ref is None
    assert device.mqtt_password_hash is None
    assert event_kinds(device)[-2:] == ["credentials_revoked", "reset"]
    assert "It needs a new activation." in text(client.get(url(device)))


def test_transfer(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, end_user_ref="user-1", status=DeviceStatus.ACTIVE)
    log_in_as(client, vendor)
    response = act(client, device, "transfer", {"end_user_ref": "  user-2 "})
    assert response.status_code == 302
    assert fresh(device).end_user_ref == "user-2"
    assert fresh(device).status is DeviceStatus.ACTIVE
    assert event_kinds(device)[-1] == "transferred"
    act(client, device, "transfer", {"end_user_ref": ""})
    assert fresh(device).end_user_ref is None


def test_edit(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, group="old", tags=["a"])
    log_in_as(client, vendor)
    page = text(client.get(url(device)))
    assert 'value="old"' in page
    response = act(client, device, "edit", {"name": "Living room", "group": "new",
                                            "tags": "eu beta, eu"})
    assert response.status_code == 302
    device = fresh(device)
    assert (device.name, device.group_name, device.tag_names) == ("Living room", "new",
                                                                  ["beta", "eu"])
    act(client, device, "edit", {"name": "Living room", "group": " ", "tags": ""})
    device = fresh(device)
    assert device.group_name is None and device.tag_names == []
    bad = act(client, device, "edit", {"name": "Living room", "tags": "ok bad/tag"})
    assert bad.status_code == 422 and "Invalid tag" in text(bad)
    empty = act(client, device, "edit", {"name": " ", "tags": ""})
    assert empty.status_code == 422
    assert fresh(device).name == "Living room"


def test_credentials_are_shown_once(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, status=DeviceStatus.ACTIVE)
    log_in_as(client, vendor)
    assert "Issue credentials" in text(client.get(url(device)))
    response = act(client, device, "credentials")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    page = text(response)
    found = PASSWORD_RE.search(page)
    assert found
    password = found.group(1).strip()
    assert credentials.verify_password(fresh(device).mqtt_password_hash, password)
    block = re.search(r'data-testid="device-mqtt-json">([^<]+)<', page)
    assert block
    settings = json.loads(block.group(1))
    assert settings["username"] == device.mqtt_username and settings["password"] == password
    assert settings["publish_topic"] == f"{device.topic_prefix}/up"
    assert password not in text(client.get(url(device)))

    rotated = act(client, device, "credentials")
    new = PASSWORD_RE.search(text(rotated))
    assert new and new.group(1).strip() != password
    assert "The previous password no longer works." in text(rotated)
    assert not credentials.verify_password(fresh(device).mqtt_password_hash, password)
    assert event_kinds(device)[-2:] == ["credentials_issued", "credentials_rotated"]

    assert 'data-testid="device-credentials-revoke"' in text(client.get(url(device)))
    assert act(client, device, "credentials/revoke").status_code == 302
    assert fresh(device).mqtt_password_hash is None


def test_a_retired_device_gets_no_credentials(client: Any, vendor: Vendor) -> None:
    device = make_device(vendor.product, status=DeviceStatus.RETIRED)
    log_in_as(client, vendor)
    response = act(client, device, "credentials")
    assert response.status_code == 409 and 'data-testid="device-password"' not in text(response)
    assert fresh(device).mqtt_password_hash is None


@pytest.mark.parametrize("action", ["activate", "suspend", "resume", "retire", "reset", "edit",
                                    "transfer", "credentials", "credentials/revoke"])
def test_another_tenants_device_is_not_found(client: Any, vendor: Vendor, other_vendor: Vendor,
                                             action: str) -> None:
    device = make_device(other_vendor.product, end_user_ref="theirs", status=DeviceStatus.ACTIVE)
    services.issue_credentials(device)
    db.session.commit()
    before = fresh(device).mqtt_password_hash
    log_in_as(client, vendor)
    assert client.get(url(device)).status_code == 404
    response = post(client, url(device, action), {"name": "mine", "end_user_ref": "mine"},
                    page="/fleet/devices")
    assert response.status_code == 404
    after = fresh(device)
    assert (after.status, after.end_user_ref, after.name) == (DeviceStatus.ACTIVE, "theirs",
                                                              device.serial)
    assert after.mqtt_password_hash == before


@pytest.mark.parametrize("action", ["activate", "suspend", "reset", "edit", "transfer",
                                    "credentials", "credentials/revoke"])
def test_a_viewer_cannot_act(client: Any, vendor: Vendor, action: str) -> None:
    device = make_device(vendor.product, end_user_ref="user-1")
    log_in_as(client, vendor, Role.VIEWER)
    page = text(client.get(url(device)))
    assert 'data-testid="device-actions"' not in page
    assert 'data-testid="device-edit-form"' not in page
    response = post(client, url(device, action), {"name": "mine", "end_user_ref": "mine"},
                    page="/fleet/devices")
    assert response.status_code == 403
    after = fresh(device)
    assert (after.status, after.end_user_ref) == (DeviceStatus.PROVISIONED, "user-1")
    assert db.session.execute(select(DeviceEvent.kind).where(
        DeviceEvent.device_id == device.id)).scalars().all() == ["created"]
