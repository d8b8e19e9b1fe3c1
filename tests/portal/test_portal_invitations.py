"""Accepting an invitation from its link: new account, logged-in invitee, used or bad links."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from accounts import services
from accounts.models import Invitation, Role
from core.crypto import new_token, sha256_hex
from core.db import db, utcnow
from tests.factories import UserFactory, tenant_with_owner
from tests.portal.helpers import login, post, text


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def invite(tenant: Any, email: str, role: Role = Role.DEVELOPER) -> str:
    """An invitation's raw link token (the mail is not needed to know it here)."""
    raw = new_token("inv")
    invitation = services.invite(tenant, email, role, None)
    invitation.token_hash = sha256_hex(raw)
    db.session.commit()
    return raw


def pending(email: str) -> Invitation:
    return db.session.execute(select(Invitation).where(Invitation.email == email)).scalar_one()


def test_new_person_creates_an_account_and_is_logged_in(client: Any, setup: Any) -> None:
    raw = invite(setup.tenant, "fresh@example.com")
    page = client.get(f"/invitations/{raw}")
    assert page.status_code == 200 and 'data-testid="accept-name"' in text(page)
    assert f"Join {setup.tenant.name}" in text(page)

    short = post(client, f"/invitations/{raw}",
                 {"name": "Fresh", "password": "short", "confirm": "short"})
    assert short.status_code == 422

    response = post(client, f"/invitations/{raw}", {
        "name": "Fresh Face", "password": "a long enough secret", "confirm": "a long enough secret",
    })
    assert response.status_code == 302 and response.headers["Location"] == "/"
    dashboard = client.get("/")
    assert dashboard.status_code == 200 and setup.tenant.name in text(dashboard)
    user = services.get_user_by_email("fresh@example.com")
    assert user is not None and user.name == "Fresh Face"
    assert services.membership(setup.tenant.id, user.id).role is Role.DEVELOPER


def test_existing_account_is_asked_to_log_in_first(client: Any, setup: Any) -> None:
    user = UserFactory()
    raw = invite(setup.tenant, user.email, Role.FINANCE)
    page = text(client.get(f"/invitations/{raw}"))
    assert 'data-testid="accept-login"' in page
    assert f"/login?next=/invitations/{raw}" in page

    response = login(client, user.email, next=f"/invitations/{raw}")
    assert response.headers["Location"] == f"/invitations/{raw}"
    assert 'data-testid="accept-submit"' in text(client.get(f"/invitations/{raw}"))
    accepted = post(client, f"/invitations/{raw}")
    assert accepted.status_code == 302
    assert services.membership(setup.tenant.id, user.id).role is Role.FINANCE


def test_logged_in_as_someone_else(client: Any, setup: Any) -> None:
    raw = invite(setup.tenant, "someone.else@example.com")
    login(client, setup.owner.email)
    page = text(client.get(f"/invitations/{raw}"))
    assert 'data-testid="accept-logout"' in page and "someone.else@example.com" in page
    refused = post(client, f"/invitations/{raw}")
    assert refused.status_code == 403


def test_used_link_is_gone(client: Any, setup: Any) -> None:
    raw = invite(setup.tenant, "twice@example.com")
    services.accept_invitation(raw, None, name="T", password="a long enough secret")
    db.session.commit()
    response = client.get(f"/invitations/{raw}")
    assert response.status_code == 410
    assert 'data-testid="error-code">invitation_used<' in text(response)


def test_unknown_revoked_and_expired_links_are_gone(client: Any, setup: Any) -> None:
    assert client.get("/invitations/inv_nonsense").status_code == 410
    raw = invite(setup.tenant, "revoked@example.com")
    invitation = pending("revoked@example.com")
    services.revoke_invitation(invitation)
    db.session.commit()
    response = client.get(f"/invitations/{raw}")
    assert response.status_code == 410 and "invitation_invalid" in text(response)

    raw = invite(setup.tenant, "late@example.com")
    invitation = pending("late@example.com")
    invitation.expires_at = utcnow()
    db.session.commit()
    response = client.get(f"/invitations/{raw}")
    assert response.status_code == 410 and "invitation_expired" in text(response)
