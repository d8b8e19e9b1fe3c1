"""``Idempotency-Key`` on the POSTs that must not act twice: tokens and invitations."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import func, select

from accounts.models import ApiToken, AuditEntry, Invitation, TokenScope
from core.db import db
from core.models import IdempotencyRecord
from tests.factories import auth, make_token, tenant_with_owner

# Every idempotent POST: (path, body, a different body, model counted, audit action).
ENDPOINTS = {
    "tokens": ("/api/v1/tokens", {"name": "deploy", "scope": "write"},
               {"name": "deploy", "scope": "read"}, ApiToken, "token.create"),
    "invitations": ("/api/v1/invitations", {"email": "new.hire@example.com", "role": "viewer"},
                    {"email": "new.hire@example.com", "role": "developer"}, Invitation,
                    "invitation.create"),
}


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def count(model: Any, tenant_id: Any) -> int:
    return db.session.execute(
        select(func.count()).select_from(model).where(model.tenant_id == tenant_id)
    ).scalar_one()


def audit_count(action: str, tenant_id: Any) -> int:
    return db.session.execute(
        select(func.count()).select_from(AuditEntry)
        .where(AuditEntry.tenant_id == tenant_id, AuditEntry.action == action)
    ).scalar_one()


@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_same_key_and_body_replays_the_first_answer(client: Any, setup: Any, kind: str) -> None:
    path, body, _, model, action = ENDPOINTS[kind]
    before = count(model, setup.tenant.id)
    audited = audit_count(action, setup.tenant.id)
    headers = {**setup.headers, "Idempotency-Key": f"retry-{kind}"}

    first = client.post(path, headers=headers, json=body)
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    second = client.post(path, headers=headers, json=body)
    assert second.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"

    expected = dict(first.get_json())
    if kind == "tokens":
        assert first.get_json()["token"].startswith("ens_")
        expected["token"] = None  # the secret is never stored, so it replays as null
    assert second.get_json() == expected
    assert count(model, setup.tenant.id) == before + 1
    assert audit_count(action, setup.tenant.id) == audited + 1


def test_replayed_invitation_sends_one_mail(client: Any, setup: Any, mailbox: Any) -> None:
    path, body, _, _, _ = ENDPOINTS["invitations"]
    headers = {**setup.headers, "Idempotency-Key": "invite-once"}
    assert client.post(path, headers=headers, json=body).status_code == 201
    assert client.post(path, headers=headers, json=body).status_code == 201
    mailbox.wait_for(body["email"])
    # Mail goes out synchronously at the request's commit: a second one would be here already.
    assert [m["To"] for m in mailbox.messages].count(body["email"]) == 1


@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_same_key_with_another_body_is_409(client: Any, setup: Any, kind: str) -> None:
    path, body, other, model, _ = ENDPOINTS[kind]
    headers = {**setup.headers, "Idempotency-Key": "reused"}
    assert client.post(path, headers=headers, json=body).status_code == 201
    before = count(model, setup.tenant.id)

    response = client.post(path, headers=headers, json=other)
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "idempotency_key_reused"
    assert count(model, setup.tenant.id) == before


def test_same_key_on_another_endpoint_is_409(client: Any, setup: Any) -> None:
    headers = {**setup.headers, "Idempotency-Key": "shared"}
    assert client.post("/api/v1/tokens", headers=headers,
                       json=ENDPOINTS["tokens"][1]).status_code == 201
    response = client.post("/api/v1/invitations", headers=headers,
                           json=ENDPOINTS["invitations"][1])
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "idempotency_key_reused"


def test_keys_are_per_tenant(client: Any, setup: Any) -> None:
    other = tenant_with_owner()
    headers = {"Idempotency-Key": "same-key-everywhere"}
    body = ENDPOINTS["tokens"][1]
    mine = client.post("/api/v1/tokens", headers={**setup.headers, **headers}, json=body)
    theirs = client.post("/api/v1/tokens", headers={**other.headers, **headers}, json=body)
    assert mine.status_code == theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs.headers
    assert theirs.get_json()["id"] != mine.get_json()["id"]
    assert theirs.get_json()["token"] is not None
    assert db.session.get(ApiToken, theirs.get_json()["id"]).tenant_id == other.tenant.id


def test_a_failed_request_is_not_stored_and_can_be_retried(client: Any, setup: Any) -> None:
    headers = {**setup.headers, "Idempotency-Key": "first-try-was-bad"}
    bad = client.post("/api/v1/tokens", headers=headers, json={"name": "", "scope": "write"})
    assert bad.status_code == 422
    good = client.post("/api/v1/tokens", headers=headers, json={"name": "ok", "scope": "write"})
    assert good.status_code == 201
    assert "Idempotent-Replayed" not in good.headers


def test_an_expired_key_acts_again(client: Any, setup: Any) -> None:
    headers = {**setup.headers, "Idempotency-Key": "old"}
    body = ENDPOINTS["tokens"][1]
    first = client.post("/api/v1/tokens", headers=headers, json=body).get_json()
    record = db.session.execute(
        select(IdempotencyRecord).where(IdempotencyRecord.tenant_id == setup.tenant.id)
    ).scalar_one()
    record.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    db.session.commit()

    second = client.post("/api/v1/tokens", headers=headers, json=body)
    assert second.status_code == 201
    assert "Idempotent-Replayed" not in second.headers
    assert second.get_json()["id"] != first["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "bad key with spaces", "tab\tkey", "ключ"])
def test_malformed_key_is_422(client: Any, setup: Any, key: str) -> None:
    response = client.post("/api/v1/tokens", headers={**setup.headers, "Idempotency-Key": key},
                           json=ENDPOINTS["tokens"][1])
    assert response.status_code == 422
    assert "Idempotency-Key" in response.get_json()["error"]["details"]
    assert count(ApiToken, setup.tenant.id) == 1


def test_key_of_255_characters_is_accepted(client: Any, setup: Any) -> None:
    headers = {**setup.headers, "Idempotency-Key": "k" * 255}
    assert client.post("/api/v1/tokens", headers=headers,
                       json=ENDPOINTS["tokens"][1]).status_code == 201


@pytest.mark.parametrize("kind", list(ENDPOINTS))
def test_read_token_cannot_replay_a_write(client: Any, setup: Any, kind: str) -> None:
    """Authorisation comes before the stored answer: a read token gets 403, not a replay."""
    path, body, other, _, _ = ENDPOINTS[kind]
    _, reader = make_token(setup.tenant, TokenScope.READ)
    headers = {"Idempotency-Key": "written-by-the-owner"}
    assert client.post(path, headers={**setup.headers, **headers}, json=body).status_code == 201

    for attempt in (body, other):
        response = client.post(path, headers={**auth(reader), **headers}, json=attempt)
        assert response.status_code == 403, response.get_json()
        assert response.get_json()["error"]["code"] == "forbidden"
