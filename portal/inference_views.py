"""A device's inference on its page: try it (a request sent as the device, the answer streamed
back as Server-Sent Events), its recent requests and transcripts, deleting its conversation
data."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

from flask import flash, g, redirect, render_template, request, url_for
from flask.blueprints import BlueprintSetupState
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_babel.speaklater import LazyString
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import TextAreaField
from wtforms.validators import DataRequired, Length, Regexp

from accounts import permissions as perm
from accounts import services as accounts
from accounts.auth import require
from core.errors import Conflict, ValidationFailed
from core.fields import TEXT_PATTERN
from core.tenancy import get_owned, owned_resource
from fleet.models import Device, DeviceStatus
from inference import services
from inference.try_it import try_request
from portal.blueprint import bp
from portal.labels import ERROR_MESSAGES

TRY_SECONDS = 20.0  # under gunicorn's 30 s worker timeout: a try holds a sync worker
TRY_MAX_CHARS = 2000
ON_DEVICE_PAGE = 10  # requests and transcripts shown on the device page
REQUESTS_PAGE = 50

KIND_LABELS: dict[str, LazyString] = {
    "text": _l("Text"),
    "vision": _l("Image"),
    "voice": _l("Voice"),
}

FINISH_LABELS: dict[str, LazyString] = {
    "stop": _l("Complete"),
    "length": _l("Cut at the length limit"),
    "abort": _l("Aborted"),
    "quota_exhausted": _l("Credit ran out"),
    "error": _l("Failed"),
}

# The broker's error codes (inference.protocol.ERROR_CODES) and the portal's own two.
ANSWER_ERRORS: dict[str, LazyString] = {
    "bad_request": _l("The request is not valid protocol v1."),
    "too_large": _l("The request is over a size limit."),
    "unauthorized": _l("This device may not use inference."),
    "device_suspended": _l("The device or its organisation is suspended."),
    "license_required": _l("The device has no licence seat."),
    "license_expired": _l("The licence of this device has ended."),
    "quota_exhausted": _l("No credit is left for this device."),
    "daily_cap_reached": _l("This device reached its daily cap."),
    "rate_limited": _l("Too many requests from this device. Wait a moment."),
    "concurrency_limited": _l("Too many answers are streaming to this device."),
    "duplicate_request": _l("This request id was already received."),
    "unknown_request": _l("No open stream has this request id."),
    "bad_audio": _l("An audio frame could not be decoded."),
    "provider_unavailable": _l("The model provider is unavailable."),
    "provider_error": _l("The model provider failed."),
    "timeout": _l("No answer came in time. Is the inference broker running?"),
    "internal": _l("Something went wrong on our side."),
    "unavailable": _l("The portal cannot reach the MQTT broker."),
}


@bp.record_once
def _inference_helpers(state: BlueprintSetupState) -> None:
    # Globals: the device page's view (portal.device_views) passes none of this itself.
    state.app.jinja_env.globals.update(
        device_inference=device_inference, try_labels=try_labels,
        usage_kind_label=KIND_LABELS.get, finish_label=FINISH_LABELS.get,
        try_max_chars=TRY_MAX_CHARS)


def device_inference(device: Device) -> dict[str, Any]:
    """What the device page shows of the device's inference: its newest requests and
    transcripts, and whether there are older requests."""
    page = services.recent_requests(device.tenant_id, device.id, limit=ON_DEVICE_PAGE)
    transcripts = services.recent_transcripts(device.tenant_id, device.id)[:ON_DEVICE_PAGE] \
        if perm.TRANSCRIPTS_READ in g.get("permissions", frozenset()) else []
    return {"requests": page["items"], "more": page["next_cursor"] is not None,
            "transcripts": [{**t, "at": _moment(t.get("at"))} for t in transcripts]}


def _moment(epoch_ms: Any) -> dt.datetime | None:
    return (dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC)
            if isinstance(epoch_ms, int | float) else None)


def try_labels() -> dict[str, Any]:
    """The try-it script's texts in the page's language; ``{name}`` is filled in by it."""
    return {
        "sending": _("Sending…"),
        "streaming": _("Streaming…"),
        "done": _("Done."),
        "failed": _("Failed."),
        "first_delta": _("%(platform)s ms on the platform, %(here)s ms to this page",
                         platform="{platform}", here="{here}"),
        "no_delta": _("No text was sent."),
        "usage": _("%(input)s input and %(output)s output tokens, %(credits)s credits",
                   input="{input}", output="{output}", credits="{credits}"),
        "http": {
            "400": str(ERROR_MESSAGES["csrf_failed"]),
            "403": str(ERROR_MESSAGES["forbidden"]),
            "409": _("Only an active device can be tried."),
            "422": _("Write a message of at most %(n)d characters.", n=TRY_MAX_CHARS),
            "other": _("The request failed (HTTP %(status)s).", status="{status}"),
        },
        "finishes": {code: str(label) for code, label in FINISH_LABELS.items()},
        "errors": {code: str(label) for code, label in ANSWER_ERRORS.items()},
    }


class TryForm(FlaskForm):
    """Checks what the device page's try-it form posts (the page writes the form itself)."""

    text = TextAreaField(
        _l("Message"),
        validators=[DataRequired(), Length(max=TRY_MAX_CHARS),
                    Regexp(TEXT_PATTERN, message=_l("Must not contain control characters."))])


def _event_stream(messages: Iterator[dict[str, Any]]) -> Iterator[str]:
    for message in messages:
        data = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        yield f"event: {message.get('type', 'message')}\ndata: {data}\n\n"


@bp.route("/fleet/devices/<device_id>/try", methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
def try_device(device_id: str) -> Response:
    """Send the form's text as the device and stream what the broker answers, as SSE."""
    found = get_owned(Device, device_id)
    if found.status is not DeviceStatus.ACTIVE:
        raise Conflict("Only an active device can be tried.")
    form = TryForm()
    if not form.validate_on_submit():
        raise ValidationFailed(details=form.errors)
    request_id = uuid.uuid4().hex
    text = form.text.data.strip()
    accounts.record_audit("device.try", tenant_id=found.tenant_id, target=found,
                          details={"request_id": request_id, "chars": len(text)})
    messages = try_request(found, text, TRY_SECONDS, request_id=request_id)
    # The audit entry is committed when this returns (after_request); the stream follows.
    return Response(_event_stream(messages), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@bp.route("/fleet/devices/<device_id>/conversation-data/delete", methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
def delete_conversation_data(device_id: str) -> Response:
    found = get_owned(Device, device_id)
    services.delete_device_data(found.tenant_id, found.id)
    accounts.record_audit("device.conversation_data_delete", tenant_id=found.tenant_id,
                          target=found)
    flash(_("The conversation memory and recent transcripts of %(serial)s are deleted.",
            serial=found.serial), "success")
    return redirect(url_for("portal.device", device_id=found.id))


@bp.route("/fleet/devices/<device_id>/requests")
@owned_resource(Device)
@require(perm.FLEET_READ)
def device_requests(device_id: str) -> str:
    found = get_owned(Device, device_id)
    cursor = request.args.get("cursor") or None
    page = services.recent_requests(found.tenant_id, found.id, cursor, REQUESTS_PAGE)
    return render_template("fleet/device_requests.html", device=found, requests=page["items"],
                           next_cursor=page["next_cursor"], first_page=cursor is None)
