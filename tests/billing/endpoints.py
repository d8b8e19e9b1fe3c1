"""The billing endpoints for the API-walking tests (see tests/core/endpoints.py)."""

from __future__ import annotations

from typing import Any

from accounts.models import Role, Tenant
from billing import purchases
from billing.models import Notification, Purchase, WebhookDelivery
from core.db import db
from tests.billing.helpers import make_offer, make_plan
from tests.billing.webhook_helpers import make_delivery, make_notification, with_endpoint
from tests.core.endpoints import ALL_ROLES, Endpoint

READ = "billing:read"
WRITE = "billing:write"
BUYERS = frozenset({Role.OWNER, Role.FINANCE})


def _pack_order(tenant: Tenant) -> dict[str, Any]:
    plan = make_plan(prices={tenant.currency: (1000, "0.1")})
    return {"plan_id": str(plan.id), "quantity": 2}


def _package_order(tenant: Tenant) -> dict[str, Any]:
    return {"offer_id": str(make_offer().id), "quantity": 1}


def _seats(tenant: Tenant) -> dict[str, Any]:
    """Seats for the device (if active) and one free, so a renewal can succeed."""
    plan = make_plan(prices={tenant.currency: (1000, "0.1")})
    purchases.mark_paid(purchases.order_pack(tenant.id, tenant.currency, plan.id, 2))
    db.session.commit()
    return {}


PURCHASE = "/api/v1/billing/purchases/<purchase_id>"
WEBHOOK = "/api/v1/billing/webhook"
PUBLIC_URL = "https://93.184.215.14/ensoul"  # a public address: no DNS needed

ENDPOINTS = {
    ("/api/v1/billing/plans", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/billing/package-offers", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/billing/purchases", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/billing/purchases/licence-packs", "POST"): Endpoint(WRITE, BUYERS, _pack_order),
    ("/api/v1/billing/purchases/packages", "POST"): Endpoint(WRITE, BUYERS, _package_order),
    (PURCHASE, "GET"): Endpoint(READ, ALL_ROLES),
    (f"{PURCHASE}/cancel", "POST"): Endpoint(WRITE, BUYERS, {}),
    ("/api/v1/billing/licence-packs", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/devices/<device_id>/licence", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/billing/packages", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/billing/statement", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/devices/<device_id>/cost", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/devices/<device_id>/licence/renew", "POST"): Endpoint(WRITE, BUYERS, _seats),
    ("/api/v1/billing/policy", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/billing/policy", "PUT"): Endpoint(WRITE, BUYERS,
                                                {"overage_allowed": True,
                                                 "overage_cap_credits": 100}),
    ("/api/v1/billing/notifications", "GET"): Endpoint(READ, ALL_ROLES),
    ("/api/v1/billing/notifications/<notification_id>/read", "POST"): Endpoint(WRITE, BUYERS,
                                                                                {}),
    # The webhook's own endpoints answer 404 until it exists: their "body" configures it.
    (WEBHOOK, "GET"): Endpoint(READ, ALL_ROLES, with_endpoint()),
    (WEBHOOK, "PUT"): Endpoint(WRITE, BUYERS, {"url": PUBLIC_URL}),
    (WEBHOOK, "DELETE"): Endpoint(WRITE, BUYERS, with_endpoint()),
    (f"{WEBHOOK}/rotate-secret", "POST"): Endpoint(WRITE, BUYERS, with_endpoint({})),
    (f"{WEBHOOK}/test", "POST"): Endpoint(WRITE, BUYERS, with_endpoint({})),
    (f"{WEBHOOK}/deliveries", "GET"): Endpoint(READ, ALL_ROLES),
    (f"{WEBHOOK}/deliveries/<delivery_id>", "GET"): Endpoint(READ, ALL_ROLES),
    (f"{WEBHOOK}/deliveries/<delivery_id>/retry", "POST"): Endpoint(WRITE, BUYERS, {}),
}


def _purchase(tenant: Tenant) -> Purchase:
    plan = make_plan(prices={tenant.currency: (1000, "0.1")})
    purchase = purchases.order_pack(tenant.id, tenant.currency, plan.id, 1)
    db.session.commit()
    return purchase


CREATORS: dict[type, Any] = {
    Purchase: _purchase,
    Notification: make_notification,
    WebhookDelivery: make_delivery,
}
