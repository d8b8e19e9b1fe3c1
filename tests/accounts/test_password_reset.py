"""Password reset by e-mail: the link from the mail works once, expires, ends old sessions."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from sqlalchemy import select

from accounts import auth, services
from accounts.models import AuditEntry, PasswordReset, User
from core.db import db
from core.errors import Gone, Unauthorized, ValidationFailed
from tests.factories import PASSWORD, UserFactory

NEW_PASSWORD = "a brand new passphrase"


def request_reset(app: Any, mailbox: Any, user: User) -> str:
    services.request_password_reset(user.email)
    db.session.commit()  # the mail goes out when the request's transaction commits
    body = mailbox.body(mailbox.wait_for(user.email))
    match = re.search(re.escape(app.config["ENSOUL_BASE_URL"]) + r"/password/reset/(\S+)", body)
    assert match, body
    return match.group(1)


def test_reset_link_works_once(app: Any, mailbox: Any) -> None:
    user = UserFactory()
    raw = request_reset(app, mailbox, user)
    reset = db.session.execute(
        select(PasswordReset).where(PasswordReset.user_id == user.id)).scalar_one()
    assert reset.token_hash != raw and raw not in reset.token_hash

    assert services.reset_password(raw, NEW_PASSWORD).id == user.id
    db.session.commit()
    assert services.authenticate(user.email, NEW_PASSWORD).id == user.id
    with pytest.raises(Unauthorized):
        services.authenticate(user.email, PASSWORD)

    with pytest.raises(Gone) as used:
        services.reset_password(raw, "yet another passphrase")
    assert used.value.code == "reset_link_used"
    assert services.authenticate(user.email, NEW_PASSWORD).id == user.id
    actions = db.session.execute(
        select(AuditEntry.action).where(AuditEntry.target_id == str(user.id))).scalars().all()
    assert {"user.password_reset_request", "user.password_reset"} <= set(actions)


def test_expired_link_is_refused(app: Any, mailbox: Any) -> None:
    user = UserFactory()
    raw = request_reset(app, mailbox, user)
    reset = db.session.execute(
        select(PasswordReset).where(PasswordReset.user_id == user.id)).scalar_one()
    minutes = app.config["ENSOUL_PASSWORD_RESET_TTL_MINUTES"]
    assert abs(reset.expires_at - reset.created_at - dt.timedelta(minutes=minutes)) < \
        dt.timedelta(seconds=5)
    reset.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    db.session.commit()
    with pytest.raises(Gone) as expired:
        services.reset_password(raw, NEW_PASSWORD)
    assert expired.value.code == "reset_link_expired"
    assert services.authenticate(user.email, PASSWORD).id == user.id


def test_unknown_link_is_refused(app: Any) -> None:
    with pytest.raises(Gone) as unknown:
        services.reset_password("pwr_made-up", NEW_PASSWORD)
    assert unknown.value.code == "reset_link_invalid"


def test_weak_new_password_leaves_the_link_usable(app: Any, mailbox: Any) -> None:
    user = UserFactory()
    raw = request_reset(app, mailbox, user)
    with pytest.raises(ValidationFailed) as weak:
        services.reset_password(raw, "short")
    assert "password" in weak.value.details
    db.session.rollback()
    services.reset_password(raw, NEW_PASSWORD)


def test_reset_ends_existing_sessions(app: Any, mailbox: Any) -> None:
    user = UserFactory()
    old_session_id = auth.SessionUser(user).get_id()
    with app.test_request_context("/"):
        assert auth._load_user(old_session_id) is not None
    version = user.session_version

    services.reset_password(request_reset(app, mailbox, user), NEW_PASSWORD)
    db.session.commit()

    assert user.session_version == version + 1
    new_session_id = auth.SessionUser(user).get_id()
    assert new_session_id != old_session_id
    with app.test_request_context("/"):
        assert auth._load_user(old_session_id) is None
        loaded = auth._load_user(new_session_id)
        assert loaded is not None and loaded.user.id == user.id


def test_reset_clears_a_lockout(app: Any, mailbox: Any) -> None:
    user = UserFactory()
    for _ in range(app.config["ENSOUL_LOGIN_LOCKOUT_ATTEMPTS"]):
        with pytest.raises(Unauthorized):
            services.authenticate(user.email, "wrong password!")
    assert user.locked_until is not None
    services.reset_password(request_reset(app, mailbox, user), NEW_PASSWORD)
    assert services.authenticate(user.email, NEW_PASSWORD).id == user.id


def test_unknown_address_gets_no_mail_and_no_error(app: Any, mailbox: Any) -> None:
    before = db.session.execute(select(PasswordReset)).scalars().all()
    services.request_password_reset("nobody@example.com")
    db.session.commit()
    assert db.session.execute(select(PasswordReset)).scalars().all() == before
    # Mail is sent synchronously at commit, in order: once a later mail is here, none went to
    # the unknown address.
    user = UserFactory()
    request_reset(app, mailbox, user)
    assert "nobody@example.com" not in [m["To"] for m in mailbox.messages]
