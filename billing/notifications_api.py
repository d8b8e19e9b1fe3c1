"""REST endpoints of billing notifications and the tenant's webhook endpoint: the
notifications (marked read), the endpoint (configured, its secret rotated, a test event sent)
and its delivery log."""

from __future__ import annotations

from typing import Any

from flask import current_app
from sqlalchemy.orm import selectinload

from accounts import permissions as perm
from accounts.auth import current_tenant, require
from billing import notification_schemas as schemas
from billing import notifications, webhooks
from billing.models import Notification, WebhookDelivery
from core.api import api_blueprint
from core.pagination import PageArgsSchema, paginate
from core.tenancy import get_owned, owned_resource, scoped

blp = api_blueprint("billing_notifications_api", __name__, "/billing",
                    description="Billing notifications and the signed webhooks that carry them")


@blp.route("/notifications", methods=["GET"])
@require(perm.BILLING_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.NotificationPage)
def list_notifications(args: dict[str, Any]) -> Any:
    """Newest first: packages under 20% / 5%, no free seat, licences ending within 30 days."""
    return paginate(scoped(Notification), Notification.id, args, newest_first=True)


@blp.route("/notifications/<notification_id>/read", methods=["POST"])
@owned_resource(Notification)
@require(perm.BILLING_WRITE)
@blp.response(200, schemas.NotificationOut)
def read_notification(notification_id: str) -> Any:
    """Mark it read, for the whole tenant (those who act on billing: `billing:write`);
    marking it again changes nothing."""
    return notifications.mark_read(get_owned(Notification, notification_id))


@blp.route("/webhook", methods=["GET"])
@require(perm.BILLING_READ)
@blp.response(200, schemas.WebhookOut)
def get_webhook() -> Any:
    """The endpoint (404 until one is configured); the secret is never shown again."""
    return webhooks.require_endpoint(current_tenant().id)


@blp.route("/webhook", methods=["PUT"])
@require(perm.BILLING_WRITE)
@blp.arguments(schemas.WebhookIn)
@blp.response(200, schemas.WebhookWithSecretOut)
def put_webhook(data: dict[str, Any]) -> Any:
    """Create the endpoint (the answer carries its new `secret`, once) or change its URL.
    A host that resolves to a private, loopback, link-local or multicast address is refused
    with `422`."""
    endpoint, secret = webhooks.configure(current_tenant().id, data["url"], data["enabled"],
                                          current_app.config)
    return _with_secret(endpoint, secret)


def _with_secret(endpoint: Any, secret: str | None) -> dict[str, Any]:
    return {**{name: getattr(endpoint, name) for name in schemas.WebhookOut().fields},
            "secret": secret}


@blp.route("/webhook", methods=["DELETE"])
@require(perm.BILLING_WRITE)
@blp.response(204)
def delete_webhook() -> None:
    """Remove the endpoint with its delivery log."""
    webhooks.delete_endpoint(webhooks.require_endpoint(current_tenant().id))


@blp.route("/webhook/rotate-secret", methods=["POST"])
@require(perm.BILLING_WRITE)
@blp.response(200, schemas.WebhookWithSecretOut)
def rotate_webhook_secret() -> Any:
    """A new signing secret, in this answer only; the old one stops at once."""
    endpoint = webhooks.require_endpoint(current_tenant().id)
    secret = webhooks.rotate_secret(endpoint)
    return _with_secret(endpoint, secret)


@blp.route("/webhook/test", methods=["POST"])
@require(perm.BILLING_WRITE)
@blp.response(202, schemas.DeliveryOut)
def test_webhook() -> Any:
    """Send a `webhook.test` event; follow it in the delivery log."""
    return webhooks.send_test(webhooks.require_endpoint(current_tenant().id))


@blp.route("/webhook/deliveries", methods=["GET"])
@require(perm.BILLING_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.DeliveryPage)
def list_deliveries(args: dict[str, Any]) -> Any:
    """Newest first, each with its attempts (time, status code, duration, error, next retry)."""
    query = scoped(WebhookDelivery).options(selectinload(WebhookDelivery.attempt_log))
    return paginate(query, WebhookDelivery.id, args, newest_first=True)


@blp.route("/webhook/deliveries/<delivery_id>", methods=["GET"])
@owned_resource(WebhookDelivery)
@require(perm.BILLING_READ)
@blp.response(200, schemas.DeliveryOut)
def get_delivery(delivery_id: str) -> Any:
    return get_owned(WebhookDelivery, delivery_id)


@blp.route("/webhook/deliveries/<delivery_id>/retry", methods=["POST"])
@owned_resource(WebhookDelivery)
@require(perm.BILLING_WRITE)
@blp.response(202, schemas.DeliveryOut)
def retry_delivery(delivery_id: str) -> Any:
    """Attempt it now: a waiting delivery keeps its schedule after, a failed one gets one
    more attempt; `409` once it has succeeded."""
    return webhooks.retry_now(get_owned(WebhookDelivery, delivery_id))
