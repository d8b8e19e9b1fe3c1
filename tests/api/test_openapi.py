"""The OpenAPI document is valid, documents every endpoint, and schemathesis finds no 5xx."""

from __future__ import annotations

import re
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate

from accounts import services
from accounts.models import Role, TokenScope


def test_openapi_document_is_valid_openapi_3(client: Any) -> None:
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    spec = response.get_json()
    assert spec["openapi"].startswith("3.")
    validate(spec)


def test_every_api_route_is_documented(app: Any, client: Any) -> None:
    spec = client.get("/api/v1/openapi.json").get_json()
    documented = {
        (path, method.upper()) for path, item in spec["paths"].items() for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }
    routes = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.endpoint.startswith("api-docs"):
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method))
    assert routes, "no API routes found"
    assert routes <= documented, f"undocumented: {sorted(routes - documented)}"


def test_the_docs_page_is_served_without_a_cdn(client: Any) -> None:
    page = client.get("/api/v1/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/static/vendor/swagger-ui-dist/" in html
    assert "cdn" not in html.lower()


@pytest.fixture
def seeded_token(app: Any) -> str:
    owner = services.create_user("fuzz-owner@example.com", "correct horse battery")
    tenant = services.create_tenant("Fuzz Ltd", "CNY", "Asia/Shanghai")
    services.add_member(tenant, owner, Role.OWNER)
    services.invite(tenant, "invitee@example.com", Role.VIEWER, owner)
    _, raw = services.create_token(tenant, "fuzz", TokenScope.WRITE, owner)
    return raw


def test_api_fuzz_no_server_error_and_schema_conformance(app: Any, seeded_token: str) -> None:
    """Every operation, positive and negative examples, all of schemathesis's default checks."""
    api_schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    headers = {"Authorization": f"Bearer {seeded_token}"}
    failures: dict[str, str] = {}
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case: Any) -> None:
            case.call_and_validate(headers=headers)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures[operation.label] = str(exc)[:2000]
    assert operations >= 10
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
