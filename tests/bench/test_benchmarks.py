"""The simulator and every benchmark run end to end on tiny sizes, so they do not rot.

Each script runs as its own process (as documented in docs/benchmarks.md), with its own
database and without writing results; the figures are not checked here, only that every part
ran and the report has its shape. The simulator's hook (publish, forwarded messages, a
behaviour) is exercised in-process against a Mosquitto started from the project's template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from bench.common import MosquittoServer
from bench.simulator import DeviceIdentity, SimulatedFleet
from fleet.credentials import hash_password
from fleet.topics import acl_patterns
from tests.support.processes import PROJECT_ROOT

RUN = f"{os.environ.get('PYTEST_XDIST_WORKER', 'gw0')}_{uuid.uuid4().hex[:6]}"


SCRIPTS = {
    "simulator_import": ("bench.simulator", "--devices", "20", "--via", "import"),
    "simulator_bootstrap": ("bench.simulator", "--devices", "4", "--via", "bootstrap"),
    "fleet_import": ("bench.fleet_import", "--rows", "20", "--repeats", "1", "--big", "0"),
    "fleet_provisioning": ("bench.fleet_provisioning", "--devices", "20", "--repeats", "1"),
    "device_list": ("bench.device_list", "--devices", "300", "--other-tenant", "50",
                    "--samples", "1"),
}


def run_all() -> dict[str, dict[str, Any]]:
    """Every script at once (they wait on Postgres, Mosquitto and process starts more than
    they compute), each with its own database; their JSON reports by name."""
    procs = {
        label: subprocess.Popen(
            [sys.executable, "-m", module, *args, "--result-name", "",
             "--database", f"ensoul_bench_test_{label}_{RUN}"],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for label, (module, *args) in SCRIPTS.items()
    }
    out: dict[str, dict[str, Any]] = {}
    for label, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[label] = (json.loads(stdout) if proc.returncode == 0
                      else {"failed": f"exit {proc.returncode}: {stderr[-3000:]}"})
    return out


def test_every_benchmark_script_runs_end_to_end() -> None:
    """One test, so pytest-xdist never runs the five scripts twice on two workers."""
    reports = run_all()
    failed = {label: r["failed"] for label, r in reports.items() if "failed" in r}
    assert not failed, failed

    simulated = reports["simulator_import"]
    assert simulated["connect"]["connected"] == 20
    assert simulated["connect"]["failures"] == {}
    assert simulated["provisioning"]["mosquitto_sync"]["devices"] == 20
    assert simulated["retained_online_seen_by_platform_client"] == 20
    assert simulated["presence_tracker"]["online"] == 20

    booted = reports["simulator_bootstrap"]
    assert booted["provisioning"]["activated"] == 4, booted["provisioning"]
    assert booted["connect"]["connected"] == 4

    variants = reports["fleet_import"]["sizes"][0]["variants"]
    assert set(variants) == {"parse_only", "service", "service_with_credentials", "rest",
                             "copy_floor", "executemany_floor"}
    assert all(v["median_seconds"] > 0 for v in variants.values())

    provisioned = reports["fleet_provisioning"]
    assert provisioned["platform"]["median"]["first_accepted_seconds"] >= 0
    assert provisioned["floor"]["median"]["total_seconds"] > 0
    assert provisioned["connect_all"]["connected"] == 20

    listed = reports["device_list"]
    assert listed["queries"]["first_page"]["items"] == 50
    assert listed["queries"]["online_true"]["items"] == 30
    assert all(q["statements_per_request"] >= 1 for q in listed["queries"].values())
    assert set(listed["what_if"]) == {"changes", "pages", "online", "prefix_search"}


@pytest.fixture
def broker_with_devices() -> Iterator[tuple[MosquittoServer, list[DeviceIdentity]]]:
    server = MosquittoServer()
    tenant = uuid.uuid4()
    devices = []
    lines = [server.password_file.read_text()]
    for _ in range(3):
        device_id = str(uuid.uuid4())
        username, password = f"{tenant}/d/{device_id}", uuid.uuid4().hex
        devices.append(DeviceIdentity(device_id, username, password, f"t/{username}",
                                      server.host, server.port))
        lines.append(f"{username}:{hash_password(password)}\n")
    server.password_file.write_text("".join(lines))
    server.acl_file.write_text(server.acl_file.read_text()
                               + "".join(p + "\n" for p in acl_patterns()))
    server.start()
    yield server, devices
    server.stop()


def test_fleet_hook_publishes_receives_and_runs_behaviours(
        broker_with_devices: tuple[MosquittoServer, list[DeviceIdentity]]) -> None:
    from core.mqtt import new_client, parse_mqtt_url

    server, devices = broker_with_devices
    heard: list[tuple[str, bytes]] = []
    got_up = threading.Event()
    platform = new_client("bench-test-platform", parse_mqtt_url(server.url))
    platform.on_message = lambda c, u, m: (heard.append((m.topic, m.payload)), got_up.set())
    subscribed = threading.Event()
    platform.on_subscribe = lambda *a: subscribed.set()
    platform.on_connect = lambda c, *a: c.subscribe("t/+/d/+/up", qos=1)
    platform.connect(server.host, server.port)
    platform.loop_start()
    fleet = SimulatedFleet(devices, forward_messages=True,
                           behaviour="tests.bench.behaviours:say_hello")
    try:
        assert subscribed.wait(5)
        report = fleet.start(timeout=30)
        assert report.connected == 3 and report.failures == {}
        fleet.publish(devices[1], "up", b'{"type": "ping"}', qos=1)
        assert got_up.wait(5)
        platform.publish(devices[2].topic("down"), b"pong", qos=1)
        device_id, topic, payload = fleet.messages.get(timeout=5)
        assert (device_id, topic, payload) == (devices[2].device_id, devices[2].topic("down"),
                                               b"pong")
    finally:
        final = fleet.stop()
        platform.disconnect()
        platform.loop_stop()
    assert (devices[1].topic("up"), b'{"type": "ping"}') in heard
    assert sorted(r["device"] for r in final.behaviour_results) == sorted(
        d.device_id for d in devices)
    assert final.behaviour_errors == []
