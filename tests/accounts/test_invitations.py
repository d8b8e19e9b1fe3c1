"""Invitations: created through the API, accepted from the link in the mail the sink received."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest

from accounts import services
from accounts.models import Invitation, Role
from core.db import db
from core.errors import Conflict, EnsoulError, Forbidden, Gone
from tests.factories import PASSWORD, UserFactory, make_invitation, tenant_with_owner


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def link_from_mail(app: Any, mailbox: Any, to: str) -> str:
    body = mailbox.body(mailbox.wait_for(to))
    base = re.escape(app.config["ENSOUL_BASE_URL"])
    match = re.search(base + r"/invitations/(\S+)", body)
    assert match, body
    return match.group(1)


def invite_via_api(client: Any, setup: Any, email: str, role: str = "developer") -> dict[str, Any]:
    response = client.post("/api/v1/invitations", headers=setup.headers,
                           json={"email": email, "role": role})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_invite_by_api_and_accept_as_a_new_user(app: Any, client: Any, setup: Any,
                                                 mailbox: Any) -> None:
    created = invite_via_api(client, setup, "new.hire@example.com", "developer")
    assert created["status"] == "pending" and created["role"] == "developer"
    expires = dt.datetime.fromisoformat(created["expires_at"])
    hours = app.config["ENSOUL_INVITATION_TTL_HOURS"]
    assert abs(expires - dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)) < dt.timedelta(
        minutes=5)

    message = mailbox.wait_for("new.hire@example.com")
    assert setup.tenant.name in message["Subject"]
    raw = link_from_mail(app, mailbox, "new.hire@example.com")
    # The link's secret is stored only as a hash.
    assert db.session.get(Invitation, created["id"]).token_hash != raw

    member = services.accept_invitation(raw, None, name="New Hire", password=PASSWORD)
    db.session.commit()
    assert member.tenant_id == setup.tenant.id and member.role is Role.DEVELOPER
    assert services.authenticate("new.hire@example.com", PASSWORD).id == member.user_id

    members = client.get("/api/v1/members", headers=setup.headers).get_json()["items"]
    assert ("new.hire@example.com", "developer") in {(m["email"], m["role"]) for m in members}
    detail = client.get(f"/api/v1/invitations/{created['id']}", headers=setup.headers)
    assert detail.get_json()["status"] == "accepted"


def test_existing_user_accepts_while_logged_in(app: Any, client: Any, setup: Any,
                                               mailbox: Any) -> None:
    user = UserFactory()
    invite_via_api(client, setup, user.email, "finance")
    raw = link_from_mail(app, mailbox, user.email)
    with pytest.raises(Conflict) as not_logged_in:
        services.accept_invitation(raw, None, password=PASSWORD)
    assert not_logged_in.value.code == "login_required"

    stranger = UserFactory()
    with pytest.raises(Forbidden) as wrong_user:
        services.accept_invitation(raw, stranger)
    assert wrong_user.value.code == "invitation_other_email"

    member = services.accept_invitation(raw, user)
    assert (member.tenant_id, member.user_id, member.role) == (setup.tenant.id, user.id,
                                                               Role.FINANCE)


def test_used_invitation_is_gone(app: Any, client: Any, setup: Any, mailbox: Any) -> None:
    invite_via_api(client, setup, "once@example.com")
    raw = link_from_mail(app, mailbox, "once@example.com")
    services.accept_invitation(raw, None, password=PASSWORD)
    with pytest.raises(Gone) as used:
        services.accept_invitation(raw, None, password=PASSWORD)
    assert used.value.code == "invitation_used"


def test_expired_invitation_is_gone(app: Any, client: Any, setup: Any, mailbox: Any) -> None:
    created = invite_via_api(client, setup, "late@example.com")
    raw = link_from_mail(app, mailbox, "late@example.com")
    invitation = db.session.get(Invitation, created["id"])
    invitation.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    db.session.commit()
    with pytest.raises(Gone) as expired:
        services.accept_invitation(raw, None, password=PASSWORD)
    assert expired.value.code == "invitation_expired"
    detail = client.get(f"/api/v1/invitations/{created['id']}", headers=setup.headers)
    assert detail.get_json()["status"] == "expired"
    assert services.get_user_by_email("late@example.com") is None


def test_revoked_invitation_is_gone(app: Any, client: Any, setup: Any, mailbox: Any) -> None:
    created = invite_via_api(client, setup, "revoked@example.com")
    raw = link_from_mail(app, mailbox, "revoked@example.com")
    response = client.delete(f"/api/v1/invitations/{created['id']}", headers=setup.headers)
    assert response.status_code == 204
    with pytest.raises(Gone) as revoked:
        services.accept_invitation(raw, None, password=PASSWORD)
    assert revoked.value.code == "invitation_invalid"
    detail = client.get(f"/api/v1/invitations/{created['id']}", headers=setup.headers)
    assert detail.get_json()["status"] == "revoked"


def test_unknown_invitation_link_is_gone(app: Any, setup: Any) -> None:
    with pytest.raises(Gone) as unknown:
        services.accept_invitation("inv_not-a-real-one", None, password=PASSWORD)
    assert unknown.value.code == "invitation_invalid"
    assert unknown.value.http_status == 410


def test_accepting_with_a_weak_password_creates_nobody(app: Any, client: Any, setup: Any,
                                                        mailbox: Any) -> None:
    invite_via_api(client, setup, "weak@example.com")
    raw = link_from_mail(app, mailbox, "weak@example.com")
    with pytest.raises(EnsoulError) as weak:
        services.accept_invitation(raw, None, password="short")
    assert weak.value.code == "validation_failed" and "password" in weak.value.details
    db.session.rollback()
    assert services.get_user_by_email("weak@example.com") is None
    services.accept_invitation(raw, None, password=PASSWORD)  # the link still works


def test_inviting_a_member_is_409(client: Any, setup: Any) -> None:
    response = client.post("/api/v1/invitations", headers=setup.headers,
                           json={"email": setup.owner.email.upper(), "role": "viewer"})
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "already_member"


@pytest.mark.parametrize("body", [
    {"email": "not-an-email", "role": "viewer"},
    {"email": "a@example.com", "role": "emperor"},
    {"email": "a@example.com"},
    {"email": 5, "role": "viewer"},
    # RFC 5321 quoted local parts the mail's To header cannot carry (was a 500, found by fuzzing)
    {"email": '"\x1c"@example.com', "role": "viewer"},
    {"email": '"a\x0bb"@example.com', "role": "viewer"},
])
def test_invalid_invitation_is_422(client: Any, setup: Any, mailbox: Any,
                                   body: dict[str, Any]) -> None:
    response = client.post("/api/v1/invitations", headers=setup.headers, json=body)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_failed"


def test_list_invitations_newest_first(client: Any, setup: Any, mailbox: Any) -> None:
    first = make_invitation(setup.tenant, "first@example.com")
    second = make_invitation(setup.tenant, "second@example.com")
    items = client.get("/api/v1/invitations", headers=setup.headers).get_json()["items"]
    assert [i["id"] for i in items] == [str(second.id), str(first.id)]


def test_revoking_twice_keeps_the_first_revocation(client: Any, setup: Any,
                                                   mailbox: Any) -> None:
    invitation = make_invitation(setup.tenant)
    url = f"/api/v1/invitations/{invitation.id}"
    assert client.delete(url, headers=setup.headers).status_code == 204
    first = db.session.get(Invitation, invitation.id).revoked_at
    assert client.delete(url, headers=setup.headers).status_code == 204
    db.session.expire_all()
    assert db.session.get(Invitation, invitation.id).revoked_at == first
    revocations = client.get("/api/v1/audit-log?action=invitation.revoke",
                             headers=setup.headers).get_json()["items"]
    assert [e["target_id"] for e in revocations] == [str(invitation.id)]
