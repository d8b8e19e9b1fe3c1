"""Forgotten passwords: the same answer for every address, a link that works once."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select

from accounts import services
from accounts.models import PasswordReset
from core.crypto import sha256_hex
from core.db import db
from tests.factories import UserFactory
from tests.portal.helpers import CSRF_RE, login, post, text

NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
def user(app: Any) -> Any:
    return UserFactory()


def reset_token(app: Any, mailbox: Any, to: str) -> str:
    body = mailbox.body(mailbox.wait_for(to))
    match = re.search(re.escape(app.config["ENSOUL_BASE_URL"]) + r"/password/reset/(\S+)", body)
    assert match, body
    return match.group(1)


def test_same_answer_for_known_and_unknown_addresses(client: Any, user: Any,
                                                     mailbox: Any) -> None:
    answers = []
    for email in (user.email, "nobody@example.com"):
        response = post(client, "/password/forgot", {"email": email})
        assert response.status_code == 302 and response.headers["Location"] == "/login"
        answers.append(text(client.get("/login")))
    assert "If the address belongs to an account" in answers[0]
    # CSRF tokens carry a timestamp, so two pages rendered a second apart differ there only.
    same = [CSRF_RE.sub("csrf", page) for page in answers]
    assert same[0].replace(user.email, "") == same[1].replace("nobody@example.com", "")
    mailbox.wait_for(user.email)
    assert all(m["To"] != "nobody@example.com" for m in mailbox.messages)


def test_reset_once_then_the_link_is_gone(app: Any, client: Any, user: Any,
                                          mailbox: Any) -> None:
    post(client, "/password/forgot", {"email": user.email})
    raw = reset_token(app, mailbox, user.email)

    page = client.get(f"/password/reset/{raw}")
    assert page.status_code == 200
    mismatch = post(client, f"/password/reset/{raw}",
                    {"password": NEW_PASSWORD, "confirm": "something else entirely"})
    assert mismatch.status_code == 422 and "The passwords do not match." in text(mismatch)

    done = post(client, f"/password/reset/{raw}", {"password": NEW_PASSWORD,
                                                   "confirm": NEW_PASSWORD})
    assert done.status_code == 302 and done.headers["Location"] == "/login"
    assert login(client, user.email, NEW_PASSWORD).headers["Location"] == "/"

    reused = client.get(f"/password/reset/{raw}")
    assert reused.status_code == 410
    assert 'data-testid="error-code">reset_link_used<' in text(reused)


def test_unknown_reset_link_is_gone(client: Any) -> None:
    response = client.get("/password/reset/pwr_nonsense")
    assert response.status_code == 410 and "reset_link_invalid" in text(response)


def test_reset_ends_other_sessions(app: Any, client: Any, user: Any) -> None:
    login(client, user.email)
    assert client.get("/settings").status_code == 200
    services.request_password_reset(user.email)
    reset = db.session.execute(
        select(PasswordReset).where(PasswordReset.user_id == user.id)
    ).scalar_one()
    raw = "pwr_known-for-this-test"
    reset.token_hash = sha256_hex(raw)
    services.reset_password(raw, NEW_PASSWORD)
    assert client.get("/settings").status_code == 302
