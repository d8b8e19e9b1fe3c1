"""The notifications page (with the nav's unread count) and the webhook page (the endpoint,
its secret shown once, the delivery log): roles, CSRF and tenancy as on the other pages."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select

from accounts.models import Role
from billing import notification_tasks, webhooks
from billing.models import WebhookDelivery, WebhookEndpoint
from core.db import db, utcnow
from fleet.models import DeviceStatus
from tests.billing.webhook_helpers import make_delivery, receiver
from tests.fleet.fixtures import Vendor
from tests.portal.fleet_helpers import log_in_as, make_device
from tests.portal.helpers import post, text

WRITERS = (Role.OWNER, Role.FINANCE)


def endpoint_of(vendor: Vendor) -> WebhookEndpoint | None:
    db.session.expire_all()
    return webhooks.get_endpoint(vendor.setup.tenant.id)


@pytest.mark.parametrize("role", list(Role))
def test_every_role_sees_the_pages_and_only_owner_and_finance_configure(
        client: Any, vendor: Vendor, role: Role) -> None:
    log_in_as(client, vendor, role)
    for url in ("/notifications", "/billing/webhook"):
        assert client.get(url).status_code == 200, url
    page = text(client.get("/billing/webhook"))
    writer = role in WRITERS
    assert ('data-testid="webhook-form"' in page) is writer
    saved = post(client, "/billing/webhook", {"url": "https://93.184.215.14/hook",
                                              "enabled": "y"}, page="/notifications")
    assert saved.status_code == (200 if writer else 403)
    assert (endpoint_of(vendor) is not None) is writer


def test_the_nav_counts_unread_notifications_until_they_are_read(
        client: Any, vendor: Vendor) -> None:
    make_device(vendor.product, status=DeviceStatus.ACTIVE)  # no seat anywhere
    log_in_as(client, vendor)
    assert 'data-testid="notifications-badge"' not in text(client.get("/"))
    notification_tasks.check_notifications()
    home = text(client.get("/"))
    assert re.search(r'data-testid="notifications-badge"[^>]*>1<', home)
    page = text(client.get("/notifications"))
    assert "No free licence seat is left; 1 active device has no licence." in page
    assert 'data-testid="notification-unread"' in page

    refused = client.post("/notifications/read", data={})
    assert refused.status_code == 400 and "csrf_failed" in text(refused)
    assert post(client, "/notifications/read", page="/notifications").status_code == 302
    assert 'data-testid="notifications-badge"' not in text(client.get("/notifications"))


def test_the_secret_is_shown_once_and_the_form_needs_the_csrf_token(
        client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    data = {"url": "https://93.184.215.14/hook", "enabled": "y"}
    refused = client.post("/billing/webhook", data=data)
    assert refused.status_code == 400 and "csrf_failed" in text(refused)
    assert client.post("/billing/webhook", data={**data, "csrf_token": "forged"}
                       ).status_code == 400
    assert endpoint_of(vendor) is None

    created = post(client, "/billing/webhook", data)
    assert created.status_code == 200 and created.headers["Cache-Control"] == "no-store"
    secret = re.search(r'data-testid="webhook-secret">(whsec_[^<]+)<', text(created))
    assert secret
    endpoint = endpoint_of(vendor)
    assert endpoint is not None and endpoint.secret_hint == secret.group(1)[-4:]
    again = text(client.get("/billing/webhook"))
    assert secret.group(1) not in again and "93.184.215.14/hook" in again

    rotated = post(client, "/billing/webhook/rotate-secret", page="/billing/webhook")
    new = re.search(r'data-testid="webhook-secret">(whsec_[^<]+)<', text(rotated))
    assert new and new.group(1) != secret.group(1)


def test_a_private_url_is_refused_on_the_form(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    refused = post(client, "/billing/webhook", {"url": "http://169.254.169.254/latest",
                                                "enabled": "y"})
    assert refused.status_code == 403  # address_not_allowed, as on the API
    assert "public addresses only" in text(refused)
    assert endpoint_of(vendor) is None


def test_the_delivery_log_shows_each_attempt(client: Any, vendor: Vendor, app: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.config, "ENSOUL_WEBHOOK_ALLOW_PRIVATE", True)
    log_in_as(client, vendor)
    with receiver(500, 200) as hook:
        post(client, "/billing/webhook", {"url": hook.url, "enabled": "y"})
        assert post(client, "/billing/webhook/test", page="/billing/webhook"
                    ).status_code == 302
        delivery = db.session.scalars(select(WebhookDelivery).where(
            WebhookDelivery.tenant_id == vendor.setup.tenant.id)).one()
        first = notification_tasks.run_delivery(delivery.id, utcnow())
        page = text(client.get("/billing/webhook"))
        assert re.findall(r'data-testid="attempt-status">(\d+)<', page) == ["500"]
        assert "the receiver answered 500" in page and "retry at" in page
        assert post(client, f"/billing/webhook/deliveries/{delivery.id}/retry",
                    page="/billing/webhook").status_code == 302
        notification_tasks.run_delivery(delivery.id, first.next_attempt_at)
        hook.get()
        hook.get()
    page = text(client.get("/billing/webhook"))
    assert re.findall(r'data-testid="attempt-status">(\d+)<', page) == ["500", "200"]
    assert 'data-status="succeeded"' in page


def test_another_tenants_delivery_is_not_found(client: Any, vendor: Vendor,
                                               other_vendor: Vendor) -> None:
    theirs = make_delivery(other_vendor.setup.tenant)
    log_in_as(client, vendor)
    answer = post(client, f"/billing/webhook/deliveries/{theirs.id}/retry",
                  page="/billing/webhook")
    assert answer.status_code == 404
    assert str(theirs.id) not in text(client.get("/billing/webhook"))
