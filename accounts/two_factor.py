"""TOTP two-factor authentication (RFC 6238) with pyotp; seeds are stored encrypted.

A code is accepted once: the last accepted time step is remembered so a code seen over a
shoulder cannot be replayed within its 30 s window.
"""

from __future__ import annotations

import time

import pyotp

from accounts import audit
from accounts.models import Membership, User
from accounts.permissions import TWO_FACTOR_ROLES
from core.crypto import decrypt, encrypt
from core.db import db
from core.errors import Conflict, Unauthorized

ISSUER = "Ensoul"


def begin_enrolment(user: User) -> tuple[str, str]:
    """A fresh secret (stored, not yet enabled) and its ``otpauth://`` URI for the QR code."""
    if user.totp_enabled:
        raise Conflict("Two-factor authentication is already enabled.", code="two_factor_enabled")
    secret = pyotp.random_base32()
    user.totp_secret_encrypted = encrypt(secret)
    db.session.flush()
    return secret, pyotp.TOTP(secret).provisioning_uri(name=user.email, issuer_name=ISSUER)


def pending_secret(user: User) -> str | None:
    if user.totp_secret_encrypted is None:
        return None
    return decrypt(user.totp_secret_encrypted)


def _accept(user: User, code: str) -> bool:
    secret = pending_secret(user)
    if secret is None:
        return False
    code = "".join(code.split())
    if not (code.isdigit() and len(code) == 6):
        return False
    totp = pyotp.TOTP(secret)
    now = int(time.time())
    for drift in (0, -1, 1):
        step = now // totp.interval + drift
        if totp.at(step * totp.interval) == code:
            if user.totp_last_step is not None and step <= user.totp_last_step:
                return False
            user.totp_last_step = step
            db.session.flush()
            return True
    return False


def confirm_enrolment(user: User, code: str) -> None:
    if not _accept(user, code):
        raise Unauthorized("That code is not right.", code="invalid_totp")
    user.totp_enabled = True
    db.session.flush()
    audit.record("user.two_factor_enable", tenant_id=None, target=user)


def verify(user: User, code: str) -> None:
    """The second login step; wrong codes count towards the account lockout."""
    from accounts import services

    services.ensure_not_locked(user)
    if not user.totp_enabled or not _accept(user, code):
        services.register_failed_login(user)
        raise Unauthorized("That code is not right.", code="invalid_totp")
    user.failed_logins = 0
    db.session.flush()


def disable(user: User) -> None:
    user.totp_enabled = False
    user.totp_secret_encrypted = None
    user.totp_last_step = None
    db.session.flush()
    audit.record("user.two_factor_disable", tenant_id=None, target=user)


def required_for(member: Membership) -> bool:
    return member.tenant.require_two_factor and member.role in TWO_FACTOR_ROLES
