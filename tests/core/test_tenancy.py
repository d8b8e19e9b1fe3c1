"""Tenant scoping: another tenant's rows answer 404 on every endpoint and never appear in lists.

The endpoints are found in the URL map: every view marked with ``core.tenancy.owned_resource``
is checked, so a new resource type joins this test by being marked. Its model needs a creator
in ``CREATORS`` below, or the test fails and says so.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask import g
from sqlalchemy import select

from accounts.models import ApiToken, AuditEntry, Invitation, Membership, Tenant
from billing.models import PackageOffer, Plan
from core.db import Base, db
from core.errors import NotFound, Unauthorized
from core.models import IdempotencyRecord
from core.tenancy import get_owned, scoped, set_current_tenant, tenant_owned_models
from tests.core.endpoints import api_routes, creators, endpoints, url_with_rows_of
from tests.factories import make_token, tenant_with_owner

CATALOGUE = (Plan, PackageOffer)


def snapshot(row: Base) -> dict[str, Any] | None:
    """The row's columns as stored now (None once deleted), read past the identity map."""
    table = type(row).__table__  # type: ignore[attr-defined]
    stored = db.session.execute(
        select(table).where(table.c.id == row.id)  # type: ignore[attr-defined]
    ).mappings().one_or_none()
    return None if stored is None else dict(stored)


def test_every_owned_resource_is_checked_across_tenants(client: Any, mailbox: Any) -> None:
    """Each endpoint that looks up a row by id answers 404 for another tenant's row."""
    mine = tenant_with_owner()
    theirs = tenant_with_owner()
    owned = [route for route in api_routes(client.application) if route.model is not None]
    assert owned, "no view is marked with owned_resource: the walk found nothing"
    missing = sorted({r.model.__name__ for r in owned if r.model not in creators()})  # type: ignore[union-attr]
    failures = [f"no creator for {name}: add one to CREATORS in tests/<domain>/endpoints.py"
                for name in missing]
    for route in owned:
        if route.model not in creators():
            continue
        url, row = url_with_rows_of(route, theirs.tenant)
        assert row.tenant_id == theirs.tenant.id
        before = snapshot(row)
        endpoint = endpoints().get(route.key)
        if route.method not in ("GET", "DELETE") and endpoint is None:
            failures.append(f"{route.method} {route.rule}: no row (with a valid body) in "
                            "ENDPOINTS, so a 404 could hide behind a 422")
            continue
        response = client.open(url, method=route.method, headers=mine.headers,
                               **(endpoint.request(mine.tenant) if endpoint else {}))
        error = (response.get_json(silent=True) or {}).get("error", {})
        if response.status_code != 404 or error.get("code") != "not_found":
            failures.append(f"{route.method} {route.rule}: {response.status_code} {error}")
        if snapshot(row) != before:
            failures.append(f"{route.method} {route.rule}: changed the other tenant's row")
    assert not failures, "\n".join(failures)


def test_lists_never_show_another_tenants_rows(client: Any, mailbox: Any) -> None:
    mine = tenant_with_owner()
    theirs = tenant_with_owner()
    own_ids = set()
    for create in creators().values():
        own_ids.add(str(create(mine.tenant).id))
        create(theirs.tenant)
    secrets = {str(theirs.tenant.id), theirs.owner.email, theirs.tenant.slug}
    for model in [*tenant_owned_models(), AuditEntry]:
        table = model.__table__  # type: ignore[attr-defined]
        for row in db.session.execute(select(table).where(table.c.tenant_id == theirs.tenant.id)):
            secrets |= {str(value) for value in row if isinstance(value, uuid.UUID)}
    secrets -= {str(mine.tenant.id)}  # an audit entry may name both tenants
    # The platform's catalogue is public: their purchase names a plan every tenant may list.
    for model in CATALOGUE:
        secrets -= {str(row_id) for row_id in db.session.scalars(select(model.id))}

    lists = [r for r in api_routes(client.application) if r.method == "GET" and not r.arguments]
    assert {r.rule for r in lists} >= {"/api/v1/members", "/api/v1/invitations",
                                       "/api/v1/tokens", "/api/v1/audit-log"}
    shown = ""
    for route in lists:
        response = client.get(route.rule, headers=mine.headers)
        assert response.status_code == 200, route.rule
        text = response.get_data(as_text=True)
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, f"{route.rule} shows another tenant's {leaked}"
        shown += text
    # Not vacuous: the lists do show the caller's own rows.
    assert {i for i in own_ids if i not in shown} == set()


def test_get_owned_refuses_other_tenants_and_bad_ids(app: Any) -> None:
    mine = tenant_with_owner()
    theirs = tenant_with_owner()
    token = make_token(theirs.tenant)[0]
    with app.test_request_context("/"):
        set_current_tenant(theirs.tenant.id)
        assert get_owned(ApiToken, token.id) is token
        assert get_owned(ApiToken, str(token.id)) is token
        set_current_tenant(mine.tenant.id)
        for bad in (token.id, str(token.id), "nope", uuid.uuid4()):
            with pytest.raises(NotFound):
                get_owned(ApiToken, bad)
        assert get_owned(ApiToken, token.id, theirs.tenant.id) is token


def test_scoped_needs_a_tenant_and_a_tenant_owned_model(app: Any) -> None:
    with app.test_request_context("/"):
        assert "tenant_id" not in g
        with pytest.raises(Unauthorized):
            db.session.execute(scoped(ApiToken))
    with pytest.raises(TypeError):
        scoped(Tenant, uuid.uuid4())  # type: ignore[type-var]


def test_tenant_owned_models_are_found() -> None:
    assert {ApiToken, Invitation, Membership, IdempotencyRecord} <= set(tenant_owned_models())
    assert Tenant not in tenant_owned_models()
