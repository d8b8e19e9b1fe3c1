"""Mosquitto access control with real clients: the platform writes the password and ACL files
from the registry, reloads the project-configured Mosquitto, and the broker enforces them."""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

from core.db import db
from core.mqtt import new_client, parse_mqtt_url
from core.redis import get_redis, name
from fleet import services, tasks
from fleet.access import SYNC_QUEUED_KEY
from fleet.broker_access import get_broker_access
from fleet.broker_access.mosquitto import (
    PENDING_MARKER,
    MosquittoFiles,
    ReloadFailed,
    read_password_file,
    reload_failure,
)
from fleet.credentials import hash_password
from fleet.models import Device
from tests.conftest import MosquittoInstance
from tests.fleet.conftest import (
    MqttClient,
    Provisioned,
    log_in,
    make_product,
    provision,
    service_client,
)
from tests.support.waiting import wait_until

REFUSED = {"Not authorized", "Bad user name or password"}


class Fleet(NamedTuple):
    a: Provisioned  # tenant 1
    b: Provisioned  # tenant 1
    c: Provisioned  # tenant 2


@pytest.fixture
def fleet(app: Any, broker_platform: MosquittoInstance, mqtt_clients: Any) -> Fleet:
    product = make_product()
    devices = Fleet(provision(product), provision(product), provision(make_product()))
    MosquittoFiles.from_config(app.config).sync()
    connect_device(mqtt_clients, broker_platform, devices.c)  # the reload has been applied
    return devices


def connect_device(make: Callable[..., MqttClient], instance: MosquittoInstance,
                   device: Provisioned, password: str | None = None, **options: Any
                   ) -> MqttClient:
    """Log in as the device (SIGHUP is handled in Mosquitto's next loop, not at once)."""
    return log_in(make, instance, device.username, password or device.password,
                  client_id=device.client_id, **options)


def test_sync_writes_both_files_reloads_and_the_device_logs_in(
        app: Any, broker_platform: MosquittoInstance, mqtt_clients: Any) -> None:
    product = make_product()
    a, b = provision(product), provision(product)
    files = MosquittoFiles.from_config(app.config)

    report = files.sync()

    assert report == {"devices": 2, "changed": True, "reloaded": True}
    entries = read_password_file(broker_platform.password_file)
    assert entries[a.username] == a.device.mqtt_password_hash
    assert entries[b.username] == b.device.mqtt_password_hash
    assert entries[broker_platform.service_user].startswith("$7$101$")
    acl = broker_platform.acl_file.read_text()
    assert f"user {broker_platform.service_user}\ntopic readwrite t/#\n" in acl
    assert "pattern write t/%u/up\n" in acl and "pattern read t/%u/down\n" in acl
    for path in (broker_platform.password_file, broker_platform.acl_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in broker_platform.workdir.iterdir() if p.name.startswith(".")]
    connect_device(mqtt_clients, broker_platform, a)
    # The platform's own login (from MQTT_URL) survives the rewrite.
    service_client(mqtt_clients, broker_platform)

    assert files.sync() == {"devices": 2, "changed": False, "reloaded": False}


def test_sync_job_picks_the_mosquitto_adapter_from_the_settings(
        app: Any, broker_platform: MosquittoInstance) -> None:
    assert isinstance(get_broker_access(), MosquittoFiles)
    a = provision(make_product())
    get_redis().set(name(SYNC_QUEUED_KEY), "1")

    report = tasks.sync_broker_access()

    assert report["changed"] is True and report["reloaded"] is True
    assert a.username in read_password_file(broker_platform.password_file)
    assert not get_redis().exists(name(SYNC_QUEUED_KEY))


def test_wrong_secrets_and_foreign_usernames_are_refused(
        fleet: Fleet, broker_platform: MosquittoInstance, mqtt_clients: Any) -> None:
    a, b = fleet.a, fleet.b
    attempts = [
        (a.username, "wrong-password"),
        (b.username, a.password),  # another device's username
        ("not-a-device", a.password),
        (a.username, None),
        (None, None),
    ]
    for username, password in attempts:
        client = mqtt_clients(broker_platform, username, password)
        assert str(client.connect()) in REFUSED, (username, password)


