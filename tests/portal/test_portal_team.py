"""The team page: members, roles, invitations; writes need team:write."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from accounts.models import Invitation, Membership, Role
from core.db import db
from tests.factories import MembershipFactory, UserFactory, make_invitation, tenant_with_owner
from tests.portal.helpers import login, post, text


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def member(tenant: Any, role: Role) -> Any:
    return MembershipFactory(tenant=tenant, user=UserFactory(), role=role)


def test_team_lists_members_with_role_and_two_factor(client: Any, setup: Any) -> None:
    other = member(setup.tenant, Role.FINANCE)
    login(client, setup.owner.email)
    page = text(client.get("/team"))
    assert setup.owner.email in page and other.user.email in page
    assert 'data-testid="invite-form"' in page
    assert 'data-testid="invite-email"' in page and 'data-testid="invite-submit"' in page


def test_invite_sends_mail_and_lists_the_invitation(client: Any, setup: Any,
                                                    mailbox: Any) -> None:
    login(client, setup.owner.email)
    response = post(client, "/team/invite", {"email": "Hire@Example.com", "role": "operations"},
                    page="/team")
    assert response.status_code == 302 and response.headers["Location"] == "/team"
    invitation = db.session.execute(
        select(Invitation).where(Invitation.tenant_id == setup.tenant.id)
    ).scalar_one()
    assert invitation.email == "hire@example.com" and invitation.role is Role.OPERATIONS
    assert "/invitations/" in mailbox.body(mailbox.wait_for("hire@example.com"))
    page = text(client.get("/team"))
    assert 'data-testid="invitation-row" data-email="hire@example.com"' in page


def test_invite_errors_show_on_the_form(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    bad = post(client, "/team/invite", {"email": "not-an-address", "role": "viewer"},
               page="/team")
    assert bad.status_code == 422
    assert "Not a valid e-mail address." in text(bad)
    existing = post(client, "/team/invite", {"email": setup.owner.email, "role": "viewer"},
                    page="/team")
    assert existing.status_code == 409
    assert "Already a member." in text(existing)


def test_change_role_and_the_last_owner_rule(client: Any, setup: Any) -> None:
    dev = member(setup.tenant, Role.DEVELOPER)
    login(client, setup.owner.email)
    response = post(client, f"/team/members/{dev.id}/role", {"role": "finance"}, page="/team")
    assert response.status_code == 302
    db.session.refresh(dev)
    assert dev.role is Role.FINANCE

    owner_membership = db.session.execute(
        select(Membership).where(Membership.user_id == setup.owner.id)
    ).scalar_one()
    refused = post(client, f"/team/members/{owner_membership.id}/role", {"role": "viewer"},
                   page="/team")
    assert refused.status_code == 409
    assert "A tenant needs at least one owner." in text(refused)


def test_remove_member(client: Any, setup: Any) -> None:
    gone = member(setup.tenant, Role.VIEWER)
    login(client, setup.owner.email)
    response = post(client, f"/team/members/{gone.id}/remove", page="/team")
    assert response.status_code == 302
    assert db.session.get(Membership, gone.id) is None


def test_revoke_invitation(client: Any, setup: Any) -> None:
    invitation = make_invitation(setup.tenant, "later@example.com")
    login(client, setup.owner.email)
    response = post(client, f"/team/invitations/{invitation.id}/revoke", page="/team")
    assert response.status_code == 302
    db.session.refresh(invitation)
    assert invitation.revoked_at is not None
    assert 'data-email="later@example.com"' not in text(client.get("/team"))


def test_viewer_reads_the_team_but_cannot_change_it(client: Any, setup: Any) -> None:
    viewer = member(setup.tenant, Role.VIEWER)
    login(client, viewer.user.email)
    page = client.get("/team")
    assert page.status_code == 200 and 'data-testid="invite-form"' not in text(page)
    refused = post(client, "/team/invite", {"email": "x@example.com", "role": "owner"},
                   page="/team")
    assert refused.status_code == 403
    assert 'data-testid="error-page"' in text(refused)


def test_another_tenants_member_is_not_found(client: Any, setup: Any) -> None:
    other = tenant_with_owner()
    stranger = member(other.tenant, Role.VIEWER)
    login(client, setup.owner.email)
    for action in (f"/team/members/{stranger.id}/role", f"/team/members/{stranger.id}/remove"):
        assert post(client, action, {"role": "owner"}, page="/team").status_code == 404
    invitation = make_invitation(other.tenant)
    assert post(client, f"/team/invitations/{invitation.id}/revoke",
                page="/team").status_code == 404
    db.session.refresh(stranger)
    assert stranger.role is Role.VIEWER
