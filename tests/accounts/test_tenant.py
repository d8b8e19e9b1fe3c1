"""The caller's tenant: read it, change its settings; tenants are created and suspended."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from accounts import services
from accounts.models import AuditEntry, TenantStatus
from core.db import db
from core.errors import ValidationFailed
from tests.factories import TenantFactory, tenant_with_owner


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner(name="Shenzhen Audio Co", currency="cny",
                             timezone="Asia/Shanghai")


def test_get_tenant(client: Any, setup: Any) -> None:
    body = client.get("/api/v1/tenant", headers=setup.headers).get_json()
    assert body == {
        "id": str(setup.tenant.id), "name": "Shenzhen Audio Co", "slug": "shenzhen-audio-co",
        "currency": "CNY", "timezone": "Asia/Shanghai", "status": "active",
        "require_two_factor": False, "created_at": body["created_at"],
    }


def test_update_tenant(client: Any, setup: Any) -> None:
    response = client.patch("/api/v1/tenant", headers=setup.headers, json={
        "name": "Shenzhen Audio Ltd", "timezone": "Europe/Berlin", "require_two_factor": True})
    assert response.status_code == 200
    body = response.get_json()
    assert (body["name"], body["timezone"], body["require_two_factor"]) == (
        "Shenzhen Audio Ltd", "Europe/Berlin", True)
    assert body["slug"] == "shenzhen-audio-co"  # slugs are stable
    again = client.get("/api/v1/tenant", headers=setup.headers).get_json()
    assert again == body


@pytest.mark.parametrize("body", [
    {"timezone": "Mars/Olympus_Mons"},
    {"name": ""},
    {"require_two_factor": "sometimes"},
    {"currency": "USD"},  # not changeable here
    {"status": "suspended"},  # only a platform admin suspends
])
def test_invalid_update_is_422_and_changes_nothing(client: Any, setup: Any,
                                                   body: dict[str, Any]) -> None:
    before = client.get("/api/v1/tenant", headers=setup.headers).get_json()
    response = client.patch("/api/v1/tenant", headers=setup.headers, json=body)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_failed"
    assert set(error["details"]) == set(body)
    assert client.get("/api/v1/tenant", headers=setup.headers).get_json() == before


def test_update_without_changes_records_nothing(client: Any, setup: Any) -> None:
    def updates() -> int:
        return len(db.session.execute(select(AuditEntry).where(
            AuditEntry.tenant_id == setup.tenant.id, AuditEntry.action == "tenant.update")
        ).all())

    assert client.patch("/api/v1/tenant", headers=setup.headers,
                        json={"name": "Shenzhen Audio Co"}).status_code == 200
    assert updates() == 0


def test_create_tenant_makes_unique_slugs(app: Any) -> None:
    first = TenantFactory(name="Acme Robotics")
    second = TenantFactory(name="Acme  Robotics!")
    assert first.slug == "acme-robotics"
    assert second.slug == "acme-robotics-2"


@pytest.mark.parametrize(("currency", "timezone", "field"), [
    ("XXY", "UTC", "currency"), ("EUR", "Nowhere/Land", "timezone"), ("", "UTC", "currency")])
def test_create_tenant_validates(app: Any, currency: str, timezone: str, field: str) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        services.create_tenant("Bad Tenant", currency, timezone)
    assert field in invalid.value.details


def test_suspend_and_reactivate(app: Any, client: Any, setup: Any) -> None:
    services.set_tenant_status(setup.tenant, TenantStatus.SUSPENDED, "fraud check")
    assert setup.tenant.suspended_reason == "fraud check"
    response = client.get("/api/v1/tenant", headers=setup.headers)
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "tenant_suspended"
    services.set_tenant_status(setup.tenant, TenantStatus.ACTIVE)
    assert setup.tenant.suspended_reason is None
    assert client.get("/api/v1/tenant", headers=setup.headers).get_json()["status"] == "active"
    actions = db.session.execute(select(AuditEntry.action).where(
        AuditEntry.tenant_id == setup.tenant.id)).scalars().all()
    assert {"tenant.suspend", "tenant.reactivate"} <= set(actions)
