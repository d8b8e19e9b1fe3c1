"""Settings: language preference, password change, tenant settings, two-factor enrolment."""

from __future__ import annotations

import re
from typing import Any

import pytest

from accounts.models import Role, User
from core.db import db
from tests.factories import PASSWORD, MembershipFactory, UserFactory, tenant_with_owner
from tests.portal.helpers import login, post, text, totp_code

NEW_PASSWORD = "another long passphrase"


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def test_language_preference_is_saved(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    response = post(client, "/settings/language", {"locale": "zh_Hans"}, page="/settings")
    assert response.status_code == 302
    db.session.refresh(setup.owner)
    assert setup.owner.locale == "zh_Hans"
    post(client, "/settings/language", {"locale": ""}, page="/settings")
    db.session.refresh(setup.owner)
    assert setup.owner.locale is None
    refused = post(client, "/settings/language", {"locale": "fr"}, page="/settings")
    assert refused.status_code == 422


def test_change_password(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    wrong = post(client, "/settings/password", {
        "current": "not my password", "password": NEW_PASSWORD, "confirm": NEW_PASSWORD,
    }, page="/settings")
    assert wrong.status_code == 200 and "That is not your current password." in text(wrong)

    done = post(client, "/settings/password", {
        "current": PASSWORD, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD,
    }, page="/settings")
    assert done.status_code == 302
    # This session continues; the old password no longer works.
    assert client.get("/settings").status_code == 200
    post(client, "/logout", page="/")
    assert login(client, setup.owner.email).status_code == 200
    assert login(client, setup.owner.email, NEW_PASSWORD).status_code == 302


def test_owner_changes_tenant_settings(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    bad = post(client, "/settings/tenant", {"name": "X", "timezone": "Mars/Olympus"},
               page="/settings")
    assert bad.status_code == 422
    response = post(client, "/settings/tenant", {
        "name": "Renamed Vendor", "timezone": "Asia/Shanghai", "require_two_factor": "y",
    }, page="/settings")
    assert response.status_code == 302
    db.session.refresh(setup.tenant)
    assert setup.tenant.name == "Renamed Vendor"
    assert setup.tenant.timezone == "Asia/Shanghai" and setup.tenant.require_two_factor
    # The owner has no second factor yet, so the new requirement applies at once.
    assert client.get("/settings").headers["Location"] == "/settings/two-factor"


def test_developer_sees_but_cannot_change_tenant_settings(client: Any, setup: Any) -> None:
    dev = UserFactory()
    MembershipFactory(tenant=setup.tenant, user=dev, role=Role.DEVELOPER)
    login(client, dev.email)
    page = text(client.get("/settings"))
    assert "Only owners can change these settings." in page
    refused = post(client, "/settings/tenant", {"name": "Mine now", "timezone": "UTC"},
                   page="/settings")
    assert refused.status_code == 403


def test_two_factor_enrol_and_disable(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    page = text(client.get("/settings/two-factor"))
    assert 'data-testid="2fa-begin"' in page

    assert post(client, "/settings/two-factor/begin", page="/settings/two-factor"
                ).status_code == 302
    page = text(client.get("/settings/two-factor"))
    assert "<svg" in page
    secret = re.search(r'data-testid="2fa-secret">([A-Z2-7]+)<', page)
    assert secret
    user = db.session.get(User, setup.owner.id)
    db.session.refresh(user)

    wrong = post(client, "/settings/two-factor/confirm", {"code": "123456"},
                 page="/settings/two-factor")
    assert wrong.status_code == 422 and "That code is not right." in text(wrong)
    done = post(client, "/settings/two-factor/confirm", {"code": totp_code(user)},
                page="/settings/two-factor")
    assert done.status_code == 302
    db.session.refresh(user)
    assert user.totp_enabled

    disabled = post(client, "/settings/two-factor/disable",
                    {"code": totp_code(user, step_offset=1)}, page="/settings/two-factor")
    assert disabled.status_code == 302
    db.session.refresh(user)
    assert not user.totp_enabled


def test_two_factor_requirement_redirects_until_enrolled(client: Any, setup: Any) -> None:
    setup.tenant.require_two_factor = True
    dev = UserFactory()
    MembershipFactory(tenant=setup.tenant, user=dev, role=Role.DEVELOPER)
    db.session.commit()

    login(client, setup.owner.email)
    for path in ("/", "/team", "/tokens", "/settings"):
        response = client.get(path)
        assert response.status_code == 302, path
        assert response.headers["Location"] == "/settings/two-factor"
    page = client.get("/settings/two-factor")
    assert page.status_code == 200
    assert "requires two-factor authentication for your role" in text(page)
    assert post(client, "/logout", page="/settings/two-factor").status_code == 302

    # A developer's role is not covered by the requirement.
    login(client, dev.email)
    assert client.get("/team").status_code == 200
