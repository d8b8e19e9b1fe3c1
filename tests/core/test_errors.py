"""One error shape everywhere: ``{"error": {"code", "message", "details"}}`` with a precise code."""

from __future__ import annotations

from typing import Any

import pytest

from accounts import services
from accounts.models import TenantStatus, TokenScope
from tests.factories import auth, make_token, tenant_with_owner


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    return error


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def test_malformed_json_is_400(client: Any, setup: Any) -> None:
    response = client.post("/api/v1/tokens", headers=setup.headers, data='{"name": "x",',
                           content_type="application/json")
    assert_error(response, 400, "malformed_json")


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"name": 3, "scope": "read"}, {"name"}),
        ({"name": "ci", "scope": "admin"}, {"scope"}),
        ({"name": "ci", "scope": "read", "is_admin": True}, {"is_admin"}),
        ({}, {"name", "scope"}),
        ({"name": "", "scope": "read"}, {"name"}),
        ({"name": None, "scope": "read"}, {"name"}),
    ],
    ids=["wrong-type", "bad-enum", "unknown-field", "missing-fields", "empty-name", "null-name"],
)
def test_invalid_fields_are_422_with_per_field_details(
    client: Any, setup: Any, body: dict[str, Any], fields: set[str]
) -> None:
    response = client.post("/api/v1/tokens", headers=setup.headers, json=body)
    error = assert_error(response, 422, "validation_failed")
    assert set(error["details"]) == fields
    for messages in error["details"].values():
        assert messages and all(isinstance(m, str) and m for m in messages)


def test_a_json_array_instead_of_an_object_is_422(client: Any, setup: Any) -> None:
    response = client.post("/api/v1/tokens", headers=setup.headers, json=[1, 2])
    error = assert_error(response, 422, "validation_failed")
    assert error["details"]


def test_bad_query_parameter_is_422(client: Any, setup: Any) -> None:
    response = client.get("/api/v1/tokens?limit=zero", headers=setup.headers)
    error = assert_error(response, 422, "validation_failed")
    assert list(error["details"]) == ["limit"]


def test_oversized_body_is_413_and_creates_nothing(app: Any, client: Any, setup: Any) -> None:
    limit = app.config["MAX_CONTENT_LENGTH"]
    assert limit == app.config["ENSOUL_MAX_BODY_BYTES"]
    body = '{"name": "' + "x" * limit + '", "scope": "read"}'
    response = client.post("/api/v1/tokens", headers=setup.headers, data=body,
                           content_type="application/json")
    assert_error(response, 413, "too_large")
    listed = client.get("/api/v1/tokens", headers=setup.headers).get_json()["items"]
    assert len(listed) == 1  # only the setup's own token


def test_unknown_route_is_a_json_404(client: Any, setup: Any) -> None:
    assert_error(client.get("/api/v1/no-such-thing", headers=setup.headers), 404, "not_found")


def test_unknown_id_and_malformed_id_are_404(client: Any, setup: Any) -> None:
    for token_id in ("00000000-0000-7000-8000-000000000000", "not-a-uuid"):
        response = client.get(f"/api/v1/tokens/{token_id}", headers=setup.headers)
        assert_error(response, 404, "not_found")


def test_wrong_method_is_405_with_allow_header(client: Any, setup: Any) -> None:
    response = client.put("/api/v1/tokens", headers=setup.headers, json={})
    assert_error(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["Allow"].split(",")} >= {"GET", "POST"}


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer    ", "Basic dXNlcjpwYXNz", "Token ens_abc"],
    ids=["absent", "empty", "scheme-only", "blank-secret", "basic", "other-scheme"],
)
def test_missing_token_is_401_unauthorized(client: Any, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    assert_error(client.get("/api/v1/tenant", headers=headers), 401, "unauthorized")


@pytest.mark.parametrize("raw", ["ens_not-a-real-token", "garbage", "ens_" + "a" * 400])
def test_unknown_token_is_401_invalid_token(client: Any, raw: str) -> None:
    assert_error(client.get("/api/v1/tenant", headers=auth(raw)), 401, "invalid_token")


def test_bearer_scheme_is_case_insensitive(client: Any, setup: Any) -> None:
    response = client.get("/api/v1/tenant", headers={"Authorization": f"bearer {setup.token}"})
    assert response.status_code == 200


def test_revoked_token_is_401_invalid_token(app: Any, client: Any, setup: Any) -> None:
    token, raw = make_token(setup.tenant, TokenScope.WRITE)
    assert client.get("/api/v1/tenant", headers=auth(raw)).status_code == 200
    response = client.delete(f"/api/v1/tokens/{token.id}", headers=setup.headers)
    assert response.status_code == 204
    assert_error(client.get("/api/v1/tenant", headers=auth(raw)), 401, "invalid_token")


def test_read_token_on_a_write_endpoint_is_403(client: Any, setup: Any) -> None:
    _, raw = make_token(setup.tenant, TokenScope.READ)
    response = client.post("/api/v1/tokens", headers=auth(raw), json={"name": "x", "scope": "read"})
    error = assert_error(response, 403, "forbidden")
    assert error["details"] == {"permission": "tokens:write"}


def test_suspended_tenants_token_is_403_tenant_suspended(app: Any, client: Any,
                                                         setup: Any) -> None:
    services.set_tenant_status(setup.tenant, TenantStatus.SUSPENDED, "unpaid invoices")
    assert_error(client.get("/api/v1/tenant", headers=setup.headers), 403, "tenant_suspended")
    services.set_tenant_status(setup.tenant, TenantStatus.ACTIVE)
    assert client.get("/api/v1/tenant", headers=setup.headers).status_code == 200


def test_health_endpoints_and_openapi_need_no_token(client: Any) -> None:
    assert client.get("/healthz").status_code == 200
    spec = client.get("/api/v1/openapi.json")
    assert spec.status_code == 200
    assert spec.get_json()["openapi"].startswith("3.")
