"""A tenant's webhook endpoint and the signed deliveries of its notifications.

Each delivery is a POST of ``{id, type, created_at, tenant_id, data}`` signed like Stripe's:
``Ensoul-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, the timestamp
inside the signed bytes so an old request cannot be replayed later (receivers refuse a ``t``
older than five minutes; docs/notifications.md). The secret is ours, shown once when created
or rotated, and stored encrypted: the HMAC needs it in clear, so a hash would not do.

Attempts follow :data:`RETRY_DELAYS` (8 attempts over about a day). An attempt is *claimed*
first (its due time pushed past the attempt's own duration, in a committed UPDATE), so two
workers never send the same attempt; the HTTP call runs outside any transaction. A worker that
dies mid-attempt leaves the claim to expire and the attempt is made again: delivery is at least
once, and receivers deduplicate by ``Ensoul-Event-Id``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, update

from accounts import services as accounts
from billing import webhook_address
from billing.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from core.crypto import decrypt, encrypt, new_token
from core.db import db, on_commit, utcnow
from core.errors import Conflict, Forbidden, NotFound
from core.ids import uuid7

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Ensoul-Signature"
EVENT_ID_HEADER = "Ensoul-Event-Id"
EVENT_TYPE_HEADER = "Ensoul-Event-Type"
TEST_EVENT = "webhook.test"
# Waits after attempts 1..7; the 8th attempt is the last (about 22 hours after the first).
RETRY_DELAYS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600)
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1
CLAIM_MARGIN = dt.timedelta(seconds=60)
DUE_BATCH = 100


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Ensoul-Signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def event_body(event_id: uuid.UUID, type_: str, created_at: dt.datetime,
               tenant_id: uuid.UUID, data: Mapping[str, Any]) -> str:
    return json.dumps({"id": str(event_id), "type": type_,
                       "created_at": created_at.isoformat(), "tenant_id": str(tenant_id),
                       "data": dict(data)}, separators=(",", ":"), sort_keys=True)


def display_url(url: str) -> str:
    """The URL without its query string, for the audit log (a query may carry a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# --- the endpoint ------------------------------------------------------------------------------


def get_endpoint(tenant_id: uuid.UUID) -> WebhookEndpoint | None:
    return db.session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == tenant_id)).first()


def require_endpoint(tenant_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = get_endpoint(tenant_id)
    if endpoint is None:
        raise NotFound("No webhook endpoint is configured.")
    return endpoint


def check_url(url: str, config: Mapping[str, Any]) -> None:
    try:
        webhook_address.resolve(url, config)
    except webhook_address.AddressRefused as exc:  # the platform's policy, not the syntax
        raise Forbidden(str(exc), code="address_not_allowed", details={"url": [str(exc)]}) \
            from exc


def _new_secret(endpoint: WebhookEndpoint, now: dt.datetime) -> str:
    secret = new_token("whsec")
    endpoint.secret_encrypted = encrypt(secret)
    endpoint.secret_hint = secret[-4:]
    endpoint.secret_rotated_at = now
    return secret


def configure(tenant_id: uuid.UUID, url: str, enabled: bool, config: Mapping[str, Any]
              ) -> tuple[WebhookEndpoint, str | None]:
    """Create the endpoint (with a new secret, returned once) or change its URL; ``None``
    as the secret when it stays the same."""
    check_url(url, config)
    endpoint = get_endpoint(tenant_id)
    secret = None
    now = utcnow()
    if endpoint is None:
        endpoint = WebhookEndpoint(tenant_id=tenant_id, url=url, enabled=enabled)
        secret = _new_secret(endpoint, now)
        db.session.add(endpoint)
        action = "webhook.create"
    else:
        endpoint.url, endpoint.enabled = url, enabled
        action = "webhook.update"
    db.session.flush()
    accounts.record_audit(action, tenant_id=tenant_id, target=endpoint,
                          details={"url": display_url(url), "enabled": enabled})
    return endpoint, secret


def rotate_secret(endpoint: WebhookEndpoint) -> str:
    """A new secret, returned once; deliveries from now on are signed with it."""
    secret = _new_secret(endpoint, utcnow())
    db.session.flush()
    accounts.record_audit("webhook.rotate_secret", tenant_id=endpoint.tenant_id,
                          target=endpoint)
    return secret


def delete_endpoint(endpoint: WebhookEndpoint) -> None:
    """Remove the endpoint and its delivery log; pending deliveries are dropped."""
    accounts.record_audit("webhook.delete", tenant_id=endpoint.tenant_id, target=endpoint,
                          details={"url": display_url(endpoint.url)})
    db.session.delete(endpoint)
    db.session.flush()


# --- deliveries --------------------------------------------------------------------------------


def queue_event(tenant_id: uuid.UUID, type_: str, data: Mapping[str, Any], *,
                event_id: uuid.UUID, created_at: dt.datetime,
                notification_id: uuid.UUID | None = None) -> WebhookDelivery | None:
    """A delivery of the event to the tenant's endpoint (none without an enabled one),
    attempted at once after commit."""
    endpoint = get_endpoint(tenant_id)
    if endpoint is None or not endpoint.enabled:
        return None
    delivery = WebhookDelivery(
        tenant_id=tenant_id, endpoint_id=endpoint.id, notification_id=notification_id,
        event_id=event_id, event_type=type_, next_attempt_at=created_at,
        body=event_body(event_id, type_, created_at, tenant_id, data))
    db.session.add(delivery)
    db.session.flush()
    from billing import notification_tasks

    on_commit(lambda: notification_tasks.deliver_soon(delivery.id))
    return delivery


def send_test(endpoint: WebhookEndpoint) -> WebhookDelivery:
    """A ``webhook.test`` event, to check the receiver and its signature verification."""
    delivery = queue_event(endpoint.tenant_id, TEST_EVENT, {"message": "It works."},
                           event_id=uuid7(), created_at=utcnow())
    if delivery is None:
        raise Conflict("The endpoint is disabled.")
    return delivery


def _enabled_endpoints() -> Any:
    return select(WebhookEndpoint.id).where(WebhookEndpoint.enabled.is_(True))


def due(now: dt.datetime, limit: int = DUE_BATCH) -> list[uuid.UUID]:
    """Deliveries whose attempt is due, to enabled endpoints (a disabled one's wait)."""
    return list(db.session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == DeliveryStatus.PENDING,
        WebhookDelivery.next_attempt_at <= now,
        WebhookDelivery.endpoint_id.in_(_enabled_endpoints()))
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)))


