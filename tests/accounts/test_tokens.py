"""API tokens: shown once, stored as SHA-256, scoped, listed page by page, revocable."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pytest
from sqlalchemy import select, text

from accounts.models import ApiToken, TokenScope
from core.db import Base, db
from tests.factories import auth, make_token, tenant_with_owner


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def all_database_text() -> str:
    """Every row of every table rendered as text, to look for a secret anywhere."""
    rows = []
    for table in Base.metadata.sorted_tables:
        query = text(f'SELECT CAST(t AS text) FROM "{table.name}" t')  # noqa: S608 - our names
        rows += db.session.execute(query).scalars()
    return "\n".join(rows)


def test_create_shows_the_secret_once_and_stores_only_its_sha256(client: Any,
                                                                 setup: Any) -> None:
    response = client.post("/api/v1/tokens", headers={**setup.headers, "Idempotency-Key": "k"},
                           json={"name": "ci deploy", "scope": "read"})
    assert response.status_code == 201
    body = response.get_json()
    raw = body["token"]
    assert raw.startswith("ens_") and len(raw) > 40
    assert body["name"] == "ci deploy" and body["scope"] == "read"
    assert body["prefix"] == raw[:12]
    assert body["last_used_at"] is None and body["revoked_at"] is None

    row = db.session.get(ApiToken, body["id"])
    assert row is not None
    assert row.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    # Nowhere in the database, not in the token row, the audit log or the idempotency record.
    dump = all_database_text()
    assert row.token_hash in dump  # the dump really covers the tokens table
    assert raw not in dump
    assert raw[12:] not in dump

    # Never shown again: neither in the list nor the detail.
    detail = client.get(f"/api/v1/tokens/{body['id']}", headers=setup.headers)
    assert detail.status_code == 200
    assert "token" not in detail.get_json()
    assert raw not in client.get("/api/v1/tokens", headers=setup.headers).get_data(as_text=True)


def test_created_token_authenticates_with_its_scope(client: Any, setup: Any) -> None:
    created = client.post("/api/v1/tokens", headers=setup.headers,
                          json={"name": "reader", "scope": "read"}).get_json()
    assert client.get("/api/v1/tenant", headers=auth(created["token"])).status_code == 200
    refused = client.post("/api/v1/tokens", headers=auth(created["token"]),
                          json={"name": "x", "scope": "write"})
    assert refused.status_code == 403


def test_list_paginates_with_a_cursor_without_duplicates(client: Any, setup: Any) -> None:
    for n in range(6):
        make_token(setup.tenant, TokenScope.READ, name=f"bulk {n}")
    expected = {str(t.id) for t in db.session.execute(
        select(ApiToken).where(ApiToken.tenant_id == setup.tenant.id)).scalars()}
    assert len(expected) == 7

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = "/api/v1/tokens?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=setup.headers)
        assert page.status_code == 200
        body = page.get_json()
        assert set(body) == {"items", "next_cursor"}
        assert len(body["items"]) <= 3
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10, "pagination does not end"
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == expected
    assert seen == sorted(seen, key=uuid.UUID)


def test_exact_multiple_of_limit_ends_with_null_cursor(client: Any, setup: Any) -> None:
    make_token(setup.tenant, TokenScope.READ)  # two tokens, limit two
    first = client.get("/api/v1/tokens?limit=2", headers=setup.headers).get_json()
    assert len(first["items"]) == 2
    assert first["next_cursor"] is None


@pytest.mark.parametrize("cursor", ["!!!", "AAAA", "not a cursor", "x" * 200])
def test_invalid_cursor_is_422(client: Any, setup: Any, cursor: str) -> None:
    response = client.get("/api/v1/tokens", headers=setup.headers,
                          query_string={"cursor": cursor})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_failed"
    assert "cursor" in error["details"]


@pytest.mark.parametrize("limit", [0, -1, 201])
def test_limit_out_of_range_is_422(client: Any, setup: Any, limit: int) -> None:
    response = client.get(f"/api/v1/tokens?limit={limit}", headers=setup.headers)
    assert response.status_code == 422
    assert "limit" in response.get_json()["error"]["details"]


def test_revoke_refuses_the_token_at_once(client: Any, setup: Any) -> None:
    token, raw = make_token(setup.tenant, TokenScope.WRITE)
    assert client.get("/api/v1/tokens", headers=auth(raw)).status_code == 200

    assert client.delete(f"/api/v1/tokens/{token.id}", headers=setup.headers).status_code == 204
    refused = client.get("/api/v1/tokens", headers=auth(raw))
    assert refused.status_code == 401
    assert refused.get_json()["error"]["code"] == "invalid_token"

    detail = client.get(f"/api/v1/tokens/{token.id}", headers=setup.headers).get_json()
    assert detail["revoked_at"] is not None
    # Revoking again is harmless and keeps the first revocation time.
    assert client.delete(f"/api/v1/tokens/{token.id}", headers=setup.headers).status_code == 204
    again = client.get(f"/api/v1/tokens/{token.id}", headers=setup.headers).get_json()
    assert again["revoked_at"] == detail["revoked_at"]


def test_a_token_can_revoke_itself(client: Any, setup: Any) -> None:
    token, raw = make_token(setup.tenant, TokenScope.WRITE)
    assert client.delete(f"/api/v1/tokens/{token.id}", headers=auth(raw)).status_code == 204
    assert client.get("/api/v1/tenant", headers=auth(raw)).status_code == 401


def test_last_used_at_is_set_on_use(client: Any, setup: Any) -> None:
    token, raw = make_token(setup.tenant, TokenScope.READ)
    assert token.last_used_at is None
    before = client.get(f"/api/v1/tokens/{token.id}", headers=setup.headers).get_json()
    assert before["last_used_at"] is None

    assert client.get("/api/v1/tenant", headers=auth(raw)).status_code == 200
    after = client.get(f"/api/v1/tokens/{token.id}", headers=setup.headers).get_json()
    assert after["last_used_at"] is not None
    assert after["last_used_at"] >= after["created_at"]
    stored = db.session.execute(
        text("SELECT last_used_at FROM api_tokens WHERE id = :id"), {"id": token.id}
    ).scalar_one()
    assert stored is not None
