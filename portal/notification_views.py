"""The notifications page (packages running low, no free seat, licences ending; a count in
the nav) and the webhook page (the endpoint, its secret shown once, the delivery log)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import current_app, flash, g, make_response, redirect, render_template, url_for
from flask_babel import format_datetime, format_number, ngettext
from flask_babel import gettext as _
from sqlalchemy.orm import selectinload
from werkzeug.wrappers import Response

from accounts import permissions as perm
from accounts.auth import current_tenant, require
from billing import notifications, webhooks
from billing.models import Notification, WebhookDelivery
from core.db import db
from core.errors import EnsoulError
from core.tenancy import get_owned, owned_resource, scoped
from portal.blueprint import bp
from portal.forms import apply_error
from portal.notification_forms import WebhookForm

DELIVERIES_LISTED = 50


@bp.app_context_processor
def _notification_count() -> dict[str, Any]:
    """``unread_notifications()`` for the nav's badge: counted only when the nav shows it."""
    def unread_notifications() -> int:
        tenant = g.get("tenant")
        return notifications.unread_count(tenant.id) if tenant is not None else 0

    return {"unread_notifications": unread_notifications}


def describe(notification: Notification) -> tuple[str, str]:
    """What the notification says, and the page where it is acted on."""
    data = notification.data
    if notification.type == notifications.PACKAGES_LOW:
        return (_("Your live packages are under %(percent)s%%: %(remaining)s of %(bought)s "
                  "credits left.", percent=data["threshold_percent"],
                  remaining=format_number(data["remaining_credits"]),
                  bought=format_number(data["purchased_credits"])),
                url_for("portal.billing_packages"))
    if notification.type == notifications.SEATS_EXHAUSTED:
        return (ngettext("No free licence seat is left; %(num)d active device has no licence.",
                         "No free licence seat is left; %(num)d active devices have no "
                         "licence.", data["unlicensed_devices"]),
                url_for("portal.billing_licences"))
    if notification.type == notifications.LICENCE_ENDING:
        ends_at = dt.datetime.fromisoformat(data["ends_at"])
        return (_("The licence of device %(serial)s ends on %(date)s.",
                  serial=data["device_serial"], date=format_datetime(ends_at, "medium")),
                url_for("portal.device", device_id=data["device_id"]))
    return notification.type, url_for("portal.notifications_page")


@bp.route("/notifications")
@require(perm.BILLING_READ)
def notifications_page() -> tuple[str, int]:
    tenant = current_tenant()
    items = [(n, *describe(n)) for n in notifications.recent(tenant.id)]
    return render_template("notifications.html", tenant=tenant, items=items,
                           unread=notifications.unread_count(tenant.id)), 200


@bp.route("/notifications/read", methods=["POST"])
@require(perm.BILLING_WRITE)
def read_notifications() -> Response:
    notifications.mark_all_read(current_tenant().id)
    return redirect(url_for("portal.notifications_page"))


# --- the webhook -------------------------------------------------------------------------------


def _render_webhook(form: WebhookForm | None = None, status: int = 200,
                    secret: str | None = None) -> Any:
    tenant = current_tenant()
    endpoint = webhooks.get_endpoint(tenant.id)
    if form is None:
        form = WebhookForm(formdata=None, obj=endpoint)
    deliveries = db.session.scalars(
        scoped(WebhookDelivery).options(selectinload(WebhookDelivery.attempt_log))
        .order_by(WebhookDelivery.id.desc()).limit(DELIVERIES_LISTED)).all()
    response = make_response(render_template(
        "billing/webhook.html", tenant=tenant, endpoint=endpoint, form=form, secret=secret,
        deliveries=deliveries, max_attempts=webhooks.MAX_ATTEMPTS), status)
    if secret:  # shown once: never cached, never kept in the session
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/billing/webhook")
@require(perm.BILLING_READ)
def billing_webhook() -> Any:
    return _render_webhook()


@bp.route("/billing/webhook", methods=["POST"])
@require(perm.BILLING_WRITE)
def save_webhook() -> Any:
    form = WebhookForm()
    if not form.validate_on_submit():
        return _render_webhook(form, status=422)
    try:
        _endpoint, secret = webhooks.configure(current_tenant().id, form.url.data or "",
                                               bool(form.enabled.data), current_app.config)
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render_webhook(form, status=exc.http_status)
    if secret is None:
        flash(_("The webhook endpoint is saved."), "success")
        return redirect(url_for("portal.billing_webhook"))
    db.session.commit()  # rendered, not redirected: the secret is shown on this page only
    return _render_webhook(secret=secret)


@bp.route("/billing/webhook/rotate-secret", methods=["POST"])
@require(perm.BILLING_WRITE)
def rotate_webhook_secret() -> Any:
    secret = webhooks.rotate_secret(webhooks.require_endpoint(current_tenant().id))
    db.session.commit()
    return _render_webhook(secret=secret)


@bp.route("/billing/webhook/test", methods=["POST"])
@require(perm.BILLING_WRITE)
def test_webhook() -> Response:
    webhooks.send_test(webhooks.require_endpoint(current_tenant().id))
    flash(_("A test event is on its way; its delivery is listed below."), "success")
    return redirect(url_for("portal.billing_webhook"))


@bp.route("/billing/webhook/delete", methods=["POST"])
@require(perm.BILLING_WRITE)
def delete_webhook() -> Response:
    webhooks.delete_endpoint(webhooks.require_endpoint(current_tenant().id))
    flash(_("The webhook endpoint is removed; no more events are sent."), "success")
    return redirect(url_for("portal.billing_webhook"))


@bp.route("/billing/webhook/deliveries/<delivery_id>/retry", methods=["POST"])
@owned_resource(WebhookDelivery)
@require(perm.BILLING_WRITE)
def retry_webhook_delivery(delivery_id: str) -> Response:
    webhooks.retry_now(get_owned(WebhookDelivery, delivery_id))
    flash(_("The delivery is attempted again now."), "success")
    return redirect(url_for("portal.billing_webhook"))

