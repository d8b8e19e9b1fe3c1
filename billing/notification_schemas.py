"""Marshmallow schemas of the notifications and webhook API."""

from __future__ import annotations

import marshmallow as ma

from billing.models import DeliveryStatus
from billing.notifications import TYPES
from core.pagination import page_schema


class NotificationOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    type = ma.fields.String(required=True, metadata={
        "description": f"One of {', '.join(TYPES)}."})
    data = ma.fields.Dict(required=True, metadata={
        "description": "What the webhook's `data` carries (docs/notifications.md)."})
    created_at = ma.fields.AwareDateTime(required=True)
    cleared_at = ma.fields.AwareDateTime(required=True, allow_none=True, metadata={
        "description": "When the condition stopped holding; the next crossing notifies again."})
    read_at = ma.fields.AwareDateTime(required=True, allow_none=True)


# http(s), a host name or bracketed IPv6 address, an optional port, path and query.
WEBHOOK_URL_PATTERN = (r"^https?://([A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
                       r"(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?(\?[A-Za-z0-9._~%!$&'()*+,;=:@/?-]*)?$")


class WebhookIn(ma.Schema):
    url = ma.fields.String(required=True, validate=[
        ma.validate.Length(max=2000),
        ma.validate.Regexp(WEBHOOK_URL_PATTERN, error="An http or https URL with a host, "
                                                      "without credentials or fragment.")],
        metadata={"description": "Where events are POSTed. Its host must resolve to public "
                                 "addresses only: otherwise `403 address_not_allowed`."})
    enabled = ma.fields.Boolean(load_default=True)


class WebhookOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    url = ma.fields.String(required=True)
    enabled = ma.fields.Boolean(required=True)
    secret_hint = ma.fields.String(required=True, metadata={
        "description": "The secret's last four characters."})
    secret_rotated_at = ma.fields.AwareDateTime(required=True)
    created_at = ma.fields.AwareDateTime(required=True)


class WebhookWithSecretOut(WebhookOut):
    secret = ma.fields.String(required=True, allow_none=True, metadata={
        "description": "The signing secret (`whsec_...`): shown once, when created or rotated; "
                       "`null` when the URL changed and the secret stayed."})


class AttemptOut(ma.Schema):
    attempted_at = ma.fields.AwareDateTime(required=True)
    status_code = ma.fields.Integer(required=True, allow_none=True)
    duration_ms = ma.fields.Integer(required=True)
    error = ma.fields.String(required=True, allow_none=True)
    next_retry_at = ma.fields.AwareDateTime(required=True, allow_none=True)


class DeliveryOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    event_id = ma.fields.UUID(required=True)
    event_type = ma.fields.String(required=True)
    notification_id = ma.fields.UUID(required=True, allow_none=True)
    status = ma.fields.Enum(DeliveryStatus, by_value=True, required=True, metadata={
        "description": "`pending` (waiting for its next attempt), `succeeded` or `failed` "
                       "(every attempt failed)."})
    attempts = ma.fields.Integer(required=True)
    next_attempt_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    last_status_code = ma.fields.Integer(required=True, allow_none=True)
    created_at = ma.fields.AwareDateTime(required=True)
    completed_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    attempt_log = ma.fields.List(ma.fields.Nested(AttemptOut), required=True, metadata={
        "description": "Every attempt, the first first."})


NotificationPage = page_schema(NotificationOut, "NotificationPage")
DeliveryPage = page_schema(DeliveryOut, "DeliveryPage")