def test_a_device_cannot_reach_other_devices_or_tenants(
        fleet: Fleet, broker_platform: MosquittoInstance, mqtt_clients: Any) -> None:
    a, b, c = fleet
    observer = service_client(mqtt_clients, broker_platform)
    observer.subscribe("t/#")
    b_client = connect_device(mqtt_clients, broker_platform, b)
    b_client.publish(b.topic("status"), '{"state":"online"}', retain=True)
    a_client = connect_device(mqtt_clients, broker_platform, a)

    # Mosquitto 2.0 grants every SUBACK and checks read access on each delivery.
    for topic in (a.topic("down"), b.topic("down"), c.topic("down"), b.topic("status"),
                  "t/+/d/#", "#", f"t/{a.device.tenant_id}/#"):
        a_client.subscribe(topic)
    for topic in (b.topic("down"), b.topic("config"), c.topic("down"), c.topic("config")):
        assert not observer.publish(topic, b"not for A").is_failure
    observer.publish(a.topic("down"), b"for A")
    # Deliveries to A keep the broker's order: once "for A" is in, nothing else came before.
    a_client.wait_for(a.topic("down"), b"for A")
    assert {m.topic for m in a_client.received()} == {a.topic("down")}
    assert all(m.payload == b"for A" for m in a_client.received())

    for topic in (b.topic("up"), c.topic("up"), b.topic("status"), a.topic("down"),
                  a.topic("down/audio"), a.topic("config"), f"t/{a.device.tenant_id}/x"):
        assert str(a_client.publish(topic, b"forged")) == "Not authorized", topic
    for suffix in ("up", "up/audio", "state", "status"):
        assert str(a_client.publish(a.topic(suffix), b"mine")) == "Success", suffix
    observer.wait_for(a.topic("status"), b"mine")
    forged = [m for m in observer.received() if m.payload == b"forged"]
    assert forged == []


def test_rotation_disconnects_the_device_and_refuses_the_old_secret(
        app: Any, fleet: Fleet, broker_platform: MosquittoInstance, mqtt_clients: Any) -> None:
    a = fleet.a
    connected = connect_device(mqtt_clients, broker_platform, a)
    untouched = connect_device(mqtt_clients, broker_platform, fleet.b)

    new_password = services.issue_credentials(a.device)
    db.session.commit()
    assert MosquittoFiles.from_config(app.config).sync()["reloaded"] is True

    # Mosquitto re-checks connected clients on reload: the old secret no longer matches.
    wait_until(connected.disconnected.is_set, 10, what="the rotated device to be disconnected")
    assert not untouched.disconnected.is_set()
    old = mqtt_clients(broker_platform, a.username, a.password, client_id=a.client_id)
    assert str(old.connect()) in REFUSED
    connect_device(mqtt_clients, broker_platform, a, new_password)


@pytest.mark.parametrize("change", ["revoke", "suspend", "retire", "reset"])
def test_losing_access_disconnects_at_once_and_refuses_reconnects(
        app: Any, fleet: Fleet, broker_platform: MosquittoInstance, mqtt_clients: Any,
        change: str) -> None:
    a = fleet.a
    connected = connect_device(mqtt_clients, broker_platform, a)
    if change == "revoke":
        services.revoke_credentials(a.device)
    elif change == "reset":
        services.reset(a.device)
    else:
        services.change_status(a.device, change)
    db.session.commit()

    report = MosquittoFiles.from_config(app.config).sync()

    assert report["devices"] == 2 and report["reloaded"] is True
    wait_until(connected.disconnected.is_set, 10, what=f"the device to be disconnected ({change})")
    again = mqtt_clients(broker_platform, a.username, a.password, client_id=a.client_id)
    assert str(again.connect()) in REFUSED
    assert a.username not in read_password_file(broker_platform.password_file)


def test_a_resumed_device_logs_in_again(app: Any, fleet: Fleet,
                                        broker_platform: MosquittoInstance,
                                        mqtt_clients: Any) -> None:
    files = MosquittoFiles.from_config(app.config)
    services.change_status(fleet.a.device, "suspend")
    db.session.commit()
    files.sync()
    services.change_status(fleet.a.device, "resume")
    db.session.commit()
    files.sync()
    connect_device(mqtt_clients, broker_platform, fleet.a)


def test_reconciler_rebuilds_a_deleted_password_file(
        app: Any, fleet: Fleet, broker_platform: MosquittoInstance, mqtt_clients: Any) -> None:
    broker_platform.password_file.unlink()

    report = tasks.reconcile_broker_access()

    assert report == {"devices": 3, "changed": True, "reloaded": True, "added": 4,
                      "updated": 0, "removed": 0, "acl_rewritten": False}
    connect_device(mqtt_clients, broker_platform, fleet.a)


def test_reconciler_repairs_tampered_files(app: Any, fleet: Fleet,
                                           broker_platform: MosquittoInstance,
                                           mqtt_clients: Any) -> None:
    a = fleet.a
    # Someone edits both files and reloads Mosquitto behind the platform's back.
    lines = broker_platform.password_file.read_text().replace(
        a.device.mqtt_password_hash or "", hash_password("attacker-chosen"))
    broker_platform.password_file.write_text(lines + f"intruder:{hash_password('let-me-in')}\n")
    with broker_platform.acl_file.open("a") as acl:
        acl.write("user intruder\ntopic readwrite #\n")
    os.kill(int(broker_platform.pid_file.read_text()), signal.SIGHUP)

    def intruder_gets_in() -> MqttClient | None:
        probe = mqtt_clients(broker_platform, "intruder", "let-me-in")
        return None if probe.connect().is_failure else probe

    intruder = wait_until(intruder_gets_in, 10, what="the tampered files to load")

    report = tasks.reconcile_broker_access()

    assert report == {"devices": 3, "changed": True, "reloaded": True, "added": 0,
                      "updated": 1, "removed": 1, "acl_rewritten": True}
    wait_until(intruder.disconnected.is_set, 10, what="the intruder to be disconnected")
    again = mqtt_clients(broker_platform, "intruder", "let-me-in")
    assert str(again.connect()) in REFUSED
    connect_device(mqtt_clients, broker_platform, a)
    assert tasks.reconcile_broker_access()["changed"] is False


