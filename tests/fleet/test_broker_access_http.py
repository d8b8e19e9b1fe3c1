"""The EMQX 5 HTTP authn/authz endpoints: EMQX's request and answer shapes, the same topic
rules as Mosquitto, answers cached in Redis until the registry changes, rotation grace."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from core.db import db
from fleet import services, tasks
from fleet.broker_access import get_broker_access
from fleet.broker_access.http import SECRET_HEADER, HttpAuthCache
from fleet.credentials import hash_password
from tests.fleet.conftest import Provisioned, make_product, provision

SECRET = "emqx-hook-secret"
SERVICE_URL = "mqtt://ensoul-platform:service-pw@127.0.0.1:1883"
HEADERS = {SECRET_HEADER: SECRET}


@pytest.fixture
def emqx(app: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(app.config, "ENSOUL_MQTT_ACCESS", "emqx")
    monkeypatch.setitem(app.config, "ENSOUL_MQTT_HOOK_SECRET", SECRET)
    monkeypatch.setitem(app.config, "MQTT_URL", SERVICE_URL)
    return app


def authn(client: Any, username: Any, password: Any, clientid: str = "c1") -> dict[str, Any]:
    answer = client.post("/mqtt/auth", headers=HEADERS, json={
        "clientid": clientid, "username": username, "password": password})
    assert answer.status_code == 200, answer.json
    return dict(answer.json)


def authz(client: Any, username: str, topic: str, action: str) -> str:
    answer = client.post("/mqtt/acl", headers=HEADERS, json={
        "clientid": "c1", "username": username, "topic": topic, "action": action})
    assert answer.status_code == 200, answer.json
    return str(answer.json["result"])


def sync() -> None:
    assert tasks.sync_broker_access()["changed"] is True


def test_authn_answers_in_emqx_shape(emqx: Any, client: Any) -> None:
    product = make_product()
    a, b = provision(product), provision(product)

    assert authn(client, a.username, a.password) == {"result": "allow", "is_superuser": False}
    assert authn(client, a.username, "wrong")["result"] == "deny"
    assert authn(client, b.username, a.password)["result"] == "deny"
    assert authn(client, a.username, None)["result"] == "deny"
    unknown = f"{a.device.tenant_id}/d/{product.id}"  # device-shaped, no such device
    assert authn(client, unknown, a.password)["result"] == "deny"
    # Not a username the platform issues: another authenticator in EMQX's chain decides.
    assert authn(client, "dashboard-admin", "x") == {"result": "ignore", "is_superuser": False}
    assert authn(client, "ensoul-platform", "service-pw") == {"result": "allow",
                                                              "is_superuser": True}
    assert authn(client, "ensoul-platform", "wrong") == {"result": "deny", "is_superuser": False}


def test_authz_applies_the_topic_table(emqx: Any, client: Any) -> None:
    product = make_product()
    a, b = provision(product), provision(product)
    c = provision(make_product())
    allowed = [(a.topic("up"), "publish"), (a.topic("up/audio"), "publish"),
               (a.topic("state"), "publish"), (a.topic("status"), "publish"),
               (a.topic("down"), "subscribe"), (a.topic("down/audio"), "subscribe"),
               (a.topic("config"), "subscribe")]
    denied = [(a.topic("down"), "publish"), (a.topic("config"), "publish"),
              (a.topic("up"), "subscribe"), (b.topic("up"), "publish"),
              (b.topic("down"), "subscribe"), (c.topic("down"), "subscribe"),
              ("t/+/d/#", "subscribe"), ("#", "subscribe"), (a.topic("#"), "subscribe"),
              (a.topic("+"), "subscribe"), (a.topic("other"), "publish")]
    for topic, action in allowed:
        assert authz(client, a.username, topic, action) == "allow", (topic, action)
    for topic, action in denied:
        assert authz(client, a.username, topic, action) == "deny", (topic, action)
    service = "ensoul-platform"
    assert authz(client, service, "t/#", "subscribe") == "allow"
    assert authz(client, service, "$share/ensoul-presence/t/+/d/+/status", "subscribe") == "allow"
    assert authz(client, service, a.topic("down"), "publish") == "allow"
    assert authz(client, service, "#", "subscribe") == "deny"
    assert authz(client, "stranger", a.topic("up"), "publish") == "deny"


def test_answers_are_cached_until_the_registry_changes(emqx: Any, client: Any) -> None:
    a = provision(make_product())
    assert authn(client, a.username, a.password)["result"] == "allow"
    assert authz(client, a.username, a.topic("up"), "publish") == "allow"

    # Changed behind the services' back: the cached answers stand until the next sync.
    a.device.mqtt_password_hash = hash_password("elsewhere")
    db.session.commit()
    assert authn(client, a.username, a.password)["result"] == "allow"

    services.revoke_credentials(a.device)
    db.session.commit()
    sync()
    assert authn(client, a.username, a.password)["result"] == "deny"
    assert authz(client, a.username, a.topic("up"), "publish") == "deny"


@pytest.mark.parametrize("change", ["suspend", "retire"])
def test_devices_without_access_are_denied(emqx: Any, client: Any, change: str) -> None:
    a = provision(make_product())
    services.change_status(a.device, change)
    db.session.commit()
    sync()
    assert authn(client, a.username, a.password)["result"] == "deny"
    assert authz(client, a.username, a.topic("up"), "publish") == "deny"


def test_rotation_is_immediate_without_grace(emqx: Any, client: Any) -> None:
    a = provision(make_product())
    assert authn(client, a.username, a.password)["result"] == "allow"
    new_password = services.issue_credentials(a.device)
    db.session.commit()
    sync()
    assert authn(client, a.username, a.password)["result"] == "deny"
    assert authn(client, a.username, new_password)["result"] == "allow"


def rotate(a: Provisioned) -> str:
    new_password = services.issue_credentials(a.device)
    db.session.commit()
    sync()
    return new_password


def test_rotation_grace_keeps_the_old_secret_until_the_new_one_is_used(
        emqx: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(emqx.config, "ENSOUL_MQTT_ROTATION_GRACE_MINUTES", 10)
    a = provision(make_product())
    assert authn(client, a.username, a.password)["result"] == "allow"  # remembered

    new_password = rotate(a)

    assert authn(client, a.username, a.password)["result"] == "allow"
    assert authn(client, a.username, new_password)["result"] == "allow"
    assert authn(client, a.username, a.password)["result"] == "deny"


def test_rotation_grace_ends_after_its_minutes_and_never_covers_revocation(
        emqx: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(emqx.config, "ENSOUL_MQTT_ROTATION_GRACE_MINUTES", 10)
    product = make_product()
    a, b = provision(product), provision(product)
    for device in (a, b):
        assert authn(client, device.username, device.password)["result"] == "allow"
    rotate(a)
    a.device.credentials_issued_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=11)
    db.session.commit()
    sync()
    assert authn(client, a.username, a.password)["result"] == "deny"

    services.issue_credentials(b.device)
    services.revoke_credentials(b.device)
    db.session.commit()
    sync()
    assert authn(client, b.username, b.password)["result"] == "deny"


def test_the_emqx_adapter_syncs_by_dropping_cached_answers(emqx: Any) -> None:
    provision(make_product())
    access = get_broker_access()
    assert isinstance(access, HttpAuthCache)
    first = tasks.sync_broker_access()
    assert first["devices"] == 1 and tasks.sync_broker_access()["generation"] == (
        first["generation"] + 1)


@pytest.mark.parametrize("headers, code", [
    ({}, "unauthorized"),
    ({SECRET_HEADER: "wrong"}, "unauthorized"),
])
def test_the_hooks_require_the_shared_secret(emqx: Any, client: Any, headers: dict[str, str],
                                             code: str) -> None:
    answer = client.post("/mqtt/auth", headers=headers,
                         json={"clientid": "c", "username": "u", "password": "p"})
    assert answer.status_code == 401
    assert answer.json["error"]["code"] == code


def test_the_hooks_are_closed_without_a_configured_secret(emqx: Any, client: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(emqx.config, "ENSOUL_MQTT_HOOK_SECRET", None)
    answer = client.post("/mqtt/acl", headers=HEADERS, json={
        "username": "u", "topic": "t/x", "action": "publish"})
    assert answer.status_code == 401
    assert answer.json["error"]["code"] == "hook_secret_not_set"


def test_the_embedded_profile_needs_no_secret(emqx: Any, client: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(emqx.config, "EMBEDDED", True)
    monkeypatch.setitem(emqx.config, "ENSOUL_MQTT_HOOK_SECRET", None)
    a = provision(make_product())
    answer = client.post("/mqtt/auth", json={"clientid": "c", "username": a.username,
                                             "password": a.password})
    assert answer.status_code == 200 and answer.json["result"] == "allow"


@pytest.mark.parametrize("path, body", [
    ("/mqtt/auth", "not json"),
    ("/mqtt/auth", "[1, 2]"),
    ("/mqtt/auth", '"a string"'),
    ("/mqtt/auth", "{}"),
    ("/mqtt/auth", '{"username": 5, "password": "p"}'),
    ("/mqtt/auth", '{"username": "u", "password": ["p"]}'),
    ("/mqtt/auth", '{"username": "' + "u" * 2000 + '", "password": "p"}'),
    ("/mqtt/acl", '{"username": "u", "topic": "t/x"}'),
    ("/mqtt/acl", '{"username": "u", "topic": "t/x", "action": "delete"}'),
    ("/mqtt/acl", '{"username": "u", "topic": "", "action": "publish"}'),
    ("/mqtt/acl", '{"username": "u", "topic": null, "action": "publish"}'),
])
def test_malformed_bodies_are_400_in_the_error_shape(emqx: Any, client: Any, path: str,
                                                     body: str) -> None:
    answer = client.post(path, data=body, headers={**HEADERS,
                                                   "Content-Type": "application/json"})
    assert answer.status_code == 400
    assert set(answer.json["error"]) == {"code", "message", "details"}


def test_only_post_is_allowed(emqx: Any, client: Any) -> None:
    answer = client.get("/mqtt/auth", headers=HEADERS)
    assert answer.status_code == 405
    assert answer.json["error"]["code"] == "method_not_allowed"