@dataclass(frozen=True, slots=True)
class Claim:
    delivery_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    url: str
    secret: str
    body: bytes

    def __repr__(self) -> str:  # never the secret, should a claim be logged
        return f"Claim({self.delivery_id}, {self.event_type})"


@dataclass(frozen=True, slots=True)
class Outcome:
    status_code: int | None
    duration_ms: int
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def claim(delivery_id: uuid.UUID, now: dt.datetime, timeout: float) -> Claim | None:
    """Take the delivery's due attempt (``None`` when it is not due or another worker has it):
    its due time moves past the attempt, so the caller must commit before sending."""
    result: Any = db.session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                      WebhookDelivery.status == DeliveryStatus.PENDING,
                                      WebhookDelivery.next_attempt_at <= now,
                                      WebhookDelivery.endpoint_id.in_(_enabled_endpoints()))
        .values(next_attempt_at=now + dt.timedelta(seconds=timeout) + CLAIM_MARGIN)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return None
    row = db.session.execute(
        select(WebhookDelivery.event_id, WebhookDelivery.event_type, WebhookDelivery.body,
               WebhookEndpoint.url, WebhookEndpoint.secret_encrypted)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id == delivery_id)).one()
    return Claim(delivery_id, row.event_id, row.event_type, row.url,
                 decrypt(row.secret_encrypted), row.body.encode())


def send(claimed: Claim, config: Mapping[str, Any]) -> Outcome:
    """One POST, to an address checked again now (DNS may have changed since configuring)."""
    started = time.perf_counter()
    status, error = None, None
    try:
        target = webhook_address.resolve(claimed.url, config)
        headers = {"Content-Type": "application/json", "User-Agent": "Ensoul-Webhooks/1",
                   EVENT_ID_HEADER: str(claimed.event_id), EVENT_TYPE_HEADER: claimed.event_type,
                   SIGNATURE_HEADER: sign(claimed.secret, int(time.time()), claimed.body)}
        status = webhook_address.post(target, claimed.body, headers,
                                      float(config["ENSOUL_WEBHOOK_TIMEOUT_SECONDS"]))
        if not 200 <= status < 300:
            error = f"the receiver answered {status}"
    except webhook_address.AddressRefused as exc:
        error = str(exc)
    # Refused, reset, timed out, TLS; bad HTTP (a too long header line, a bad status line) is
    # an HTTPException, not an OSError: uncaught, the claim would expire and recur forever.
    except (OSError, ValueError, http.client.HTTPException) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    duration = round((time.perf_counter() - started) * 1000)
    if error:
        log.info("webhook delivery %s (%s) failed: %s", claimed.delivery_id,
                 claimed.event_type, error)
    return Outcome(status, duration, error[:500] if error else None)


def record(delivery_id: uuid.UUID, outcome: Outcome, now: dt.datetime
           ) -> WebhookDelivery | None:
    """Log the attempt; succeed, schedule the next one, or give up after the last. ``None``
    when the endpoint was deleted (with its deliveries) while the attempt ran."""
    delivery = db.session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        return None
    delivery.attempts += 1
    delivery.last_status_code = outcome.status_code
    next_at = None
    if outcome.succeeded:
        delivery.status, delivery.completed_at = DeliveryStatus.SUCCEEDED, now
    elif delivery.attempts >= MAX_ATTEMPTS:
        delivery.status, delivery.completed_at = DeliveryStatus.FAILED, now
    else:
        next_at = now + dt.timedelta(seconds=RETRY_DELAYS[delivery.attempts - 1])
    delivery.next_attempt_at = next_at
    delivery.attempt_log.append(WebhookAttempt(
        tenant_id=delivery.tenant_id, attempted_at=now,
        status_code=outcome.status_code, duration_ms=outcome.duration_ms, error=outcome.error,
        next_retry_at=next_at))
    db.session.flush()
    return delivery


def retry_now(delivery: WebhookDelivery) -> WebhookDelivery:
    """Attempt a waiting delivery now; a failed one gets one more attempt."""
    if delivery.status is DeliveryStatus.SUCCEEDED:
        raise Conflict("The delivery has succeeded.")
    delivery.status, delivery.completed_at = DeliveryStatus.PENDING, None
    delivery.next_attempt_at = utcnow()
    db.session.flush()
    from billing import notification_tasks

    on_commit(lambda: notification_tasks.deliver_soon(delivery.id))
    return delivery
