"""Platform administration and what a suspended tenant's members see."""

from __future__ import annotations

from typing import Any

import pytest

from accounts import services
from accounts.models import TenantStatus
from core.db import db
from tests.factories import UserFactory, tenant_with_owner
from tests.portal.helpers import login, post, text


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


@pytest.fixture
def admin(app: Any) -> Any:
    return UserFactory(platform_admin=True)


def test_admin_pages_do_not_exist_for_others(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    assert client.get("/admin/tenants").status_code == 404
    assert post(client, f"/admin/tenants/{setup.tenant.id}/suspend", {"reason": "x"},
                page="/").status_code == 404
    db.session.refresh(setup.tenant)
    assert setup.tenant.status is TenantStatus.ACTIVE


def test_anonymous_admin_page_asks_to_log_in(client: Any) -> None:
    assert client.get("/admin/tenants").status_code == 302


def test_admin_suspends_and_reactivates(client: Any, setup: Any, admin: Any) -> None:
    login(client, admin.email)
    page = text(client.get("/admin/tenants"))
    assert setup.tenant.slug in page
    assert post(client, f"/admin/tenants/{setup.tenant.id}/suspend", {"reason": ""},
                page="/admin/tenants").status_code == 302
    db.session.refresh(setup.tenant)
    assert setup.tenant.status is TenantStatus.ACTIVE  # a reason is required

    response = post(client, f"/admin/tenants/{setup.tenant.id}/suspend",
                    {"reason": "unpaid invoices"}, page="/admin/tenants")
    assert response.status_code == 302
    db.session.refresh(setup.tenant)
    assert setup.tenant.status is TenantStatus.SUSPENDED
    assert setup.tenant.suspended_reason == "unpaid invoices"

    assert post(client, f"/admin/tenants/{setup.tenant.id}/reactivate",
                page="/admin/tenants").status_code == 302
    db.session.refresh(setup.tenant)
    assert setup.tenant.status is TenantStatus.ACTIVE


def test_suspended_tenant_is_read_only(client: Any, setup: Any) -> None:
    services.set_tenant_status(setup.tenant, TenantStatus.SUSPENDED, "unpaid invoices")
    db.session.commit()
    login(client, setup.owner.email)
    page = client.get("/team")
    assert page.status_code == 200
    assert 'data-testid="suspended-banner"' in text(page) and "unpaid invoices" in text(page)
    assert 'data-testid="invite-form"' not in text(page)
    assert post(client, "/team/invite", {"email": "x@example.com", "role": "viewer"},
                page="/team").status_code == 403
    assert post(client, "/tokens", {"name": "t", "scope": "read"}, page="/").status_code == 403
    # The user's own settings stay available.
    assert client.get("/settings").status_code == 200
