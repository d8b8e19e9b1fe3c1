"""Presence with real clients: devices announce themselves retained with a last will, the tracker
keeps Redis up to date, and the flush job copies last-seen times and versions to Postgres."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.db import db
from core.mqtt import platform_target
from fleet import presence, services, tasks
from fleet.broker_access.mosquitto import MosquittoFiles
from fleet.models import Device
from fleet.presence import PresenceTracker
from tests.conftest import MosquittoInstance
from tests.fleet.conftest import (
    V311,
    MqttClient,
    Provisioned,
    log_in,
    make_product,
    provision,
)
from tests.support.waiting import wait_until

ONLINE = json.dumps({"state": "online"})
OFFLINE = json.dumps({"state": "offline"})


@pytest.fixture
def start_tracker(committed_app: Any, broker_platform: MosquittoInstance
                  ) -> Iterator[Callable[[], PresenceTracker]]:
    started: list[PresenceTracker] = []

    def _start() -> PresenceTracker:
        tracker = PresenceTracker(committed_app, platform_target(committed_app.config))
        tracker.start()
        started.append(tracker)
        wait_until(tracker.subscribed.is_set, 10, what="the tracker's subscriptions")
        return tracker

    yield _start
    for tracker in started:
        tracker.stop()


def online_device(make: Callable[..., MqttClient], instance: MosquittoInstance,
                  device: Provisioned) -> MqttClient:
    """Connect as firmware should: last will first, then the retained online status.

    Retried until Mosquitto has applied the reload the test's sync just signalled."""
    def attempt() -> MqttClient | None:
        client = make(instance, device.username, device.password, client_id=device.client_id)
        client.set_will(device.topic("status"), OFFLINE, qos=1, retain=True)
        return None if client.connect().is_failure else client

    client = wait_until(attempt, 10, what=f"{device.username} to log in")
    assert not client.publish(device.topic("status"), ONLINE, retain=True).is_failure
    return client


def test_online_then_the_last_will_marks_a_lost_device_offline(
        committed_app: Any, broker_platform: MosquittoInstance, start_tracker: Any,
        mqtt_clients: Any) -> None:
    product = make_product()
    a, b = provision(product), provision(product)
    MosquittoFiles.from_config(committed_app.config).sync()
    start_tracker()
    tenant = a.device.tenant_id

    lost = online_device(mqtt_clients, broker_platform, a)
    online_device(mqtt_clients, broker_platform, b)
    wait_until(lambda: presence.online_count(tenant) == 2, 10, what="two devices online")
    assert presence.online_ids(tenant) == {str(a.device.id), str(b.device.id)}

    lost.kill()  # no DISCONNECT: Mosquitto publishes the will

    wait_until(lambda: not presence.is_online(tenant, a.device.id), 10,
               what="the last will to mark the device offline")
    assert presence.online_count(tenant) == 1 and presence.is_online(tenant, b.device.id)
    assert presence.last_seen(tenant, a.device.id) is not None


def test_an_orderly_shutdown_says_offline_itself(
        committed_app: Any, broker_platform: MosquittoInstance, start_tracker: Any,
        mqtt_clients: Any) -> None:
    a = provision(make_product())
    MosquittoFiles.from_config(committed_app.config).sync()
    start_tracker()
    client = online_device(mqtt_clients, broker_platform, a)
    wait_until(lambda: presence.is_online(a.device.tenant_id, a.device.id), 10, what="online")

    # A clean DISCONNECT sends no will: firmware publishes offline before it.
    client.publish(a.topic("status"), OFFLINE, retain=True)
    client.close()

    wait_until(lambda: not presence.is_online(a.device.tenant_id, a.device.id), 10,
               what="offline")


def test_revocation_disconnects_the_device_and_its_will_marks_it_offline(
        committed_app: Any, broker_platform: MosquittoInstance, start_tracker: Any,
        mqtt_clients: Any) -> None:
    a = provision(make_product())
    files = MosquittoFiles.from_config(committed_app.config)
    files.sync()
    start_tracker()
    online_device(mqtt_clients, broker_platform, a)
    wait_until(lambda: presence.is_online(a.device.tenant_id, a.device.id), 10, what="online")

    services.revoke_credentials(a.device)
    db.session.commit()
    files.sync()

    wait_until(lambda: not presence.is_online(a.device.tenant_id, a.device.id), 10,
               what="the revoked device to go offline")


