"""Webhooks: configured through the API, signed as docs/notifications.md says (its own Python
snippet verifies them), retried with backoff into a delivery log, refused for private addresses
at configuration and at delivery, secrets kept out of logs and the audit log. A real HTTP
server on 127.0.0.1 receives the deliveries."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from sqlalchemy import select

from accounts.models import AuditEntry
from billing import notification_tasks, webhooks
from billing.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint
from core.crypto import decrypt
from core.db import db, utcnow
from core.redis import get_redis
from tests.billing.webhook_helpers import receiver
from tests.fleet.fixtures import Vendor

DOCS = Path(__file__).resolve().parents[2] / "docs" / "notifications.md"
WEBHOOK = "/api/v1/billing/webhook"


def documented_verify() -> Any:
    """The ``verify`` function of the docs' Python snippet, run as a receiver would."""
    snippet = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert snippet, "no Python snippet in docs/notifications.md"
    namespace: dict[str, Any] = {}
    exec(snippet.group(1), namespace)  # noqa: S102 - our own documentation
    return namespace["verify"]


@pytest.fixture
def allow_private(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.config, "ENSOUL_WEBHOOK_ALLOW_PRIVATE", True)


def configure(client: Any, vendor: Vendor, url: str) -> Any:
    return client.put(WEBHOOK, json={"url": url}, headers=vendor.headers)


def deliveries(vendor: Vendor) -> list[WebhookDelivery]:
    db.session.expire_all()
    return list(db.session.scalars(select(WebhookDelivery).where(
        WebhookDelivery.tenant_id == vendor.setup.tenant.id).order_by(WebhookDelivery.id)))


def test_the_signature_verifies_with_the_documented_snippet(
        client: Any, vendor: Vendor, allow_private: None) -> None:
    with receiver(200) as hook:
        created = configure(client, vendor, hook.url)
        assert created.status_code == 200
        secret = created.get_json()["secret"]
        assert secret.startswith("whsec_") and created.get_json()["secret_hint"] == secret[-4:]
        sent = client.post(f"{WEBHOOK}/test", headers=vendor.headers)
        assert sent.status_code == 202
        delivery = notification_tasks.run_delivery(
            webhooks.due(utcnow())[0], utcnow())
        got = hook.get()
    assert delivery.status is DeliveryStatus.SUCCEEDED and delivery.last_status_code == 200
    assert got.path == "/hooks/ensoul?source=test"
    body = json.loads(got.body)
    assert set(body) == {"id", "type", "created_at", "tenant_id", "data"}
    assert body["type"] == "webhook.test" and body["tenant_id"] == str(vendor.setup.tenant.id)
    assert got.headers["Ensoul-Event-Id"] == body["id"] == str(delivery.event_id)
    assert got.headers["Ensoul-Event-Type"] == "webhook.test"

    verify = documented_verify()
    signature = got.headers["Ensoul-Signature"]
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", signature)
    assert verify(secret, got.body, signature)
    assert not verify(secret, got.body.replace(b"It works.", b"It works!"), signature)
    assert not verify(secret + "x", got.body, signature)
    signed_at = int(signature.split(",")[0][2:])
    assert not verify(secret, got.body, signature, now=signed_at + 301)  # replayed later
    assert verify(secret, got.body, signature, now=signed_at + 299)
    # The same body resigned with another timestamp is another signature.
    assert webhooks.sign(secret, signed_at + 1, got.body) != signature


def test_the_secret_is_shown_once_stored_encrypted_and_rotated(
        client: Any, vendor: Vendor, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = "https://93.184.215.14/hooks?token=do-not-audit"
    secret = configure(client, vendor, url).get_json()["secret"]
    shown = client.get(WEBHOOK, headers=vendor.headers).get_json()
    assert "secret" not in shown and shown["url"] == url
    changed = configure(client, vendor, "https://93.184.215.14/other")
    assert changed.get_json()["secret"] is None  # the URL changed, the secret stayed
    endpoint = db.session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == vendor.setup.tenant.id)).one()
    assert secret not in endpoint.secret_encrypted and decrypt(endpoint.secret_encrypted) == secret

    rotated = client.post(f"{WEBHOOK}/rotate-secret", headers=vendor.headers).get_json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != secret
    db.session.expire_all()
    assert decrypt(endpoint.secret_encrypted) == rotated["secret"]

    audit = list(db.session.scalars(select(AuditEntry).where(
        AuditEntry.tenant_id == vendor.setup.tenant.id,
        AuditEntry.action.startswith("webhook.")).order_by(AuditEntry.created_at)))
    assert [a.action for a in audit] == ["webhook.create", "webhook.update",
                                         "webhook.rotate_secret"]
    assert audit[0].details["url"] == "https://93.184.215.14/hooks"  # no query string
    stored = json.dumps([a.details for a in audit]) + caplog.text
    for value in (secret, rotated["secret"], "do-not-audit"):
        assert value not in stored

    assert client.delete(WEBHOOK, headers=vendor.headers).status_code == 204
    assert client.get(WEBHOOK, headers=vendor.headers).status_code == 404