def test_unreachable_mosquitto_keeps_provisioning_and_the_next_sync_converges(
        app: Any, fleet: Fleet, broker_platform: MosquittoInstance, mqtt_clients: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = fleet.a
    new_password = services.issue_credentials(a.device)
    db.session.commit()
    issued_hash = a.device.mqtt_password_hash
    monkeypatch.setitem(app.config, "ENSOUL_MOSQUITTO_PID_FILE",
                        str(broker_platform.workdir / "no-such.pid"))

    with pytest.raises(ReloadFailed, match="no Mosquitto pid"):
        tasks.sync_broker_access()

    failure = reload_failure()
    assert failure is not None and "no-such.pid" in failure["error"]
    assert (broker_platform.workdir / PENDING_MARKER).exists()
    db.session.expire_all()
    assert db.session.get(Device, a.device.id).mqtt_password_hash == issued_hash
    # Written but not loaded: Mosquitto still knows only the old secret.
    assert read_password_file(broker_platform.password_file)[a.username] == issued_hash
    connect_device(mqtt_clients, broker_platform, a, a.password)

    # The scheduler's retry job queues a sync while the failure stands...
    get_redis().delete(name(SYNC_QUEUED_KEY))
    assert tasks.retry_broker_access_sync() is True
    assert get_redis().exists(name(SYNC_QUEUED_KEY))
    # ...and once Mosquitto is reachable the unchanged files are reloaded all the same.
    monkeypatch.setitem(app.config, "ENSOUL_MOSQUITTO_PID_FILE", str(broker_platform.pid_file))
    assert tasks.sync_broker_access() == {"devices": 3, "changed": False, "reloaded": True}
    assert reload_failure() is None
    assert tasks.retry_broker_access_sync() is False
    connect_device(mqtt_clients, broker_platform, a, new_password)
    old = mqtt_clients(broker_platform, a.username, a.password)
    assert str(old.connect()) in REFUSED


def test_a_pid_file_naming_another_process_is_not_signalled(
        app: Any, fleet: Fleet, broker_platform: MosquittoInstance) -> None:
    pid_file = broker_platform.workdir / "stale.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # this pytest process: it must get no SIGHUP
    files = MosquittoFiles.from_config(
        {**app.config, "ENSOUL_MOSQUITTO_PID_FILE": str(pid_file)})
    provision(make_product())

    with pytest.raises(ReloadFailed, match="not mosquitto"):
        files.sync()
    assert reload_failure() is not None


def test_the_reload_command_replaces_the_signal(
        app: Any, fleet: Fleet, broker_platform: MosquittoInstance, mqtt_clients: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.config, "ENSOUL_MOSQUITTO_RELOAD_COMMAND", "exit 3")
    provision(make_product())
    with pytest.raises(ReloadFailed, match="exited with 3"):
        MosquittoFiles.from_config(app.config).sync()

    monkeypatch.setitem(app.config, "ENSOUL_MOSQUITTO_RELOAD_COMMAND",
                        f"kill -HUP $(cat {broker_platform.pid_file})")
    d = provision(make_product())
    assert MosquittoFiles.from_config(app.config).sync()["reloaded"] is True
    connect_device(mqtt_clients, broker_platform, d)


def test_a_device_connects_over_tls(fleet: Fleet, broker_platform: MosquittoInstance,
                                    mqtt_clients: Any) -> None:
    client = connect_device(mqtt_clients, broker_platform, fleet.a, tls=True)
    assert client.publish(fleet.a.topic("up"), b"{}").is_failure is False
    sock = client.client.socket()
    assert sock is not None and sock.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_refuses_a_wrong_password_too(fleet: Fleet, broker_platform: MosquittoInstance,
                                          mqtt_clients: Any) -> None:
    client = mqtt_clients(broker_platform, fleet.a.username, "wrong", tls=True)
    assert str(client.connect()) in REFUSED


def test_the_project_config_turns_nagle_off_and_listens_with_tls(
        broker_platform: MosquittoInstance) -> None:
    rendered = broker_platform.config_file.read_text().splitlines()
    assert "set_tcp_nodelay true" in rendered
    assert "allow_anonymous false" in rendered
    assert f"listener {broker_platform.tls_port} {broker_platform.host}" in rendered
    assert f"certfile {broker_platform.certificates.cert_file}" in rendered


def test_platform_clients_set_tcp_nodelay(broker_platform: MosquittoInstance) -> None:
    client = new_client("ensoul-test-nodelay", parse_mqtt_url(broker_platform.url))
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(broker_platform.host, broker_platform.port)
    client.loop_start()
    try:
        wait_until(connected.is_set, 10, what="CONNACK")
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.disconnect()
        client.loop_stop()
