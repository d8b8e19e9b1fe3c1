"""One device: identity, status and presence, its history, and what the vendor can do with it
(activate, suspend, resume, retire, reset, transfer, edit, credentials)."""

from __future__ import annotations

from typing import Any

from flask import flash, make_response, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_babel.speaklater import LazyString
from sqlalchemy import select
from werkzeug.wrappers import Response

from accounts import permissions as perm
from accounts.auth import require
from core.errors import EnsoulError
from core.pagination import paginate
from core.tenancy import get_owned, owned_resource
from fleet import presence, services, topics
from fleet.models import Device, DeviceEvent
from portal.blueprint import bp
from portal.fleet_forms import DeviceEditForm, TransferForm, apply_fleet_error, split_tags
from portal.labels import error_text

HISTORY_PAGE = 50
DONE: dict[str, LazyString] = {
    "activate": _l("%(serial)s is active."),
    "suspend": _l("%(serial)s is suspended: it cannot use the broker until it is resumed."),
    "resume": _l("%(serial)s is resumed."),
    "retire": _l("%(serial)s is retired for good; its credentials are revoked."),
    "reset": _l("%(serial)s is reset: end user cleared, credentials revoked, memory deleted. "
                "It needs a new activation."),
}


def _presence_of(device: Device) -> dict[str, Any]:
    """Online now, last seen (Redis is newer than the flushed column) and reported versions."""
    seen = [t for t in (presence.last_seen(device.tenant_id, device.id), device.last_seen_at)
            if t]
    reported = presence.reported_state(device.tenant_id, device.id)
    return {
        "online": presence.is_online(device.tenant_id, device.id),
        "last_seen": max(seen) if seen else None,
        "firmware_version": reported.get("firmware_version") or device.firmware_version,
        "config_version": reported.get("config_version") or device.config_version,
    }


def _render(device: Device, *, edit_form: DeviceEditForm | None = None,
            transfer_form: TransferForm | None = None, error: EnsoulError | None = None,
            status: int = 200) -> tuple[str, int]:
    if edit_form is None:
        edit_form = DeviceEditForm(formdata=None, name=device.name, group=device.group_name,
                                   tags=", ".join(device.tag_names))
    cursor = request.args.get("cursor") or None
    history = paginate(select(DeviceEvent).where(DeviceEvent.device_id == device.id),
                       DeviceEvent.id, {"cursor": cursor, "limit": HISTORY_PAGE},
                       newest_first=True)
    return render_template(
        "fleet/device.html", device=device, presence=_presence_of(device),
        events=history["items"], next_cursor=history["next_cursor"], first_page=cursor is None,
        edit_form=edit_form, transfer_form=transfer_form or TransferForm(formdata=None),
        page_error=error_text(error) if error else None,
    ), status


@bp.route("/fleet/devices/<device_id>")
@owned_resource(Device)
@require(perm.FLEET_READ)
def device(device_id: str) -> tuple[str, int]:
    return _render(get_owned(Device, device_id))


def _done(device: Device, message: str) -> Response:
    flash(message, "success")
    return redirect(url_for("portal.device", device_id=device.id))


@bp.route("/fleet/devices/<device_id>/<any(activate, suspend, resume, retire, reset):action>",
          methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
def device_action(device_id: str, action: str) -> Response | tuple[str, int]:
    found = get_owned(Device, device_id)
    try:
        if action == "activate":
            services.activate(found, via="portal")
        elif action == "reset":
            services.reset(found)
        else:
            services.change_status(found, action)
    except EnsoulError as exc:
        return _render(found, error=exc, status=exc.http_status)
    return _done(found, str(DONE[action]) % {"serial": found.serial})


@bp.route("/fleet/devices/<device_id>/edit", methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
def edit_device(device_id: str) -> Response | tuple[str, int]:
    found = get_owned(Device, device_id)
    form = DeviceEditForm()
    if not form.validate_on_submit():
        return _render(found, edit_form=form, status=422)
    group = (form.group.data or "").strip()
    try:
        services.update_device(found, name=form.name.data, group=group,
                               tags=split_tags(form.tags.data), clear_group=not group)
    except EnsoulError as exc:
        apply_fleet_error(form, exc)
        return _render(found, edit_form=form, status=exc.http_status)
    return _done(found, _("%(serial)s is saved.", serial=found.serial))


@bp.route("/fleet/devices/<device_id>/transfer", methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
def transfer_device(device_id: str) -> Response | tuple[str, int]:
    found = get_owned(Device, device_id)
    form = TransferForm()
    if not form.validate_on_submit():
        return _render(found, transfer_form=form, status=422)
    try:
        services.transfer(found, form.end_user_ref.data)
    except EnsoulError as exc:
        return _render(found, transfer_form=form, error=exc, status=exc.http_status)
    return _done(found, _("%(serial)s is transferred; the previous end user's memory is "
                          "deleted.", serial=found.serial))


@bp.route("/fleet/devices/<device_id>/credentials", methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
def issue_credentials(device_id: str) -> Response | tuple[str, int]:
    found = get_owned(Device, device_id)
    rotated = found.mqtt_password_hash is not None
    try:
        password = services.issue_credentials(found)
    except EnsoulError as exc:
        return _render(found, error=exc, status=exc.http_status)
    # Rendered, not redirected: the password must never be stored, not even in the session.
    response = make_response(render_template(
        "fleet/device_credentials.html", device=found, rotated=rotated,
        mqtt=topics.connection_info(found, password)))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/fleet/devices/<device_id>/credentials/revoke", methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
def revoke_credentials(device_id: str) -> Response:
    found = get_owned(Device, device_id)
    services.revoke_credentials(found)
    return _done(found, _("The credentials of %(serial)s are revoked; a connected device is "
                          "disconnected.", serial=found.serial))
