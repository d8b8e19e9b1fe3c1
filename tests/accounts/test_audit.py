"""The audit log: every mutation is recorded (who, tenant, target, source IP) and never changed."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from accounts import services
from accounts.models import ApiToken, AuditEntry, Role, TokenScope
from core.db import db
from tests.core.endpoints import api_routes
from tests.factories import MembershipFactory, make_invitation, make_token, tenant_with_owner

SOURCE_IP = "203.0.113.9"


Request = Callable[[Any, Any, Any, dict[str, Any]], tuple[Any, str]]


class Mutation:
    """One mutating API call: what it needs, what it sends, what its audit entry must say."""

    def __init__(self, rule: str, method: str, action: str, target_type: str,
                 prepare: Callable[[Any], Any], call: Request) -> None:
        self.rule, self.method, self.action = rule, method, action
        self.target_type, self.prepare, self.call = target_type, prepare, call


def _nothing(setup: Any) -> None:
    return None


def _token(setup: Any) -> Any:
    return make_token(setup.tenant, TokenScope.READ)[0]


def _viewer(setup: Any) -> Any:
    return MembershipFactory(tenant=setup.tenant, role=Role.VIEWER)


def _invitation(setup: Any) -> Any:
    return make_invitation(setup.tenant)


def _create_token(client: Any, setup: Any, _: Any, kw: dict[str, Any]) -> tuple[Any, str]:
    r = client.post("/api/v1/tokens", json={"name": "audited", "scope": "read"}, **kw)
    return r, r.get_json()["id"]


def _revoke_token(client: Any, setup: Any, token: Any, kw: dict[str, Any]) -> tuple[Any, str]:
    return client.delete(f"/api/v1/tokens/{token.id}", **kw), str(token.id)


def _change_role(client: Any, setup: Any, member: Any, kw: dict[str, Any]) -> tuple[Any, str]:
    r = client.patch(f"/api/v1/members/{member.id}", json={"role": "operations"}, **kw)
    return r, str(member.id)


def _remove_member(client: Any, setup: Any, member: Any, kw: dict[str, Any]) -> tuple[Any, str]:
    return client.delete(f"/api/v1/members/{member.id}", **kw), str(member.id)


def _create_invitation(client: Any, setup: Any, _: Any, kw: dict[str, Any]) -> tuple[Any, str]:
    r = client.post("/api/v1/invitations", json={"email": "audit@example.com", "role": "viewer"},
                    **kw)
    return r, r.get_json()["id"]


def _revoke_invitation(client: Any, setup: Any, invitation: Any,
                       kw: dict[str, Any]) -> tuple[Any, str]:
    return client.delete(f"/api/v1/invitations/{invitation.id}", **kw), str(invitation.id)


def _update_tenant(client: Any, setup: Any, _: Any, kw: dict[str, Any]) -> tuple[Any, str]:
    return client.patch("/api/v1/tenant", json={"name": "Renamed"}, **kw), str(setup.tenant.id)


MUTATIONS = [
    Mutation("/api/v1/tokens", "POST", "token.create", "apitoken", _nothing, _create_token),
    Mutation("/api/v1/tokens/<token_id>", "DELETE", "token.revoke", "apitoken", _token,
             _revoke_token),
    Mutation("/api/v1/members/<member_id>", "PATCH", "member.role_change", "membership",
             _viewer, _change_role),
    Mutation("/api/v1/members/<member_id>", "DELETE", "member.remove", "membership",
             _viewer, _remove_member),
    Mutation("/api/v1/invitations", "POST", "invitation.create", "invitation", _nothing,
             _create_invitation),
    Mutation("/api/v1/invitations/<invitation_id>", "DELETE", "invitation.revoke", "invitation",
             _invitation, _revoke_invitation),
    Mutation("/api/v1/tenant", "PATCH", "tenant.update", "tenant", _nothing, _update_tenant),
]


@pytest.fixture
def setup(app: Any, mailbox: Any) -> Any:
    return tenant_with_owner()


def token_row(raw: str) -> ApiToken:
    digest = hashlib.sha256(raw.encode()).hexdigest()
    return db.session.execute(select(ApiToken).where(ApiToken.token_hash == digest)).scalar_one()


def entries(tenant_id: Any) -> list[AuditEntry]:
    return list(db.session.execute(
        select(AuditEntry).where(AuditEntry.tenant_id == tenant_id).order_by(AuditEntry.created_at)
    ).scalars())


def test_every_mutating_accounts_endpoint_is_in_the_audit_table(app: Any) -> None:
    """A new POST/PATCH/PUT/DELETE endpoint of the accounts API must add its row to MUTATIONS."""
    mutating = {route.key for route in api_routes(app)
                if route.view.__module__ == "accounts.api"
                and route.method in {"POST", "PATCH", "PUT", "DELETE"}}
    assert mutating == {(m.rule, m.method) for m in MUTATIONS}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.action for m in MUTATIONS])
def test_mutation_is_audited(client: Any, setup: Any, mutation: Mutation) -> None:
    writer = token_row(setup.token)
    prepared = mutation.prepare(setup)
    before = {e.id for e in entries(setup.tenant.id)}
    started = dt.datetime.now(dt.UTC)

    request = {"headers": setup.headers, "environ_base": {"REMOTE_ADDR": SOURCE_IP}}
    response, target_id = mutation.call(client, setup, prepared, request)
    assert response.status_code < 300, response.get_json()

    new = [e for e in entries(setup.tenant.id) if e.id not in before]
    assert len(new) == 1, [e.action for e in new]
    entry = new[0]
    assert entry.action == mutation.action
    assert entry.tenant_id == setup.tenant.id
    assert entry.actor_token_id == writer.id
    assert entry.actor_user_id is None
    assert entry.actor_label == f"token:{writer.prefix}"
    assert (entry.target_type, entry.target_id) == (mutation.target_type, target_id)
    assert entry.source_ip == SOURCE_IP
    assert started - dt.timedelta(seconds=1) <= entry.created_at <= dt.datetime.now(dt.UTC)

    listed = client.get(f"/api/v1/audit-log?action={mutation.action}",
                        headers=setup.headers).get_json()["items"][0]
    assert listed["id"] == str(entry.id)
    assert listed["actor"] == entry.actor_label
    assert listed["actor_token_id"] == str(writer.id)
    assert listed["target_id"] == target_id
    assert listed["source_ip"] == SOURCE_IP


def test_refused_mutation_is_not_audited(client: Any, setup: Any) -> None:
    recorded = db.session.execute(select(func.count()).select_from(AuditEntry)).scalar_one()
    owner_id = next(m.id for m in setup.tenant.memberships)
    response = client.delete(f"/api/v1/members/{owner_id}", headers=setup.headers)
    assert response.status_code == 409
    assert db.session.execute(select(func.count()).select_from(AuditEntry)).scalar_one() \
        == recorded


def test_setup_outside_a_request_is_audited_as_cli(app: Any) -> None:
    tenant = services.create_tenant("From The Shell", "USD", "UTC")
    entry = entries(tenant.id)[0]
    assert (entry.action, entry.actor_label, entry.source_ip) == ("tenant.create", "cli", None)
    assert entry.details == {"name": "From The Shell", "currency": "USD"}


def test_list_is_newest_first_paginated_and_filtered(client: Any, setup: Any) -> None:
    done = []
    for n in range(3):
        created = client.post("/api/v1/tokens", headers=setup.headers,
                              json={"name": f"t{n}", "scope": "read"}).get_json()
        done.append(("token.create", created["id"]))
        assert client.delete(f"/api/v1/tokens/{created['id']}",
                             headers=setup.headers).status_code == 204
        done.append(("token.revoke", created["id"]))

    seen: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = client.get(f"/api/v1/audit-log?limit=2&cursor={cursor}" if cursor else
                          "/api/v1/audit-log?limit=2", headers=setup.headers).get_json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len({e["id"] for e in seen}) == len(seen)
    assert len(seen) == len(entries(setup.tenant.id))
    times = [e["created_at"] for e in seen]
    assert times == sorted(times, reverse=True)
    assert [(e["action"], e["target_id"]) for e in seen[:6]] == done[::-1]

    revokes = client.get("/api/v1/audit-log?action=token.revoke",
                         headers=setup.headers).get_json()
    assert [e["target_id"] for e in revokes["items"]] == [t for a, t in done[::-1]
                                                         if a == "token.revoke"]
    none = client.get("/api/v1/audit-log?action=no.such.action", headers=setup.headers)
    assert none.get_json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("statement", [
    "UPDATE audit_log SET action = 'tampered' WHERE id = :id",
    "DELETE FROM audit_log WHERE id = :id",
])
def test_audit_rows_cannot_be_changed_or_deleted(app: Any, setup: Any, statement: str) -> None:
    entry = entries(setup.tenant.id)[0]
    with pytest.raises(DBAPIError, match="append-only"), db.session.begin_nested():
        db.session.execute(text(statement), {"id": entry.id})
    row = db.session.execute(text("SELECT action FROM audit_log WHERE id = :id"),
                             {"id": entry.id}).scalar_one()
    assert row == entry.action
    # Appending still works.
    services.create_tenant("Still Writable", "EUR", "UTC")
    db.session.flush()
