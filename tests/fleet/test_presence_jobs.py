"""Presence bookkeeping without a broker (record, flush), the scheduler's periodic jobs, and
the Procfile's broker process tracking presence end to end."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from billing.tasks import periodic_jobs as billing_jobs
from core.db import db
from core.mqtt import parse_mqtt_url
from core.queue import get_queue
from core.redis import get_redis
from fleet import presence, tasks
from fleet.broker_access.mosquitto import MosquittoFiles
from fleet.models import Device
from fleet.presence import PresenceTracker, record
from fleet.tasks import periodic_jobs as fleet_jobs
from inference.tasks import periodic_jobs as inference_jobs
from processes import run_periodic
from tests.conftest import MosquittoInstance
from tests.fleet.conftest import log_in, make_product, provision
from tests.support.processes import ManagedProcess, flask_command
from tests.support.waiting import wait_until

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


def ids(device: Device) -> tuple[str, str]:
    return str(device.tenant_id), str(device.id)


def test_flush_moves_last_seen_forward_only_and_keeps_unreported_versions(app: Any) -> None:
    device = provision(make_product()).device
    tenant_id, device_id = ids(device)
    record(tenant_id, device_id, "state", {"firmware_version": "2.0.1", "config_version": 3},
           retained=False, now=NOW)
    assert tasks.flush_presence() == {"devices": 1}
    db.session.refresh(device)
    assert (device.last_seen_at, device.firmware_version, device.config_version) == (
        NOW, "2.0.1", "3")

    # An older report (clocks, replays) never moves last_seen back; absent versions stay.
    record(tenant_id, device_id, "state", {"battery": 40}, retained=False,
           now=NOW - dt.timedelta(hours=1))
    assert tasks.flush_presence() == {"devices": 1}
    db.session.refresh(device)
    assert (device.last_seen_at, device.firmware_version) == (NOW, "2.0.1")


def test_flush_never_writes_another_tenants_device(app: Any) -> None:
    mine = provision(make_product()).device
    theirs = provision(make_product()).device
    # A device id filed under the wrong tenant's keys is not that tenant's row.
    record(str(mine.tenant_id), str(theirs.id), "status", {"state": "online"}, retained=False,
           now=NOW)
    tasks.flush_presence()
    db.session.refresh(theirs)
    assert theirs.last_seen_at is None


def test_retained_replays_say_nothing_about_when(app: Any) -> None:
    tenant_id, device_id = ids(provision(make_product()).device)
    record(tenant_id, device_id, "status", {"state": "offline"}, retained=True)
    record(tenant_id, device_id, "state", {"firmware_version": "1"}, retained=True)
    assert presence.last_seen(tenant_id, device_id) is None
    assert presence.reported_state(tenant_id, device_id) == {"firmware_version": "1"}
    # A retained "online" means the device is connected right now.
    record(tenant_id, device_id, "status", {"state": "online"}, retained=True, now=NOW)
    assert presence.last_seen(tenant_id, device_id) == NOW
    assert presence.is_online(tenant_id, device_id)


def test_the_tracker_handles_messages_without_a_broker(app: Any) -> None:
    tenant_id, device_id = ids(provision(make_product()).device)
    tracker = PresenceTracker(app, parse_mqtt_url("mqtt://nobody:nothing@127.0.0.1:9"))
    topic = f"t/{tenant_id}/d/{device_id}/status"
    assert tracker.handle(topic, b'{"state":"online"}') == "recorded"
    assert presence.is_online(tenant_id, device_id)
    assert tracker.handle(topic, b"") == "recorded"  # a cleared retained status: offline
    assert not presence.is_online(tenant_id, device_id)
    assert tracker.handle(f"t/{tenant_id}/d/{uuid.uuid4()}/status", b"{}") == "ignored"
    assert tracker.handle(f"t/{tenant_id}/d/{device_id}/up", b"{}") == "ignored"
    assert tracker.handle(topic, b'{"state": 1}') == "malformed"
    assert presence.stats() == {"ignored": 2, "malformed": 1}


def test_the_scheduler_enqueues_each_periodic_job_once_per_interval(app: Any) -> None:
    expected = sorted(f"{job.__module__}.{job.__name__}" for _, job in
                      fleet_jobs(app.config) + inference_jobs(app.config)
                      + billing_jobs(app.config))
    stop = threading.Event()
    schedulers = [threading.Thread(target=run_periodic, args=(app, stop)) for _ in range(2)]
    for scheduler in schedulers:
        scheduler.start()
    try:
        queue = get_queue()
        wait_until(lambda: queue.count >= len(expected), 10, what="the periodic jobs")
    finally:
        stop.set()
        for scheduler in schedulers:
            scheduler.join(10)
    names = sorted(Job.fetch(i, connection=get_redis(), serializer=JSONSerializer).func_name
                   for i in queue.job_ids)
    # Two schedulers, one enqueue each: the per-interval key lets only one through.
    assert names == expected
    assert "fleet.tasks.flush_presence" in names and "billing.tasks.expire_packages" in names


@pytest.fixture
def broker_process(database_url: str, redis_url: str, redis_prefix: str,
                   broker_platform: MosquittoInstance, log_dir: Path
                   ) -> Iterator[ManagedProcess]:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "MQTT_URL": broker_platform.url,
           "SECRET_KEY": "test-secret-key", "ENSOUL_ENCRYPTION_KEY": "test-encryption-key",
           "ENSOUL_REDIS_PREFIX": redis_prefix, "ENSOUL_LOG_JSON": "1"}
    process = ManagedProcess("fleet-broker", flask_command("broker"), env=env, log_dir=log_dir)
    process.ready = lambda: "broker started" in process.output()
    yield process
    process.stop()


def test_the_broker_process_tracks_presence(committed_app: Any,
                                            broker_platform: MosquittoInstance,
                                            broker_process: ManagedProcess,
                                            mqtt_clients: Any) -> None:
    a = provision(make_product())
    MosquittoFiles.from_config(committed_app.config).sync()
    broker_process.start(timeout=30)
    device = log_in(mqtt_clients, broker_platform, a.username, a.password,
                    client_id=a.client_id)
    device.publish(a.topic("status"), json.dumps({"state": "online"}), retain=True)

    tenant_id, device_id = ids(a.device)
    wait_until(lambda: presence.is_online(tenant_id, device_id), 15,
               what="the broker process to record the device online")
    device.publish(a.topic("status"), json.dumps({"state": "offline"}), retain=True)
    wait_until(lambda: not presence.is_online(tenant_id, device_id), 15, what="offline")
    assert broker_process.stop() == 0, broker_process.output()[-2000:]
