"""API tokens page: the secret is shown once; writes need tokens:write."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select

from accounts.models import ApiToken, Role, TokenScope
from core.crypto import sha256_hex
from core.db import db
from tests.factories import MembershipFactory, UserFactory, make_token, tenant_with_owner
from tests.portal.helpers import login, post, text


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def test_create_shows_the_secret_once(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    response = post(client, "/tokens", {"name": "factory line", "scope": "write"})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    secret = re.search(r'data-testid="token-secret">([^<]+)<', text(response))
    assert secret
    raw = secret.group(1).strip()
    token = db.session.execute(
        select(ApiToken).where(ApiToken.name == "factory line")
    ).scalar_one()
    assert token.token_hash == sha256_hex(raw) and token.scope is TokenScope.WRITE
    listing = text(client.get("/tokens"))
    assert raw not in listing and token.prefix in listing
    # The new secret works on the API.
    api = client.get("/api/v1/tenant", headers={"Authorization": f"Bearer {raw}"})
    assert api.status_code == 200


def test_create_needs_a_name(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    response = post(client, "/tokens", {"name": "   ", "scope": "read"})
    assert response.status_code in (409, 422)
    assert 'data-testid="token-secret"' not in text(response)


def test_revoke(client: Any, setup: Any) -> None:
    token, raw = make_token(setup.tenant, name="old key")
    login(client, setup.owner.email)
    page = text(client.get("/tokens"))
    assert 'data-testid="token-revoke"' in page
    response = post(client, f"/tokens/{token.id}/revoke", page="/tokens")
    assert response.status_code == 302
    db.session.refresh(token)
    assert token.revoked_at is not None
    assert client.get("/api/v1/tenant",
                      headers={"Authorization": f"Bearer {raw}"}).status_code == 401


@pytest.mark.parametrize(("role", "read", "write"), [
    (Role.DEVELOPER, 200, 200), (Role.OPERATIONS, 403, 403), (Role.VIEWER, 403, 403),
])
def test_roles(client: Any, setup: Any, role: Role, read: int, write: int) -> None:
    user = UserFactory()
    MembershipFactory(tenant=setup.tenant, user=user, role=role)
    login(client, user.email)
    assert client.get("/tokens").status_code == read
    response = post(client, "/tokens", {"name": "mine", "scope": "read"}, page="/")
    assert response.status_code == write


def test_another_tenants_token_is_not_found(client: Any, setup: Any) -> None:
    other = tenant_with_owner()
    token, _ = make_token(other.tenant)
    login(client, setup.owner.email)
    assert post(client, f"/tokens/{token.id}/revoke", page="/tokens").status_code == 404
    db.session.refresh(token)
    assert token.revoked_at is None
