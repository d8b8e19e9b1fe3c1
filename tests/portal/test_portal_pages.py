"""Dashboard, tenant switcher, audit log, error pages and the vendored front-end files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from accounts import audit
from accounts.models import AuditEntry, Role
from core.db import db
from portal import vendor
from tests.factories import MembershipFactory, UserFactory, tenant_with_owner
from tests.portal.helpers import login, post, text


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def test_dashboard_shows_the_tenant(client: Any, setup: Any) -> None:
    MembershipFactory(tenant=setup.tenant, user=UserFactory(), role=Role.VIEWER)
    login(client, setup.owner.email)
    page = text(client.get("/"))
    assert setup.tenant.name in page and setup.tenant.currency in page
    assert 'data-testid="dashboard-members">2<' in page


def test_user_without_membership_gets_an_empty_dashboard(client: Any, app: Any) -> None:
    user = UserFactory()
    login(client, user.email)
    page = client.get("/")
    assert page.status_code == 200
    assert "You are not a member of any organisation yet" in text(page)
    assert client.get("/team").status_code == 403


def test_tenant_switcher(client: Any, setup: Any) -> None:
    other = tenant_with_owner()
    MembershipFactory(tenant=other.tenant, user=setup.owner, role=Role.VIEWER)
    login(client, setup.owner.email)
    page = text(client.get("/"))
    assert 'data-testid="tenant-switcher"' in page
    response = post(client, "/tenant/switch", {"tenant_id": str(other.tenant.id), "next": "/team"},
                    page="/")
    assert response.headers["Location"] == "/team"
    page = text(client.get("/"))
    assert f'data-testid="dashboard-tenant">{other.tenant.name}<' in page
    # A viewer there: no invite form.
    assert 'data-testid="invite-form"' not in text(client.get("/team"))
    # A tenant the user is not a member of cannot be chosen.
    stranger = tenant_with_owner()
    assert post(client, "/tenant/switch", {"tenant_id": str(stranger.tenant.id)},
                page="/").status_code == 404


def test_audit_log_newest_first_with_pages(client: Any, setup: Any) -> None:
    for n in range(60):
        audit.record(f"test.event{n}", tenant_id=setup.tenant.id)
    audit.record("test.elsewhere", tenant_id=tenant_with_owner().tenant.id)
    db.session.commit()
    newest_first = list(db.session.execute(
        select(AuditEntry.action).where(AuditEntry.tenant_id == setup.tenant.id)
        .order_by(AuditEntry.id.desc())
    ).scalars())
    login(client, setup.owner.email)
    first = text(client.get("/audit"))
    actions = re.findall(r'data-testid="audit-row" data-action="([^"]+)"', first)
    assert actions == newest_first[:50]
    assert "test.elsewhere" not in first and 'data-testid="audit-newest"' not in first
    cursor = re.search(r'href="/audit\?cursor=([^"]+)"', first)
    assert cursor
    second = text(client.get(f"/audit?cursor={cursor.group(1)}"))
    more = re.findall(r'data-testid="audit-row" data-action="([^"]+)"', second)
    # The login itself happened after the cursor was made, so it cannot shift the pages.
    assert more == newest_first[50:]
    assert 'data-testid="audit-older"' not in second
    assert client.get("/audit?cursor=%25%25").status_code == 422


def test_audit_log_needs_audit_read(client: Any, setup: Any) -> None:
    viewer = UserFactory()
    MembershipFactory(tenant=setup.tenant, user=viewer, role=Role.VIEWER)
    login(client, viewer.email)
    assert client.get("/audit").status_code == 403


def test_error_page_for_anonymous_visitors(client: Any) -> None:
    response = client.get("/no/such/page")
    assert response.status_code == 404
    page = text(response)
    assert 'data-testid="error-page"' in page and 'data-testid="error-code">not_found<' in page


def test_error_page_for_logged_in_users(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    page = text(client.get("/no/such/page"))
    assert 'data-testid="error-page"' in page and setup.owner.email in page


def test_vendor_files_are_served(client: Any) -> None:
    with client.get("/static/vendor/bootstrap/dist/css/bootstrap.min.css") as css:
        assert css.status_code == 200 and css.mimetype == "text/css"
        assert b"Bootstrap" in css.data
    with client.get("/static/vendor/swagger-ui-dist/swagger-ui-bundle.js") as js:
        assert js.status_code == 200 and js.data
    assert client.get("/api/v1/docs").status_code == 200


@pytest.mark.parametrize("path", [
    "/static/vendor/bootstrap/../../package.json",
    "/static/vendor/bootstrap/..%2f..%2fpackage.json",
    "/static/vendor/bootstrap/%2e%2e/%2e%2e/pyproject.toml",
    "/static/vendor/@scarf/scarf/package.json",
    "/static/vendor/.bin/anything",
    "/static/vendor/bootstrap/no-such-file.css",
])
def test_vendor_paths_outside_the_packages_are_not_found(client: Any, path: str) -> None:
    assert client.get(path).status_code == 404


def test_vendor_without_node_modules_is_not_found(client: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vendor, "NODE_MODULES", tmp_path / "node_modules")
    response = client.get("/static/vendor/bootstrap/dist/css/bootstrap.min.css")
    assert response.status_code == 404