def test_a_failing_receiver_is_retried_with_backoff_until_the_last_attempt(
        client: Any, vendor: Vendor, allow_private: None) -> None:
    with receiver(500) as hook:
        configure(client, vendor, hook.url)
        client.post(f"{WEBHOOK}/test", headers=vendor.headers)
        [delivery] = deliveries(vendor)
        start = delivery.next_attempt_at
        assert start is not None
        at = start
        for attempt, wait in enumerate((*webhooks.RETRY_DELAYS, None), start=1):
            done = notification_tasks.run_delivery(delivery.id, at)
            assert done.attempts == attempt and done.last_status_code == 500
            assert hook.get().headers["Ensoul-Event-Id"] == str(delivery.event_id)
            if wait is None:
                break
            assert done.next_attempt_at == at + dt.timedelta(seconds=wait)
            # Not due a second early; no request reaches the receiver.
            early = at + dt.timedelta(seconds=wait - 1)
            assert notification_tasks.run_delivery(delivery.id, early) is None
            assert webhooks.due(early) == []
            at += dt.timedelta(seconds=wait)
        assert hook.empty()
    assert done.status is DeliveryStatus.FAILED and done.next_attempt_at is None
    assert at - start > dt.timedelta(hours=20)  # about a day

    log = client.get(f"{WEBHOOK}/deliveries/{delivery.id}", headers=vendor.headers).get_json()
    assert log["status"] == "failed" and log["attempts"] == webhooks.MAX_ATTEMPTS
    attempts = log["attempt_log"]
    assert [a["status_code"] for a in attempts] == [500] * webhooks.MAX_ATTEMPTS
    assert all(a["error"] == "the receiver answered 500" and a["duration_ms"] >= 0
               for a in attempts)
    gaps = [(dt.datetime.fromisoformat(b["attempted_at"])
             - dt.datetime.fromisoformat(a["attempted_at"])).total_seconds()
            for a, b in itertools.pairwise(attempts)]
    assert gaps == list(webhooks.RETRY_DELAYS)
    assert attempts[-1]["next_retry_at"] is None and attempts[0]["next_retry_at"] is not None
    listed = client.get(f"{WEBHOOK}/deliveries", headers=vendor.headers).get_json()["items"]
    assert [d["id"] for d in listed] == [str(delivery.id)]

    # Retry now: one more attempt, which the receiver (now healthy) accepts.
    with receiver(204) as healthy:
        db.session.get_one(WebhookEndpoint, delivery.endpoint_id).url = healthy.url
        db.session.commit()
        assert client.post(f"{WEBHOOK}/deliveries/{delivery.id}/retry",
                           headers=vendor.headers).status_code == 202
        done = notification_tasks.run_delivery(delivery.id, utcnow())
        healthy.get()
    assert done.status is DeliveryStatus.SUCCEEDED and done.attempts == 9
    assert client.post(f"{WEBHOOK}/deliveries/{delivery.id}/retry",
                       headers=vendor.headers).status_code == 409


def test_a_refused_connection_is_a_logged_attempt(client: Any, vendor: Vendor,
                                                  allow_private: None) -> None:
    with receiver(200) as hook:
        url = hook.url
    configure(client, vendor, url)  # the server is gone: nothing listens there now
    client.post(f"{WEBHOOK}/test", headers=vendor.headers)
    [delivery] = deliveries(vendor)
    done = notification_tasks.run_delivery(delivery.id, utcnow())
    assert done.status is DeliveryStatus.PENDING and done.last_status_code is None
    [attempt] = done.attempt_log
    assert attempt.error and "ConnectionRefused" in attempt.error
    assert attempt.next_retry_at == done.next_attempt_at


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/hook", "http://localhost/hook", "http://[::1]/hook",
    "http://10.1.2.3/hook", "http://192.168.1.10/hook", "http://172.16.0.5/hook",
    "http://169.254.169.254/latest/meta-data", "http://[fe80::1]/hook", "http://224.0.0.1/",
    "http://0.0.0.0/", "http://100.64.0.1/", "http://[::ffff:127.0.0.1]/hook",
    "http://no-such-host.invalid/hook",
])
def test_private_addresses_are_refused_at_configuration(
        client: Any, vendor: Vendor, url: str) -> None:
    answer = configure(client, vendor, url)
    assert answer.status_code == 403, answer.get_json()
    assert answer.get_json()["error"]["code"] == "address_not_allowed"
    assert "url" in answer.get_json()["error"]["details"]
    assert client.get(WEBHOOK, headers=vendor.headers).status_code == 404


