"""Activation codes and challenges: how a bootstrapping device is claimed and gets credentials.

1. The device calls the bootstrap endpoint and receives a 6-digit ``code`` (shown or spoken)
   and a ``challenge``.
2. The vendor claims the code (portal or REST API, scoped to the vendor's tenant): the device
   is activated, with the activation hooks, in that transaction.
3. The device polls with the challenge (and, for hardware-bound products, an HMAC of it under
   its hardware key): ``202`` until claimed, then ``200`` once with its MQTT credentials.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
import uuid

from flask import current_app
from sqlalchemy import select

from core.crypto import decrypt
from core.db import db, utcnow
from core.errors import Conflict, Gone, NotFound, RateLimited, Unauthorized
from core.redis import get_redis, name
from core.tenancy import scoped
from fleet import services
from fleet.credentials import hardware_hmac
from fleet.models import ActivationChallenge, Device, DeviceStatus, Product

CODE_DIGITS = 6
CLAIM_FAILURE_LIMIT = 20  # wrong codes per tenant per window, against guessing
CLAIM_FAILURE_WINDOW = 900


def _ttl() -> dt.timedelta:
    return dt.timedelta(hours=current_app.config["ENSOUL_ACTIVATION_CODE_TTL_HOURS"])


def live_challenge(device: Device) -> ActivationChallenge | None:
    return db.session.execute(
        select(ActivationChallenge).where(
            ActivationChallenge.device_id == device.id,
            ActivationChallenge.released_at.is_(None),
            ActivationChallenge.expires_at > utcnow(),
        ).order_by(ActivationChallenge.id.desc()).limit(1)
    ).scalar_one_or_none()


def _new_code(tenant_id: uuid.UUID) -> str:
    for _ in range(20):
        code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
        clash = db.session.execute(scoped(ActivationChallenge, tenant_id).where(
            ActivationChallenge.code == code, ActivationChallenge.released_at.is_(None),
            ActivationChallenge.expires_at > utcnow())).first()
        if not clash:
            return code
    raise Conflict("No free activation code; try again.", code="activation_codes_exhausted")


def challenge_for(device: Device) -> ActivationChallenge:
    """The device's live challenge, or a new one (a reboot shows the same code)."""
    existing = live_challenge(device)
    if existing is not None:
        return existing
    challenge = ActivationChallenge(
        tenant_id=device.tenant_id, device_id=device.id, code=_new_code(device.tenant_id),
        challenge=secrets.token_hex(16), expires_at=utcnow() + _ttl())
    db.session.add(challenge)
    db.session.flush()
    services.record_event(device, "activation_code_issued", actor="device")
    return challenge


def _claim_failures_key(tenant_id: uuid.UUID) -> str:
    return name(f"{{t:{tenant_id}}}", "claim-failures")


def check_claim_rate(tenant_id: uuid.UUID) -> None:
    """Refuse claims while the tenant has sent too many wrong codes (guessing)."""
    client = get_redis()
    key = _claim_failures_key(tenant_id)
    if int(client.get(key) or 0) >= CLAIM_FAILURE_LIMIT:
        raise RateLimited("Too many wrong activation codes; wait before trying again.",
                          retry_after=max(int(client.ttl(key)), 1))


def _count_claim_failure(tenant_id: uuid.UUID) -> None:
    key = _claim_failures_key(tenant_id)
    pipe = get_redis().pipeline()
    pipe.incr(key)
    pipe.expire(key, CLAIM_FAILURE_WINDOW, nx=True)
    pipe.execute()


def claim(tenant_id: uuid.UUID, code: str, *, end_user_ref: str | None = None,
          actor: str | None = None) -> Device:
    """The vendor claims a code shown by a device of this tenant: the device is activated."""
    code = code.strip()
    candidates = list(db.session.execute(
        scoped(ActivationChallenge, tenant_id).where(ActivationChallenge.code == code)
        .order_by(ActivationChallenge.id.desc())).scalars())
    if not candidates:
        _count_claim_failure(tenant_id)
        raise NotFound("No device shows this code.", code="activation_code_invalid")
    challenge = candidates[0]
    if challenge.claimed_at is not None or challenge.released_at is not None:
        raise Conflict("This code was already claimed.", code="activation_code_used")
    if challenge.expires_at <= utcnow():
        raise Gone("This code has expired; restart the device for a new one.",
                   code="activation_code_expired")
    device = db.session.get(Device, challenge.device_id)
    assert device is not None
    if device.status in (DeviceStatus.SUSPENDED, DeviceStatus.RETIRED):
        raise Conflict(f"The device is {device.status.value}.",
                       code=f"device_{device.status.value}")
    if device.status is DeviceStatus.PROVISIONED:
        services.activate(device, actor=actor, via="activation_code")
    if end_user_ref is not None:
        device.end_user_ref = end_user_ref.strip() or None
    challenge.claimed_at = utcnow()
    challenge.claimed_by = actor or services.accounts.current_actor_label()
    services.record_event(device, "activation_code_claimed", actor)
    db.session.flush()
    return device


def poll(product: Product, challenge_value: str,
         hmac_hex: str | None) -> tuple[Device, str] | None:
    """The device's poll: ``None`` until the code is claimed; then the device and its new MQTT
    password, once."""
    challenge = db.session.execute(
        scoped(ActivationChallenge, product.tenant_id)
        .where(ActivationChallenge.challenge == challenge_value)
    ).scalar_one_or_none()
    if challenge is None:
        raise NotFound("Unknown challenge.", code="challenge_unknown")
    device = db.session.get(Device, challenge.device_id)
    assert device is not None
    if device.product_id != product.id:
        raise NotFound("Unknown challenge.", code="challenge_unknown")
    if challenge.released_at is not None:
        raise Gone("This challenge was already used.", code="challenge_used")
    if challenge.expires_at <= utcnow():
        raise Gone("The activation code has expired.", code="activation_code_expired")
    _check_hmac(product, device, challenge.challenge, hmac_hex)
    if challenge.claimed_at is None:
        return None
    if device.status is not DeviceStatus.ACTIVE:
        raise Conflict(f"The device is {device.status.value}.",
                       code=f"device_{device.status.value}")
    password = services.issue_credentials(device)
    challenge.released_at = utcnow()
    db.session.flush()
    return device, password


def _check_hmac(product: Product, device: Device, challenge: str, hmac_hex: str | None) -> None:
    if not product.requires_hardware_binding and not hmac_hex:
        return
    if device.hardware_key_encrypted is None:
        if product.requires_hardware_binding:
            raise Conflict("This device has no hardware key registered.",
                           code="hardware_key_missing")
        return
    expected = hardware_hmac(decrypt(device.hardware_key_encrypted), challenge)
    if not hmac_hex or not hmac.compare_digest(expected, hmac_hex.strip().lower()):
        raise Unauthorized("The HMAC of the challenge is wrong.", code="invalid_hmac")
