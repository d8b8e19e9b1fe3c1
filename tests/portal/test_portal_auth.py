"""Portal login, the TOTP second step, logout and where a login may redirect to."""

from __future__ import annotations

from typing import Any

import pytest

from accounts import two_factor
from accounts.models import User
from core.db import db
from tests.factories import PASSWORD, tenant_with_owner
from tests.portal.helpers import csrf, login, post, text, totp_code


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def test_anonymous_pages_redirect_to_login_with_next(client: Any) -> None:
    response = client.get("/team?x=1")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/team?x%3D1"


def test_login_page_has_csrf_and_stable_test_ids(client: Any) -> None:
    page = text(client.get("/login"))
    for testid in ("login-form", "login-email", "login-password", "login-submit",
                   "language-switcher"):
        assert f'data-testid="{testid}"' in page
    assert 'name="csrf_token"' in page


def test_login_without_csrf_is_refused(client: Any, setup: Any) -> None:
    response = client.post("/login", data={"email": setup.owner.email, "password": PASSWORD})
    assert response.status_code == 400
    assert "csrf_failed" in text(response)


def test_login_and_logout(client: Any, setup: Any) -> None:
    response = login(client, setup.owner.email)
    assert response.status_code == 302 and response.headers["Location"] == "/"
    dashboard = client.get("/")
    assert dashboard.status_code == 200
    assert setup.tenant.name in text(dashboard)

    assert client.get("/logout").status_code == 405
    assert client.post("/logout").status_code == 400  # no CSRF token
    response = post(client, "/logout", page="/")
    assert response.status_code == 302 and response.headers["Location"] == "/login"
    assert client.get("/").status_code == 302


def test_wrong_password_is_a_form_error_and_counts(client: Any, setup: Any) -> None:
    response = login(client, setup.owner.email, "not the password")
    assert response.status_code == 200
    assert "Wrong e-mail or password." in text(response)
    db.session.expire_all()
    assert db.session.get(User, setup.owner.id).failed_logins == 1


def test_unknown_email_gives_the_same_answer(client: Any) -> None:
    response = login(client, "nobody@example.com", "whatever-it-is")
    assert response.status_code == 200
    assert "Wrong e-mail or password." in text(response)


def test_lockout_is_shown_on_the_form(app: Any, client: Any, setup: Any) -> None:
    for _ in range(app.config["ENSOUL_LOGIN_LOCKOUT_ATTEMPTS"]):
        login(client, setup.owner.email, "not the password")
    response = login(client, setup.owner.email)  # even the right password is refused now
    assert response.status_code == 200
    assert "Too many failed logins" in text(response)
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x",
                                    "/\\evil.example", "javascript:alert(1)"])
def test_next_only_redirects_to_local_paths(client: Any, setup: Any, target: str) -> None:
    response = login(client, setup.owner.email, next=target)
    assert response.headers["Location"] == "/"


def test_next_local_path_is_followed(client: Any, setup: Any) -> None:
    response = login(client, setup.owner.email, next="/tokens")
    assert response.headers["Location"] == "/tokens"


def test_login_rate_limit_per_ip(app: Any, client: Any, setup: Any,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.config, "ENSOUL_LOGIN_RATE_LIMIT", "2/minute")
    token = csrf(client)
    for _ in range(2):
        client.post("/login", data={"csrf_token": token, "email": "x@example.com",
                                    "password": "nope-nope-nope"})
    response = client.post("/login", data={"csrf_token": token, "email": "x@example.com",
                                           "password": "nope-nope-nope"})
    assert response.status_code == 429
    assert response.headers["Retry-After"]
    assert client.get("/login").status_code == 200  # only the POST is limited


def _enable_two_factor(user: User) -> None:
    two_factor.begin_enrolment(user)
    two_factor.confirm_enrolment(user, totp_code(user))
    db.session.commit()


def test_two_factor_login(client: Any, setup: Any) -> None:
    _enable_two_factor(setup.owner)
    response = login(client, setup.owner.email, next="/tokens")
    assert response.headers["Location"] == "/login/2fa"
    # Between the steps the session is not logged in.
    assert client.get("/").status_code == 302

    wrong = post(client, "/login/2fa", {"code": "000000"})
    assert wrong.status_code == 200 and "That code is not right." in text(wrong)

    response = post(client, "/login/2fa", {"code": totp_code(setup.owner, step_offset=1)})
    assert response.status_code == 302 and response.headers["Location"] == "/tokens"
    assert client.get("/").status_code == 200
    # The pending marker is gone and the second step cannot be replayed.
    assert client.get("/login/2fa").headers["Location"] == "/login"


def test_two_factor_step_without_password_step_goes_back_to_login(client: Any) -> None:
    assert client.get("/login/2fa").headers["Location"] == "/login"


def test_logged_in_user_visiting_login_goes_to_dashboard(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    assert client.get("/login").headers["Location"] == "/"