@pytest.mark.parametrize("url", ["ftp://93.184.215.14/", "https://user:pw@93.184.215.14/hook",
                                 "https://93.184.215.14/hook#part", "", "hook"])
def test_malformed_urls_are_refused_at_configuration(
        client: Any, vendor: Vendor, url: str) -> None:
    answer = configure(client, vendor, url)
    assert answer.status_code == 422, answer.get_json()
    assert "url" in answer.get_json()["error"]["details"]
    assert client.get(WEBHOOK, headers=vendor.headers).status_code == 404


def test_a_disabled_endpoint_gets_no_attempts_until_enabled_again(
        client: Any, vendor: Vendor, allow_private: None) -> None:
    with receiver(200) as hook:
        configure(client, vendor, hook.url)
        client.post(f"{WEBHOOK}/test", headers=vendor.headers)
        client.put(WEBHOOK, json={"url": hook.url, "enabled": False}, headers=vendor.headers)
        [delivery] = deliveries(vendor)
        assert webhooks.due(utcnow()) == []
        assert notification_tasks.run_delivery(delivery.id, utcnow()) is None
        assert client.post(f"{WEBHOOK}/test", headers=vendor.headers).status_code == 409
        configure(client, vendor, hook.url)
        assert notification_tasks.run_delivery(delivery.id, utcnow()).attempts == 1
        hook.get()


def test_private_addresses_are_refused_at_delivery_too(
        client: Any, vendor: Vendor, app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint allowed then (or whose DNS now answers differently) is checked again."""
    with receiver(200) as hook:
        monkeypatch.setitem(app.config, "ENSOUL_WEBHOOK_ALLOW_PRIVATE", True)
        configure(client, vendor, hook.url)
        client.post(f"{WEBHOOK}/test", headers=vendor.headers)
        monkeypatch.setitem(app.config, "ENSOUL_WEBHOOK_ALLOW_PRIVATE", False)
        [delivery] = deliveries(vendor)
        done = notification_tasks.run_delivery(delivery.id, utcnow())
        assert hook.empty()  # no request was made
        assert done.status is DeliveryStatus.PENDING and done.attempts == 1
        assert "127.0.0.1" in (done.attempt_log[0].error or "")

        # The operator's allow-list lets this one address through.
        monkeypatch.setitem(app.config, "ENSOUL_WEBHOOK_ALLOWED_HOSTS", "10.0.0.0/8, 127.0.0.1")
        done = notification_tasks.run_delivery(delivery.id, done.next_attempt_at)
        assert done.status is DeliveryStatus.SUCCEEDED
        hook.get()


def test_a_notification_is_delivered_through_an_rq_worker(
        client: Any, vendor: Vendor, allow_private: None) -> None:
    from fleet.models import DeviceStatus
    from tests.portal.fleet_helpers import make_device

    with receiver(200) as hook:
        configure(client, vendor, hook.url)
        make_device(vendor.product, status=DeviceStatus.ACTIVE)  # no seat: seats.exhausted
        notification_tasks.check_notifications()  # commits: the delivery's job is queued
        worker = SimpleWorker(["default"], connection=get_redis(), serializer=JSONSerializer)
        assert worker.work(burst=True)
        got = hook.get()
    assert json.loads(got.body)["type"] == "seats.exhausted"
    [delivery] = deliveries(vendor)
    assert delivery.status is DeliveryStatus.SUCCEEDED
    # The dispatcher finds nothing left to send.
    assert notification_tasks.dispatch_webhooks() == 0


def test_the_embedded_profile_never_sends_in_the_request(
        client: Any, vendor: Vendor, app: Any, allow_private: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded jobs run in the caller: a delivery is left to the dispatcher's thread, so a
    slow receiver holds up neither the request nor the job that made the event."""
    with receiver(503) as hook:
        configure(client, vendor, hook.url)
        monkeypatch.setitem(app.config, "EMBEDDED", True)
        assert client.post(f"{WEBHOOK}/test", headers=vendor.headers).status_code == 202
        assert hook.empty()
    assert Queue("default", connection=get_redis()).count == 0
    assert [d.status for d in deliveries(vendor)] == [DeliveryStatus.PENDING]
