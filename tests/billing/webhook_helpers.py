"""Helpers of the notification and webhook tests: rows made through the real services, and a
local HTTP receiver (a threading ``http.server`` on 127.0.0.1) that records what it gets."""

from __future__ import annotations

import http.server
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from accounts.models import Tenant
from billing import notifications, webhooks
from billing.models import Notification, WebhookDelivery, WebhookEndpoint
from core.crypto import encrypt
from core.db import db, utcnow

ENDPOINT_URL = "https://93.184.215.14/ensoul"


def make_endpoint(tenant: Tenant, url: str = ENDPOINT_URL,
                  secret: str = "whsec_test") -> WebhookEndpoint:  # noqa: S107
    """The tenant's endpoint as stored (no address check: the URL is never called)."""
    endpoint = webhooks.get_endpoint(tenant.id)
    if endpoint is None:
        endpoint = WebhookEndpoint(tenant_id=tenant.id, url=url, enabled=True,
                                   secret_encrypted=encrypt(secret), secret_hint=secret[-4:],
                                   secret_rotated_at=utcnow())
        db.session.add(endpoint)
        db.session.commit()
    return endpoint


def with_endpoint(body: dict[str, Any] | None = None) -> Callable[[Tenant], Any]:
    """An endpoint table's body that first gives the caller's tenant a webhook endpoint."""
    def prepare(tenant: Tenant) -> Any:
        make_endpoint(tenant)
        return body

    return prepare


def make_notification(tenant: Tenant) -> Notification:
    notification_id = notifications._notify(
        tenant.id, notifications.SEATS_EXHAUSTED, f"test:{uuid.uuid4()}",
        {"free_seats": 0, "unlicensed_devices": 1}, utcnow())
    db.session.commit()
    assert notification_id is not None
    return db.session.get_one(Notification, notification_id)


def make_delivery(tenant: Tenant) -> WebhookDelivery:
    delivery = webhooks.send_test(make_endpoint(tenant))
    db.session.commit()
    return delivery


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each POST with the next status of ``statuses`` (then the last one again)."""

    url: str
    statuses: list[int]
    received: queue.Queue[Received] = field(default_factory=queue.Queue)

    def get(self, timeout: float = 5.0) -> Received:
        return self.received.get(timeout=timeout)

    def empty(self) -> bool:
        return self.received.empty()


@contextmanager
def receiver(*statuses: int) -> Iterator[Receiver]:
    state = Receiver("", list(statuses) or [200])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = state.statuses.pop(0) if len(state.statuses) > 1 else state.statuses[0]
            state.received.put(Received(self.path, dict(self.headers.items()), body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/ensoul?source=test"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
