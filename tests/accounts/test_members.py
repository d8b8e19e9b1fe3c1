"""Members of a tenant: list, change role, remove; a tenant always keeps one owner."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from accounts.models import Membership, Role
from core.db import db
from tests.factories import MembershipFactory, tenant_with_owner


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def owner_membership(setup: Any) -> Membership:
    return db.session.execute(
        select(Membership).where(Membership.tenant_id == setup.tenant.id,
                                 Membership.user_id == setup.owner.id)
    ).scalar_one()


def test_list_members(client: Any, setup: Any) -> None:
    dev = MembershipFactory(tenant=setup.tenant, role=Role.DEVELOPER)
    MembershipFactory(role=Role.OWNER)  # another tenant's member
    response = client.get("/api/v1/members", headers=setup.headers)
    assert response.status_code == 200
    items = response.get_json()["items"]
    assert {(m["email"], m["role"]) for m in items} == {
        (setup.owner.email, "owner"), (dev.user.email, "developer")}
    member = next(m for m in items if m["role"] == "developer")
    assert member == {
        "id": str(dev.id), "user_id": str(dev.user_id), "email": dev.user.email,
        "name": dev.user.name, "role": "developer", "two_factor_enabled": False,
        "created_at": member["created_at"],
    }
    detail = client.get(f"/api/v1/members/{dev.id}", headers=setup.headers)
    assert detail.get_json() == member


def test_change_role(client: Any, setup: Any) -> None:
    dev = MembershipFactory(tenant=setup.tenant, role=Role.DEVELOPER)
    response = client.patch(f"/api/v1/members/{dev.id}", headers=setup.headers,
                            json={"role": "finance"})
    assert response.status_code == 200
    assert response.get_json()["role"] == "finance"
    db.session.expire_all()
    assert db.session.get(Membership, dev.id).role is Role.FINANCE


@pytest.mark.parametrize("body", [{"role": "admin"}, {}, {"role": "owner", "x": 1}])
def test_change_role_validates(client: Any, setup: Any, body: dict[str, Any]) -> None:
    dev = MembershipFactory(tenant=setup.tenant, role=Role.DEVELOPER)
    response = client.patch(f"/api/v1/members/{dev.id}", headers=setup.headers, json=body)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_failed"


def test_last_owner_cannot_be_demoted(client: Any, setup: Any) -> None:
    owner = owner_membership(setup)
    response = client.patch(f"/api/v1/members/{owner.id}", headers=setup.headers,
                            json={"role": "viewer"})
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "last_owner"
    db.session.expire_all()
    assert db.session.get(Membership, owner.id).role is Role.OWNER


def test_last_owner_cannot_be_removed(client: Any, setup: Any) -> None:
    owner = owner_membership(setup)
    MembershipFactory(tenant=setup.tenant, role=Role.DEVELOPER)
    response = client.delete(f"/api/v1/members/{owner.id}", headers=setup.headers)
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "last_owner"
    assert db.session.get(Membership, owner.id) is not None


def test_an_owner_can_go_when_another_owner_stays(client: Any, setup: Any) -> None:
    owner = owner_membership(setup)
    second = MembershipFactory(tenant=setup.tenant, role=Role.OWNER)
    demoted = client.patch(f"/api/v1/members/{owner.id}", headers=setup.headers,
                           json={"role": "developer"})
    assert demoted.status_code == 200
    # Now the second owner is the last one.
    refused = client.delete(f"/api/v1/members/{second.id}", headers=setup.headers)
    assert refused.status_code == 409
    assert refused.get_json()["error"]["code"] == "last_owner"


def test_remove_member(client: Any, setup: Any) -> None:
    dev = MembershipFactory(tenant=setup.tenant, role=Role.DEVELOPER)
    assert client.delete(f"/api/v1/members/{dev.id}", headers=setup.headers).status_code == 204
    listed = client.get("/api/v1/members", headers=setup.headers).get_json()["items"]
    assert [m["email"] for m in listed] == [setup.owner.email]
    assert client.get(f"/api/v1/members/{dev.id}", headers=setup.headers).status_code == 404
    assert client.delete(f"/api/v1/members/{dev.id}", headers=setup.headers).status_code == 404


def test_members_paginate(client: Any, setup: Any) -> None:
    for _ in range(4):
        MembershipFactory(tenant=setup.tenant, role=Role.VIEWER)
    first = client.get("/api/v1/members?limit=3", headers=setup.headers).get_json()
    assert len(first["items"]) == 3 and first["next_cursor"]
    rest = client.get(f"/api/v1/members?limit=3&cursor={first['next_cursor']}",
                      headers=setup.headers).get_json()
    assert len(rest["items"]) == 2 and rest["next_cursor"] is None
    ids = [m["id"] for m in first["items"] + rest["items"]]
    assert len(set(ids)) == 5
