"""TOTP two-factor authentication: enrol, confirm, verify; wrong and replayed codes refused."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from accounts import two_factor
from accounts.models import Membership, Role, Tenant
from core.crypto import decrypt
from core.errors import Conflict, Unauthorized
from tests.factories import UserFactory


def code_at(secret: str, steps_from_now: int = 0) -> str:
    return pyotp.TOTP(secret).at(int(time.time()) + 30 * steps_from_now)


def refused(user: Any, code: str) -> None:
    with pytest.raises(Unauthorized) as wrong:
        two_factor.verify(user, code)
    assert wrong.value.code == "invalid_totp"


@pytest.fixture
def enrolled(app: Any) -> tuple[Any, str]:
    user = UserFactory()
    secret, _ = two_factor.begin_enrolment(user)
    two_factor.confirm_enrolment(user, code_at(secret))
    return user, secret


def test_enrolment_stores_the_secret_encrypted(app: Any) -> None:
    user = UserFactory()
    secret, uri = two_factor.begin_enrolment(user)
    assert not user.totp_enabled
    assert user.totp_secret_encrypted and secret not in user.totp_secret_encrypted
    assert decrypt(user.totp_secret_encrypted) == secret
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    assert user.email in unquote(parts.path)
    assert parse_qs(parts.query)["secret"] == [secret]
    assert parse_qs(parts.query)["issuer"] == ["Ensoul"]


def test_confirm_enables_and_verify_accepts_a_fresh_code(enrolled: tuple[Any, str]) -> None:
    user, secret = enrolled
    assert user.totp_enabled
    two_factor.verify(user, code_at(secret, +1))  # the next step, within the allowed drift


def test_wrong_code_at_confirmation_leaves_it_disabled(app: Any) -> None:
    user = UserFactory()
    secret, _ = two_factor.begin_enrolment(user)
    good = code_at(secret)
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    with pytest.raises(Unauthorized) as failed:
        two_factor.confirm_enrolment(user, wrong)
    assert failed.value.code == "invalid_totp"
    assert not user.totp_enabled


@pytest.mark.parametrize("code", ["000000x", "12345", "1234567", "", "abcdef"])
def test_malformed_codes_are_refused(enrolled: tuple[Any, str], code: str) -> None:
    user, _ = enrolled
    refused(user, code)


def test_wrong_code_is_refused(enrolled: tuple[Any, str]) -> None:
    user, secret = enrolled
    valid = {code_at(secret, d) for d in (-1, 0, 1)}
    wrong = next(f"{n:06d}" for n in range(1_000_000) if f"{n:06d}" not in valid)
    refused(user, wrong)


def test_a_code_from_far_away_in_time_is_refused(enrolled: tuple[Any, str]) -> None:
    user, secret = enrolled
    refused(user, code_at(secret, +10))
    refused(user, code_at(secret, -10))


def test_replayed_code_is_refused(enrolled: tuple[Any, str]) -> None:
    user, secret = enrolled
    code = code_at(secret, +1)
    two_factor.verify(user, code)
    refused(user, code)
    # An older code than the last accepted one is refused as well.
    refused(user, code_at(secret, 0))


def test_confirmation_code_cannot_be_replayed_at_login(app: Any) -> None:
    user = UserFactory()
    secret, _ = two_factor.begin_enrolment(user)
    code = code_at(secret)
    two_factor.confirm_enrolment(user, code)
    refused(user, code)


def test_spaces_in_a_code_are_ignored(enrolled: tuple[Any, str]) -> None:
    user, secret = enrolled
    code = code_at(secret, +1)
    two_factor.verify(user, f" {code[:3]} {code[3:]} ")


def test_verify_without_enrolment_is_refused(app: Any) -> None:
    user = UserFactory()
    refused(user, "123456")
    secret, _ = two_factor.begin_enrolment(user)  # pending, not confirmed
    refused(user, code_at(secret))


def test_enrolling_twice_is_a_conflict(enrolled: tuple[Any, str]) -> None:
    user, _ = enrolled
    with pytest.raises(Conflict) as twice:
        two_factor.begin_enrolment(user)
    assert twice.value.code == "two_factor_enabled"


def test_disable_forgets_the_secret(enrolled: tuple[Any, str]) -> None:
    user, secret = enrolled
    two_factor.disable(user)
    assert not user.totp_enabled and user.totp_secret_encrypted is None
    refused(user, code_at(secret, +1))


@pytest.mark.parametrize(
    ("require", "role", "required"),
    [(True, Role.OWNER, True), (True, Role.FINANCE, True), (True, Role.DEVELOPER, False),
     (True, Role.OPERATIONS, False), (True, Role.VIEWER, False), (False, Role.OWNER, False),
     (False, Role.FINANCE, False)],
)
def test_required_for_owner_and_finance_once_the_tenant_asks(
    require: bool, role: Role, required: bool
) -> None:
    member = Membership(role=role, tenant=Tenant(require_two_factor=require))
    assert two_factor.required_for(member) is required