def test_a_restarted_tracker_rebuilds_presence_from_retained_status(
        committed_app: Any, broker_platform: MosquittoInstance, start_tracker: Any,
        mqtt_clients: Any, redis_client: Any) -> None:
    product = make_product()
    a, b = provision(product), provision(product)
    MosquittoFiles.from_config(committed_app.config).sync()
    observer = mqtt_clients(broker_platform, broker_platform.service_user,
                            broker_platform.service_password)
    observer.connect()
    observer.subscribe(b.topic("status"))
    online_device(mqtt_clients, broker_platform, a)
    online_device(mqtt_clients, broker_platform, b).kill()
    observer.wait_for(b.topic("status"), OFFLINE.encode())  # B's will is out
    # Nobody was tracking, and Redis is empty: the retained statuses are the truth.
    redis_client.flushdb()

    tracker = start_tracker()

    tenant = a.device.tenant_id
    wait_until(lambda: presence.is_online(tenant, a.device.id), 10, what="A from retained")
    wait_until(lambda: tracker.counts["recorded"] >= 2, 10, what="B's retained offline")
    assert not presence.is_online(tenant, b.device.id)
    # A replayed "offline" says nothing about when the device was last seen.
    assert presence.last_seen(tenant, b.device.id) is None


def test_reported_state_reaches_postgres_at_the_next_flush(
        committed_app: Any, broker_platform: MosquittoInstance, start_tracker: Any,
        mqtt_clients: Any) -> None:
    a = provision(make_product())
    MosquittoFiles.from_config(committed_app.config).sync()
    start_tracker()
    client = online_device(mqtt_clients, broker_platform, a)
    state = {"firmware_version": "1.4.2", "config_version": "7", "battery": 81,
             "free_heap": 123456}
    client.publish(a.topic("state"), json.dumps(state), retain=True)
    tenant = a.device.tenant_id
    wait_until(lambda: presence.reported_state(tenant, a.device.id) == state, 10,
               what="the reported state")
    assert db.session.get(Device, a.device.id).last_seen_at is None  # nothing written yet

    assert tasks.flush_presence() == {"devices": 1}

    db.session.expire_all()
    device = db.session.get(Device, a.device.id)
    assert device.firmware_version == "1.4.2" and device.config_version == "7"
    assert device.last_seen_at == presence.last_seen(tenant, a.device.id)
    assert tasks.flush_presence() == {"devices": 0}  # nothing changed since


def test_foreign_topics_and_malformed_payloads_are_counted_and_skipped(
        committed_app: Any, broker_platform: MosquittoInstance, start_tracker: Any,
        mqtt_clients: Any) -> None:
    a = provision(make_product())
    MosquittoFiles.from_config(committed_app.config).sync()
    tracker = start_tracker()
    observer = mqtt_clients(broker_platform, broker_platform.service_user,
                            broker_platform.service_password)
    observer.connect()
    device = log_in(mqtt_clients, broker_platform, a.username, a.password,
                    client_id=a.client_id)

    ghost = f"t/{uuid.uuid4()}/d/{uuid.uuid4()}/status"
    observer.publish(ghost, ONLINE)
    observer.publish(f"t/{a.device.tenant_id}/d/not-a-uuid/status", ONLINE)
    for payload in (b"online", b"[1]", b'{"state": "sleeping"}', b"\xff\xfe", b"{" * 10_000):
        device.publish(a.topic("status"), payload)
    device.publish(a.topic("state"), b"not json")
    device.publish(a.topic("status"), ONLINE)

    wait_until(lambda: presence.is_online(a.device.tenant_id, a.device.id), 10,
               what="the valid message after the bad ones")
    assert tracker.counts["ignored"] >= 2 and tracker.counts["malformed"] == 6
    assert tracker.counts["failed"] == 0
    assert presence.stats()["malformed"] == 6, (presence.stats(), tracker.counts)


def test_the_trackers_socket_has_tcp_nodelay(committed_app: Any, start_tracker: Any) -> None:
    tracker = start_tracker()
    sock = tracker.client.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_the_embedded_broker_tracks_presence_with_a_plain_subscription(
        committed_app: Any, embedded_broker: Any, mqtt_clients: Any) -> None:
    a = provision(make_product())
    target = platform_target(committed_app.config)
    tracker = PresenceTracker(committed_app, target, shared=False)
    tracker.start()
    try:
        wait_until(tracker.subscribed.is_set, 10, what="the tracker's subscriptions")
        client = mqtt_clients(embedded_broker, a.username, a.password, client_id=a.client_id,
                              **V311)
        client.set_will(a.topic("status"), OFFLINE, qos=1, retain=True)
        assert not client.connect().is_failure
        client.publish(a.topic("status"), ONLINE, retain=True)
        tenant = a.device.tenant_id
        wait_until(lambda: presence.is_online(tenant, a.device.id), 10, what="online")

        client.kill()

        wait_until(lambda: not presence.is_online(tenant, a.device.id), 10,
                   what="amqtt to publish the will")
    finally:
        tracker.stop()
