"""Claiming a device's activation code in the portal: success, every refusal as a form error
(answered 200), guessing, a refusing activation hook; roles and tenancy."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import select, update

from accounts.models import Role
from core.db import db, utcnow
from fleet import activation, credentials
from fleet.models import ActivationChallenge, Device, DeviceStatus
from tests.fleet.fixtures import Vendor
from tests.portal.fleet_helpers import event_kinds, fresh, log_in_as, make_device
from tests.portal.helpers import post, text


def bootstrap(client: Any, vendor: Vendor, mac: str | None = None) -> dict[str, Any]:
    """The device's side: it checks in and shows a code."""
    mac = mac or ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:6])
    answer = client.post("/bootstrap/ota/", json={"application": {"version": "1.4.0"}},
                         headers={"Enrolment-Key": vendor.enrolment_key, "Device-Id": mac})
    assert answer.status_code == 200, answer.json
    return dict(answer.json["activation"], mac=mac)


def poll(client: Any, vendor: Vendor, challenge: str) -> Any:
    return client.post("/bootstrap/ota/activate", json={"challenge": challenge},
                       headers={"Enrolment-Key": vendor.enrolment_key})


def claim(client: Any, code: str, end_user_ref: str = "") -> Any:
    return post(client, "/fleet/claim", {"code": code, "end_user_ref": end_user_ref})


def device_with_mac(mac: str) -> Device:
    db.session.expire_all()
    return db.session.execute(select(Device).where(Device.mac == mac)).scalar_one()


def test_claiming_a_code_activates_the_device(client: Any, vendor: Vendor) -> None:
    shown = bootstrap(client, vendor)
    assert poll(client, vendor, shown["challenge"]).status_code == 202
    log_in_as(client, vendor)
    form = text(client.get("/fleet/claim"))
    assert 'data-testid="claim-form"' in form
    response = claim(client, f"{shown['code'][:3]} {shown['code'][3:]}", "user-42")
    assert response.status_code == 200
    page = text(response)
    device = device_with_mac(shown["mac"])
    assert f'data-testid="claim-result" data-serial="{device.serial}"' in page
    assert device.status is DeviceStatus.ACTIVE and device.end_user_ref == "user-42"
    assert "activation_code_claimed" in event_kinds(device)
    # The device's next poll carries its credentials, once.
    done = poll(client, vendor, shown["challenge"])
    assert done.status_code == 200
    assert credentials.verify_password(fresh(device).mqtt_password_hash,
                                       done.json["mqtt"]["password"])


def test_refused_codes_are_form_errors(client: Any, vendor: Vendor,
                                       other_vendor: Vendor) -> None:
    used = bootstrap(client, vendor)
    expired = bootstrap(client, vendor)
    theirs = bootstrap(client, other_vendor)
    db.session.execute(update(ActivationChallenge)
                       .where(ActivationChallenge.code == expired["code"],
                              ActivationChallenge.tenant_id == vendor.setup.tenant.id)
                       .values(expires_at=utcnow() - dt.timedelta(minutes=1)))
    db.session.commit()
    log_in_as(client, vendor)
    assert claim(client, used["code"]).status_code == 200
    cases = [
        (used["code"], "This code was already claimed."),
        (expired["code"], "This code has expired. Restart the device to get a new one."),
        (theirs["code"], "No device shows this code."),
    ]
    for code, message in cases:
        response = claim(client, code)
        assert response.status_code == 200, code
        page = text(response)
        assert message in page and 'data-testid="claim-result"' not in page, code
    assert device_with_mac(theirs["mac"]).status is DeviceStatus.PROVISIONED
    assert device_with_mac(expired["mac"]).status is DeviceStatus.PROVISIONED


def test_malformed_codes_are_refused_before_the_lookup(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    for code in ("12345", "12a456", "1234567", ""):
        response = claim(client, code)
        assert response.status_code == 422, code
        assert "is-invalid" in text(response)


def test_guessing_is_stopped(client: Any, vendor: Vendor) -> None:
    shown = bootstrap(client, vendor)
    log_in_as(client, vendor)
    wrong = next(f"{n:06d}" for n in range(1000) if f"{n:06d}" != shown["code"])
    for _ in range(activation.CLAIM_FAILURE_LIMIT):
        assert "No device shows this code." in text(claim(client, wrong))
    limited = claim(client, shown["code"])
    assert limited.status_code == 200
    assert "Too many wrong codes. Try again in 15 minutes." in text(limited)
    assert device_with_mac(shown["mac"]).status is DeviceStatus.PROVISIONED


def test_a_suspended_device_cannot_be_claimed(client: Any, vendor: Vendor) -> None:
    shown = bootstrap(client, vendor)
    device = device_with_mac(shown["mac"])
    log_in_as(client, vendor)
    post(client, f"/fleet/devices/{device.id}/suspend", page=f"/fleet/devices/{device.id}")
    response = claim(client, shown["code"])
    assert response.status_code == 200 and "The device is suspended." in text(response)
    assert fresh(device).status is DeviceStatus.SUSPENDED


def test_a_refusing_activation_hook_leaves_nothing_behind(client: Any, vendor: Vendor,
                                                          refusing_hook: list[Device]) -> None:
    shown = bootstrap(client, vendor)
    log_in_as(client, vendor)
    response = claim(client, shown["code"], "user-1")
    assert response.status_code == 200
    assert "No free licence seat." in text(response)
    device = device_with_mac(shown["mac"])
    assert device.status is DeviceStatus.PROVISIONED and device.end_user_ref is None
    # What the hook wrote before refusing is gone with the claim; the code still works.
    assert "seat_checked" not in event_kinds(device) and len(refusing_hook) == 1
    challenge = db.session.execute(select(ActivationChallenge).where(
        ActivationChallenge.device_id == device.id)).scalar_one()
    assert challenge.claimed_at is None


def test_only_fleet_writers_may_claim(client: Any, vendor: Vendor) -> None:
    shown = bootstrap(client, vendor)
    log_in_as(client, vendor, Role.VIEWER)
    assert client.get("/fleet/claim").status_code == 403
    assert "claim-form" not in text(client.get("/fleet/devices"))
    assert post(client, "/fleet/claim", {"code": shown["code"]},
                page="/fleet/devices").status_code == 403
    assert device_with_mac(shown["mac"]).status is DeviceStatus.PROVISIONED


def test_a_claimed_device_of_this_tenant_shows_up_in_its_list(client: Any,
                                                              vendor: Vendor) -> None:
    make_device(vendor.product, "FACTORY-1")
    shown = bootstrap(client, vendor)
    log_in_as(client, vendor)
    claim(client, shown["code"])
    page = text(client.get("/fleet/devices?status=active"))
    assert f'data-serial="{device_with_mac(shown["mac"]).serial}"' in page
    assert 'data-serial="FACTORY-1"' not in page
