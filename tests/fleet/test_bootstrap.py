"""Bootstrap and activation end to end in the xiaozhi-esp32 shape: 202 then 200, code
expiry, guessing, HMAC right and wrong, refusing activation hooks, reset and transfer."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from core.db import db, utcnow
from fleet import activation, credentials, hooks, services
from fleet.models import ActivationChallenge, Device, DeviceEvent, DeviceStatus
from tests.fleet.fixtures import make_vendor

HARDWARE_KEY = "8f" * 32


def ota(client: Any, key: str, mac: str, *, serial: str | None = None,
        in_path: bool = False, version: str = "1.4.0") -> Any:
    headers = {"Device-Id": mac, "Client-Id": str(uuid.uuid4()), "Activation-Version": "2",
               "User-Agent": "esp32-s3/1.4.0", "Accept-Language": "zh-CN"}
    if serial:
        headers["Serial-Number"] = serial
    url = f"/bootstrap/{key}/ota/" if in_path else "/bootstrap/ota/"
    if not in_path:
        headers["Enrolment-Key"] = key
    body = {"mac_address": mac, "uuid": headers["Client-Id"], "flash_size": 16777216,
            "application": {"name": "xiaozhi", "version": version},
            "board": {"type": "bread-compact-wifi"}, "chip_model_name": "esp32s3"}
    return client.post(url, json=body, headers=headers)


def poll(client: Any, key: str, challenge: str, hmac: str | None = None) -> Any:
    body: dict[str, Any] = {"challenge": challenge}
    if hmac is not None:
        body.update(algorithm="hmac-sha256", hmac=hmac)
    return client.post("/bootstrap/ota/activate", json=body, headers={"Enrolment-Key": key})


def claim(client: Any, headers: dict[str, str], code: str) -> Any:
    return client.post("/api/v1/activation-codes/claim", json={"code": code}, headers=headers)


def test_full_bootstrap_flow(client: Any, vendor: Any) -> None:
    first = ota(client, vendor.enrolment_key, "A4:CF:12:00:00:01")
    assert first.status_code == 200, first.json
    body = first.json
    assert set(body) == {"server_time", "firmware", "activation"}
    assert body["server_time"]["timezone_offset"] == 60  # Europe/Berlin in winter
    assert abs(body["server_time"]["timestamp"] / 1000 - utcnow().timestamp()) < 60
    assert body["firmware"] == {"version": "1.4.0", "url": ""}
    code = body["activation"]["code"]
    assert len(code) == 6 and code.isdigit()
    assert body["activation"]["challenge"] and body["activation"]["timeout_ms"] > 0
    assert code in body["activation"]["message"]

    again = ota(client, vendor.enrolment_key, "a4cf12000001")  # a reboot: the same code
    assert again.json["activation"]["code"] == code

    pending = poll(client, vendor.enrolment_key, body["activation"]["challenge"])
    assert pending.status_code == 202
    assert pending.json["status"] == "pending"

    claimed = claim(client, vendor.headers, code)
    assert claimed.status_code == 200, claimed.json
    assert claimed.json["status"] == "active"

    done = poll(client, vendor.enrolment_key, body["activation"]["challenge"])
    assert done.status_code == 200
    mqtt = done.json["mqtt"]
    device = db.session.get(Device, uuid.UUID(claimed.json["id"]))
    assert device is not None and device.status is DeviceStatus.ACTIVE
    assert device.firmware_version == "1.4.0" and device.board == "bread-compact-wifi"
    assert mqtt["username"] == device.mqtt_username
    assert mqtt["publish_topic"] == f"t/{device.mqtt_username}/up"
    assert mqtt["subscribe_topic"] == f"t/{device.mqtt_username}/down"
    assert credentials.verify_password(device.mqtt_password_hash, mqtt["password"])

    replay = poll(client, vendor.enrolment_key, body["activation"]["challenge"])
    assert replay.status_code == 410 and replay.json["error"]["code"] == "challenge_used"

    later = ota(client, vendor.enrolment_key, "A4:CF:12:00:00:01", version="1.5.0")
    assert "activation" not in later.json
    assert later.json["mqtt"]["username"] == device.mqtt_username
    assert "password" not in later.json["mqtt"]
    db.session.refresh(device)
    assert device.firmware_version == "1.5.0"
    kinds = [e.kind for e in db.session.execute(select(DeviceEvent).where(
        DeviceEvent.device_id == device.id).order_by(DeviceEvent.id)).scalars()]
    assert kinds[:2] == ["created", "activation_code_issued"]
    assert "activated" in kinds and "credentials_issued" in kinds


def test_enrolment_key_in_the_path_for_firmware_that_only_takes_a_url(client: Any,
                                                                       vendor: Any) -> None:
    answer = ota(client, vendor.enrolment_key, "A4:CF:12:00:00:02", in_path=True)
    assert answer.status_code == 200 and "activation" in answer.json
    url = f"/bootstrap/{vendor.enrolment_key}/ota/activate"
    polled = client.post(url, json={"challenge": answer.json["activation"]["challenge"]})
    assert polled.status_code == 202


def test_missing_or_wrong_enrolment_key_and_device_id(client: Any, vendor: Any) -> None:
    none = client.post("/bootstrap/ota/", json={}, headers={"Device-Id": "a4:cf:12:00:00:03"})
    assert none.status_code == 401 and none.json["error"]["code"] == "enrolment_key_required"
    wrong = ota(client, "enr_not-a-key", "a4:cf:12:00:00:03")
    assert wrong.status_code == 401 and wrong.json["error"]["code"] == "invalid_enrolment_key"
    no_mac = client.post("/bootstrap/ota/", json={},
                         headers={"Enrolment-Key": vendor.enrolment_key})
    assert no_mac.status_code == 400 and no_mac.json["error"]["code"] == "device_id_required"
    bad_mac = ota(client, vendor.enrolment_key, "not-a-mac")
    assert bad_mac.status_code == 400
    not_json = client.post("/bootstrap/ota/", data="{nope", content_type="application/json",
                           headers={"Enrolment-Key": vendor.enrolment_key,
                                    "Device-Id": "a4:cf:12:00:00:03"})
    assert not_json.status_code == 400
    assert db.session.execute(select(Device)).first() is None


def test_codes_are_scoped_expire_and_are_single_use(client: Any, vendor: Any,
                                                    other_vendor: Any) -> None:
    answer = ota(client, vendor.enrolment_key, "a4:cf:12:00:00:04")
    code = answer.json["activation"]["code"]
    foreign = claim(client, other_vendor.headers, code)
    assert foreign.status_code == 404
    assert foreign.json["error"]["code"] == "activation_code_invalid"

    challenge = db.session.execute(select(ActivationChallenge)).scalar_one()
    challenge.expires_at = utcnow() - dt.timedelta(seconds=1)
    db.session.commit()
    expired = claim(client, vendor.headers, code)
    assert expired.status_code == 410 and expired.json["error"]["code"] == "activation_code_expired"
    polled = poll(client, vendor.enrolment_key, challenge.challenge)
    assert polled.status_code == 410

    fresh = ota(client, vendor.enrolment_key, "a4:cf:12:00:00:04")
    new_code = fresh.json["activation"]["code"]
    assert fresh.json["activation"]["challenge"] != challenge.challenge
    assert claim(client, vendor.headers, new_code).status_code == 200
    used = claim(client, vendor.headers, new_code)
    assert used.status_code == 409 and used.json["error"]["code"] == "activation_code_used"


def test_code_guessing_is_rate_limited(client: Any, vendor: Any) -> None:
    ota(client, vendor.enrolment_key, "a4:cf:12:00:00:05")
    real = db.session.execute(select(ActivationChallenge.code)).scalar_one()
    wrong = f"{(int(real) + 1) % 1_000_000:06d}"
    for _ in range(activation.CLAIM_FAILURE_LIMIT):
        assert claim(client, vendor.headers, wrong).status_code == 404
    blocked = claim(client, vendor.headers, real)
    assert blocked.status_code == 429
    assert blocked.json["error"]["code"] == "rate_limited"
    assert int(blocked.headers["Retry-After"]) > 0


def test_hardware_bound_activation_checks_the_hmac(client: Any, app: Any) -> None:
    bound = make_vendor(requires_hardware_binding=True)
    services.create_device(bound.product, "SN-HW-1", mac="a4:cf:12:00:00:06",
                           hardware_key=HARDWARE_KEY)
    db.session.commit()
    answer = ota(client, bound.enrolment_key, "a4:cf:12:00:00:06", serial="SN-HW-1")
    challenge = answer.json["activation"]["challenge"]
    assert claim(client, bound.headers, answer.json["activation"]["code"]).status_code == 200

    missing = poll(client, bound.enrolment_key, challenge)
    assert missing.status_code == 401 and missing.json["error"]["code"] == "invalid_hmac"
    wrong = poll(client, bound.enrolment_key, challenge, credentials.hardware_hmac("00" * 32,
                                                                                   challenge))
    assert wrong.status_code == 401
    right = poll(client, bound.enrolment_key, challenge,
                 credentials.hardware_hmac(HARDWARE_KEY, challenge))
    assert right.status_code == 200 and right.json["mqtt"]["password"]


@pytest.fixture
def refusing_hook() -> Iterator[list[Device]]:
    seen: list[Device] = []

    def refuse(device: Device, history: list[DeviceEvent]) -> None:
        seen.append(device)
        raise hooks.ActivationRefused("No free licence seat.", code="license_required")

    hooks.register_activation_hook(refuse)
    yield seen
    hooks.unregister_activation_hook(refuse)


def test_a_refusing_activation_hook_passes_its_error_on(client: Any, vendor: Any,
                                                        refusing_hook: list[Device]) -> None:
    answer = ota(client, vendor.enrolment_key, "a4:cf:12:00:00:07")
    refused = claim(client, vendor.headers, answer.json["activation"]["code"])
    assert refused.status_code == 409
    assert refused.json["error"]["code"] == "license_required"
    device = db.session.execute(select(Device)).scalar_one()
    db.session.refresh(device)
    assert device.status is DeviceStatus.PROVISIONED
    direct = client.post(f"/api/v1/devices/{device.id}/activate", headers=vendor.headers)
    assert direct.status_code == 409 and direct.json["error"]["code"] == "license_required"
    assert len(refusing_hook) == 2


def test_reset_and_reactivation_give_the_hook_the_history(client: Any, vendor: Any) -> None:
    histories: list[list[str]] = []
    resets: list[uuid.UUID] = []

    def remember(device: Device, history: list[DeviceEvent]) -> None:
        histories.append([e.kind for e in history])

    hooks.register_activation_hook(remember)
    hooks.register_reset_hook(lambda device: resets.append(device.id))
    try:
        device = services.create_device(vendor.product, "SN-RESET", end_user_ref="owner-1")
        services.activate(device)
        services.issue_credentials(device)
        db.session.commit()
        answer = client.post(f"/api/v1/devices/{device.id}/reset", headers=vendor.headers)
        assert answer.status_code == 200
        assert answer.json["status"] == "provisioned"
        assert answer.json["end_user_ref"] is None and answer.json["has_credentials"] is False
        assert resets == [device.id]
        again = client.post(f"/api/v1/devices/{device.id}/activate", headers=vendor.headers)
        assert again.status_code == 200
        assert "activated" not in histories[0] and "activated" in histories[1]
        assert "reset" in histories[1]

        moved = client.post(f"/api/v1/devices/{device.id}/transfer",
                            json={"end_user_ref": "owner-2"}, headers=vendor.headers)
        assert moved.status_code == 200 and moved.json["end_user_ref"] == "owner-2"
        assert moved.json["status"] == "active" and resets == [device.id, device.id]
    finally:
        hooks.unregister_activation_hook(remember)
        hooks._reset_hooks.clear()


def test_suspended_retired_and_unknown_devices_are_refused(client: Any, app: Any) -> None:
    closed = make_vendor(allow_self_registration=False)
    unknown = ota(client, closed.enrolment_key, "a4:cf:12:00:00:08")
    assert unknown.status_code == 404 and unknown.json["error"]["code"] == "device_unknown"
    device = services.create_device(closed.product, "SN-SUSP", mac="a4:cf:12:00:00:08")
    services.change_status(device, "suspend")
    db.session.commit()
    suspended = ota(client, closed.enrolment_key, "a4:cf:12:00:00:08")
    assert suspended.status_code == 403
    assert suspended.json["error"]["code"] == "device_suspended"
