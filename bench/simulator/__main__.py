"""``python -m bench.simulator``: provision a simulated fleet, connect it, report, stop.

    .venv/bin/python -m bench.simulator --devices 10000 --via import
    .venv/bin/python -m bench.simulator --devices 200 --via bootstrap

Everything runs against the services of the services profile under the benchmark's own names:
database ``ensoul_bench_sim`` (recreated), Redis db 14 with a per-run prefix, and a Mosquitto
started here from the project's config template on a free port. The platform writes that
Mosquitto's password and ACL files (``MosquittoFiles.sync``) before the devices connect. A
service client then counts the retained ``online`` statuses, which is what the platform's
presence tracker sees.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bench.common import (
    MosquittoServer,
    bench_settings,
    clear_redis_prefix,
    create_vendor,
    drop_database,
    fresh_database,
    mosquitto_settings,
    new_redis_prefix,
    raise_nofile_limit,
    write_result,
)
from bench.simulator.fleet import SimulatedFleet
from bench.simulator.identity import DeviceIdentity
from bench.simulator.probe import wait_until_accepted
from bench.simulator.provision import FlaskTransport, bootstrap_identities, import_identities


def count_online(server: MosquittoServer, identities: list[DeviceIdentity],
                 timeout: float = 30.0) -> int:
    """How many of the devices' retained statuses say online, as a platform client sees them."""
    from core.mqtt import new_client, parse_mqtt_url

    wanted = {d.topic("status") for d in identities}
    online: set[str] = set()
    lock = threading.Lock()
    done = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if message.topic in wanted and json.loads(message.payload).get("state") == "online":
            with lock:
                online.add(message.topic)
                if len(online) == len(wanted):
                    done.set()

    client = new_client(f"ensoul-bench-presence-{uuid.uuid4().hex[:8]}",
                        parse_mqtt_url(server.url))
    client.on_message = on_message
    # QoS 0: Mosquitto queues at most max_queued_messages (1,000) QoS 1 messages per client
    # and drops the rest, which would make a count of 10,000 retained statuses stop at 1,020.
    client.on_connect = lambda c, *a: c.subscribe("t/+/d/+/status", qos=0)
    client.connect(server.host, server.port, keepalive=30)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(online)


def platform_online(app: Any, tenant_id: uuid.UUID, expected: int,
                    timeout: float = 120.0) -> tuple[int, float]:
    """Poll the presence tracker's online count until it reaches ``expected``."""
    from fleet import presence

    started = time.monotonic()
    count = 0
    with app.app_context():
        while time.monotonic() - started < timeout:
            count = presence.online_count(tenant_id)
            if count >= expected:
                break
            time.sleep(0.05)  # polling interval, not synchronisation
    return count, time.monotonic() - started


def run(devices: int = 1000, via: str = "import", *, workers: int | None = None,
        hold: float = 0.0, database: str = "ensoul_bench_sim", keep_db: bool = False,
        result_name: str | None = "simulator",
        mosquitto_options: Sequence[str] = (), presence_tracker: bool = True,
        connect_concurrency: int = 8) -> dict[str, Any]:
    from app import create_app
    from core.db import db
    from fleet.broker_access.mosquitto import MosquittoFiles

    raise_nofile_limit()
    prefix = new_redis_prefix("sim")
    server = MosquittoServer(options=mosquitto_options).start()
    try:
        url = fresh_database(database)
        app = create_app(bench_settings(url, prefix, **mosquitto_settings(server)))
        with app.app_context():
            vendor = create_vendor("sim")
            started = time.perf_counter()
            provisioning: dict[str, Any]
            if via == "import":
                identities = import_identities(vendor, devices)
                provisioning = {"via": "import", "seconds": round(
                    time.perf_counter() - started, 3)}
            else:
                identities, boot = bootstrap_identities(FlaskTransport(app.test_client()),
                                                        vendor, devices)
                provisioning = {"via": "bootstrap (Flask test client)", **boot.as_dict()}
            sync_started = time.perf_counter()
            sync = MosquittoFiles.from_config(app.config).sync()
            provisioning["mosquitto_sync_seconds"] = round(time.perf_counter() - sync_started, 3)
            provisioning["mosquitto_sync"] = sync
            db.session.remove()
        # Mosquitto reloads after the SIGHUP, asynchronously: wait until it takes a device.
        provisioning["first_device_accepted_after_sync_seconds"] = round(
            wait_until_accepted(identities[0]), 3) if identities else None
        # The platform's presence tracker (the broker process's), in-process here.
        from core.mqtt import parse_mqtt_url
        from fleet.presence import PresenceTracker

        tracker = PresenceTracker(app, parse_mqtt_url(server.url), shared=False)
        if presence_tracker:
            tracker.start()
            tracker.subscribed.wait(10)
        fleet = SimulatedFleet(identities, workers=workers,
                               connect_concurrency=connect_concurrency)
        try:
            connect = fleet.start()
            online = count_online(server, identities)
            tracked, tracked_after = (platform_online(app, vendor.tenant_id, connect.connected)
                                      if presence_tracker else (0, 0.0))
        finally:
            if presence_tracker:
                tracker.stop()
        if hold:
            time.sleep(hold)
        held = fleet.stats()
        final = fleet.stop()
        result = {
            "devices": devices,
            "provisioning": provisioning,
            "connect": connect.as_dict(),
            "retained_online_seen_by_platform_client": online,
            "presence_tracker": {
                "online": tracked, "seconds_after_connects_to_see_them": round(tracked_after, 3),
                "messages": dict(tracker.counts)} if presence_tracker else None,
            "held_seconds": hold,
            "disconnects_while_held": held.disconnects,
            "stop": {"published": final.published, "received": final.received},
            "mosquitto_options": list(mosquitto_options),
            "command": f"python -m bench.simulator --devices {devices} --via {via}"
                       + (f" --hold {hold:g}" if hold else "")
                       + "".join(f" --mosquitto-option '{o}'" for o in mosquitto_options)
                       + ("" if presence_tracker else " --no-presence-tracker"),
        }
        if result_name:
            result["json"] = str(write_result(result_name, result))
        return result
    finally:
        server.stop()
        clear_redis_prefix(prefix)
        if not keep_db:
            drop_database(database)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simulator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--via", choices=["import", "bootstrap"], default="import")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: one per 2,500 devices)")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds to stay connected before stopping")
    parser.add_argument("--database", default="ensoul_bench_sim",
                        help="recreated, then dropped (must start with ensoul_bench)")
    parser.add_argument("--mosquitto-option", action="append", default=[],
                        help="an extra line for the Mosquitto config (what-if), repeatable")
    parser.add_argument("--connect-concurrency", type=int, default=8,
                        help="connects in flight per worker")
    parser.add_argument("--no-presence-tracker", action="store_true",
                        help="do not run the platform's presence tracker during the connects")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--result-name", default="simulator",
                        help="bench/results/<name>.json ('' for none)")
    args = parser.parse_args()
    result = run(args.devices, args.via, workers=args.workers, hold=args.hold,
                 database=args.database, keep_db=args.keep_db,
                 result_name=args.result_name or None,
                 mosquitto_options=args.mosquitto_option,
                 presence_tracker=not args.no_presence_tracker,
                 connect_concurrency=args.connect_concurrency)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
