"""Logins: wrong passwords are counted, too many lock the account, a success resets the count."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select

from accounts import services
from accounts.models import AuditEntry
from accounts.services import AccountLocked
from core.db import db
from core.errors import Unauthorized
from tests.factories import PASSWORD, UserFactory

WRONG = "not the password"


def fail_login(email: str, password: str = WRONG) -> Unauthorized:
    with pytest.raises(Unauthorized) as failed:
        services.authenticate(email, password)
    assert failed.value.code == "invalid_credentials"
    assert failed.value.http_status == 401
    return failed.value


def test_right_password_logs_in(app: Any) -> None:
    user = UserFactory()
    assert user.last_login_at is None
    assert services.authenticate(user.email, PASSWORD).id == user.id
    assert user.last_login_at is not None


def test_email_is_matched_case_insensitively(app: Any) -> None:
    user = UserFactory()
    assert services.authenticate(user.email.upper(), PASSWORD).id == user.id


def test_wrong_password_and_unknown_user_look_the_same(app: Any) -> None:
    user = UserFactory()
    wrong = fail_login(user.email)
    unknown = fail_login("nobody@example.com", PASSWORD)
    assert (wrong.code, wrong.message) == (unknown.code, unknown.message)
    assert user.failed_logins == 1


def test_lockout_after_too_many_failures(app: Any) -> None:
    user = UserFactory()
    attempts = app.config["ENSOUL_LOGIN_LOCKOUT_ATTEMPTS"]
    for _ in range(attempts - 1):
        fail_login(user.email)
    assert user.locked_until is None
    fail_login(user.email)
    assert user.locked_until is not None

    with pytest.raises(AccountLocked) as locked:
        services.authenticate(user.email, PASSWORD)  # even the right password
    assert locked.value.code == "account_locked"
    assert locked.value.http_status == 429
    minutes = app.config["ENSOUL_LOGIN_LOCKOUT_MINUTES"]
    assert locked.value.retry_after is not None
    assert minutes * 60 - 10 <= locked.value.retry_after <= minutes * 60 + 1
    entries = db.session.execute(
        select(AuditEntry).where(AuditEntry.action == "user.lockout",
                                 AuditEntry.target_id == str(user.id))).scalars().all()
    assert len(entries) == 1 and entries[0].actor_label == user.email


def test_lock_ends_after_its_time(app: Any) -> None:
    user = UserFactory()
    for _ in range(app.config["ENSOUL_LOGIN_LOCKOUT_ATTEMPTS"]):
        fail_login(user.email)
    user.locked_until = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    db.session.flush()
    assert services.authenticate(user.email, PASSWORD).id == user.id
    assert user.locked_until is None


def test_success_resets_the_failure_count(app: Any) -> None:
    user = UserFactory()
    attempts = app.config["ENSOUL_LOGIN_LOCKOUT_ATTEMPTS"]
    for _ in range(attempts - 1):
        fail_login(user.email)
    assert user.failed_logins == attempts - 1
    services.authenticate(user.email, PASSWORD)
    assert user.failed_logins == 0
    # The count starts again: attempts - 1 more failures do not lock.
    for _ in range(attempts - 1):
        fail_login(user.email)
    assert services.authenticate(user.email, PASSWORD).id == user.id


def test_stored_password_is_an_argon2id_hash(app: Any) -> None:
    user = UserFactory()
    assert user.password_hash.startswith("$argon2id$")
    assert PASSWORD not in user.password_hash
