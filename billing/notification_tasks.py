"""rq jobs of billing's notifications: check the conditions, deliver the webhooks.

``check_notifications`` (every minute: packages and seats) and ``check_licences_ending``
(hourly) are periodic; ``dispatch_webhooks`` (every 15 s) hands due deliveries to
``deliver_webhook``, one job per delivery, which is also queued right after the commit that
creates a delivery. The embedded profile runs rq jobs synchronously in the caller, so there a
delivery never runs in the request or job that created it: the dispatcher sends due deliveries
from one background thread, and a slow or failing receiver delays only other deliveries.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from typing import Any

from flask import Flask, current_app

from billing import notifications, webhooks
from core.db import db, utcnow
from core.queue import app_job, enqueue

log = logging.getLogger(__name__)

CHECK_SECONDS = 60
LICENCES_SECONDS = 3600
DISPATCH_SECONDS = 15

_embedded_sender = threading.Lock()


@app_job
def check_notifications() -> int:
    """Packages under 20% / 5%, no free seat: new notifications (and their deliveries)."""
    now = utcnow()
    return len(notifications.check_packages(now)) + len(notifications.check_seats(now))


@app_job
def check_licences_ending() -> int:
    return len(notifications.check_licences(utcnow()))


@app_job
def dispatch_webhooks() -> int:
    """Deliveries whose attempt is due (retries, and any whose first job was lost)."""
    due = webhooks.due(utcnow())
    if due and current_app.config["EMBEDDED"]:
        _send_in_background(current_app._get_current_object(),  # type: ignore[attr-defined]
                            due)
    else:
        for delivery_id in due:
            enqueue(deliver_webhook, str(delivery_id))
    return len(due)


@app_job
def deliver_webhook(delivery_id: str) -> int | None:
    """Attempt one delivery if it is due; the status code (``None``: not due, or failed
    before an answer)."""
    delivery = run_delivery(uuid.UUID(delivery_id), utcnow())
    return delivery.last_status_code if delivery is not None else None


def run_delivery(delivery_id: uuid.UUID, now: dt.datetime) -> Any:
    """Claim, commit, POST outside any transaction, record. Returns the delivery, or ``None``
    when its attempt was not due (or another worker holds it, or it was deleted meanwhile)."""
    timeout = float(current_app.config["ENSOUL_WEBHOOK_TIMEOUT_SECONDS"])
    claimed = webhooks.claim(delivery_id, now, timeout)
    db.session.commit()
    if claimed is None:
        return None
    outcome = webhooks.send(claimed, current_app.config)
    delivery = webhooks.record(delivery_id, outcome, now)
    db.session.commit()
    return delivery


def deliver_soon(delivery_id: uuid.UUID) -> None:
    """After the commit that made a delivery: its first attempt as a job (services); the
    embedded profile leaves it to the dispatcher (its jobs would run here, synchronously)."""
    if current_app.config["EMBEDDED"]:
        return
    try:
        enqueue(deliver_webhook, str(delivery_id))
    except Exception:  # Redis away: the dispatcher finds the delivery due
        log.warning("could not queue webhook delivery %s; the dispatcher will", delivery_id,
                    exc_info=True)


def _send_in_background(app: Flask, due: list[uuid.UUID]) -> None:
    if not _embedded_sender.acquire(blocking=False):
        return  # the previous batch is still being sent

    def send() -> None:
        try:
            with app.app_context():
                for delivery_id in due:
                    try:
                        deliver_webhook(str(delivery_id))
                    except Exception:
                        log.exception("webhook delivery %s failed to run", delivery_id)
        finally:
            _embedded_sender.release()

    threading.Thread(target=send, name="webhooks", daemon=True).start()
