"""The embedded profile's amqtt broker applies the registry and the topic table through its
auth and topic plugins: real paho clients (MQTT 3.1.1, amqtt's protocol) against it."""

from __future__ import annotations

from typing import Any

from core.db import db
from core.mqtt import platform_target
from fleet import services, tasks
from fleet.broker_access import get_broker_access
from fleet.broker_access.embedded import EmbeddedAccess
from tests.fleet.conftest import V311, MqttClient, Provisioned, make_product, provision


def login(make: Any, target: Any, device: Provisioned, password: str | None = None) -> MqttClient:
    client = make(target, device.username, password or device.password,
                  client_id=device.client_id, **V311)
    assert not client.connect().is_failure
    return client


def service(make: Any, app: Any) -> MqttClient:
    target = platform_target(app.config)
    client = make(target, target.username, target.password, **V311)
    assert not client.connect().is_failure
    return client


def test_devices_log_in_with_their_own_secret_only(committed_app: Any, embedded_broker: Any,
                                                   mqtt_clients: Any) -> None:
    product = make_product()
    a, b = provision(product), provision(product)
    login(mqtt_clients, embedded_broker, a)
    for username, password in [(a.username, "wrong"), (b.username, a.password),
                               ("ensoul-platform", "guess"), (None, None)]:
        client = mqtt_clients(embedded_broker, username, password, **V311)
        assert client.connect().is_failure, (username, password)
    service(mqtt_clients, committed_app)


def test_topic_rules_are_the_same_as_mosquittos(committed_app: Any, embedded_broker: Any,
                                                mqtt_clients: Any) -> None:
    product = make_product()
    a, b = provision(product), provision(product)
    c = provision(make_product())
    observer = service(mqtt_clients, committed_app)
    observer.subscribe("t/#")
    a_client = login(mqtt_clients, embedded_broker, a)

    assert not a_client.subscribe(a.topic("down")).is_failure
    for topic in (b.topic("down"), c.topic("down"), "t/+/d/#", "#", a.topic("up")):
        assert a_client.subscribe(topic).is_failure, topic
    for topic in (b.topic("down"), c.topic("config")):
        observer.publish(topic, b"not for A")
    observer.publish(a.topic("down"), b"for A")
    a_client.wait_for(a.topic("down"), b"for A")
    assert [m.topic for m in a_client.received()] == [a.topic("down")]

    for topic in (b.topic("up"), c.topic("up"), a.topic("down"), a.topic("config")):
        a_client.publish(topic, b"forged")
    a_client.publish(a.topic("up"), b"mine")
    observer.wait_for(a.topic("up"), b"mine")
    assert [m for m in observer.received() if m.payload == b"forged"] == []


def test_revocation_takes_effect_at_the_next_sync(committed_app: Any, embedded_broker: Any,
                                                  mqtt_clients: Any) -> None:
    a = provision(make_product())
    observer = service(mqtt_clients, committed_app)
    observer.subscribe("t/#")
    connected = login(mqtt_clients, embedded_broker, a)
    assert isinstance(get_broker_access(), EmbeddedAccess)

    services.revoke_credentials(a.device)
    db.session.commit()
    assert tasks.sync_broker_access() == {"devices": 0, "changed": True, "reloaded": False}

    # amqtt cannot kick a client from a plugin: the connected device can no longer act.
    connected.publish(a.topic("up"), b"after revocation")
    observer.publish(a.topic("down"), b"to a revoked device")
    observer.wait_for(a.topic("down"), b"to a revoked device")
    assert observer.received(a.topic("up")) == []
    assert connected.received() == []
    again = mqtt_clients(embedded_broker, a.username, a.password, **V311)
    assert again.connect().is_failure


def test_a_device_receives_no_other_devices_retained_messages(
        committed_app: Any, embedded_broker: Any, mqtt_clients: Any) -> None:
    """amqtt replays retained messages on connect for every subscription in the broker; with
    the platform subscribed to every device's status, a new device got every device's
    retained status (other tenants' too). It gets only its own topics' retained messages."""
    product = make_product()
    a, b, c = provision(product), provision(product), provision(make_product())
    observer = service(mqtt_clients, committed_app)
    observer.subscribe("t/+/d/+/status")  # as the presence tracker does
    for device in (b, c):
        other = login(mqtt_clients, embedded_broker, device)
        assert not other.publish(device.topic("status"), b'{"state": "online"}',
                                 retain=True).is_failure
        assert not other.publish(device.topic("state"), b'{"firmware_version": "1"}',
                                 retain=True).is_failure
    observer.publish(a.topic("down"), b"retained for A", retain=True)

    a_client = login(mqtt_clients, embedded_broker, a)
    assert not a_client.subscribe(a.topic("down")).is_failure
    a_client.wait_for(a.topic("down"), b"retained for A")  # its own retained message arrives
    assert not a_client.publish(a.topic("up"), b"barrier").is_failure  # a round trip after it
    assert [m.topic for m in a_client.received()] == [a.topic("down")]
