"""Provisioning to Mosquitto: from a CSV import to the first device of the batch connecting.

    .venv/bin/python -m bench.fleet_provisioning               # 10,000 devices x 3
    .venv/bin/python -m bench.fleet_provisioning --devices 500 --repeats 1 --no-connect-all

Platform path, per repeat (registry emptied first):
  1. ``import_devices(..., issue_credentials=True, activate=True)`` and commit (a PBKDF2 hash
     per device, the encrypted one-time credentials file);
  2. the one-time credentials file is taken (the factory's download; timed apart);
  3. ``MosquittoFiles.from_config(config).sync()``: password and ACL files rewritten from the
     registry, ``SIGHUP`` to Mosquitto (what the debounced ``sync_broker_access`` job runs;
     the rq queueing delay is not included);
  4. until Mosquitto accepts the batch's first device (connect attempts every few ms).
Baseline (the floor), interleaved with it on the same Mosquitto: hash the same number of
passwords in Python exactly as ``mosquitto_passwd`` does (``$7$``, PBKDF2-SHA512), write the
password and ACL files, ``SIGHUP``, until the first device is accepted. The issue's target:
10,000 devices in under 60 s. After the last repeat the whole batch connects through the
fleet simulator (connect rate). Results: ``bench/results/fleet_provisioning.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    MosquittoServer,
    bench_settings,
    clear_redis_prefix,
    create_vendor,
    device_csv,
    drop_database,
    fresh_database,
    median,
    mosquitto_settings,
    new_redis_prefix,
    raise_nofile_limit,
    write_result,
)
from bench.fleet_import import truncate_registry
from bench.simulator import DeviceIdentity, SimulatedFleet, identities_from_credentials_csv
from bench.simulator.probe import wait_until_accepted

TARGET_SECONDS = 60.0


def write_atomically(path: Path, content: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def floor_run(server: MosquittoServer, devices: int) -> dict[str, float]:
    """Hash, write, SIGHUP, first connect: no database, no registry."""
    from fleet.credentials import hash_password
    from fleet.topics import acl_patterns

    tenant = uuid.uuid4()
    secrets = [(f"{tenant}/d/{uuid.uuid4()}", uuid.uuid4().hex) for _ in range(devices)]
    started = time.perf_counter()
    lines = [f"{server.service_user}:{hash_password(server.service_password)}\n"]
    lines.extend(f"{user}:{hash_password(password)}\n" for user, password in secrets)
    write_atomically(server.password_file, "".join(lines))
    write_atomically(server.acl_file, f"user {server.service_user}\ntopic readwrite t/#\n\n"
                     + "".join(line + "\n" for line in acl_patterns()))
    written = time.perf_counter()
    server.reload()
    user, password = secrets[0]
    first = DeviceIdentity(device_id=user.rsplit("/", 1)[1], username=user, password=password,
                           topic_prefix=f"t/{user}", host=server.host, port=server.port)
    accepted = wait_until_accepted(first)
    total = time.perf_counter() - started
    return {"hash_and_write_seconds": written - started, "first_accepted_seconds": accepted,
            "total_seconds": total}


def run(devices: int = 10_000, repeats: int = 3, *, connect_all: bool = True,
        database: str = "ensoul_bench_provisioning", result_name: str | None =
        "fleet_provisioning", keep_db: bool = False) -> dict[str, Any]:
    from app import create_app
    from core.db import db
    from fleet import imports
    from fleet.broker_access.mosquitto import MosquittoFiles
    from fleet.models import Product

    raise_nofile_limit()
    prefix = new_redis_prefix("prov")
    server = MosquittoServer().start()
    url = fresh_database(database)
    raw = psycopg.connect(url)
    try:
        app = create_app(bench_settings(url, prefix, **mosquitto_settings(server)))
        with app.app_context():
            vendor = create_vendor("prov")

        last_batch: list[DeviceIdentity] = []

        def platform_run(i: int) -> dict[str, float]:
            truncate_registry(raw)
            data = device_csv(devices, f"P{i}X")
            with app.app_context():
                product = db.session.get(Product, vendor.product_id)
                started = time.perf_counter()
                batch = imports.import_devices(product, data, filename="factory.csv",
                                               issue_credentials=True, activate=True)
                db.session.commit()
                imported = time.perf_counter()
                content = imports.take_credentials_file(batch)
                db.session.commit()
                taken = time.perf_counter()
                identities = identities_from_credentials_csv(content, server.host, server.port)
                resumed = time.perf_counter()
                report = MosquittoFiles.from_config(app.config).sync()
                synced = time.perf_counter()
                db.session.remove()
            if not report["reloaded"] or report["devices"] != devices:
                raise RuntimeError(f"unexpected sync report {report}")
            accepted = wait_until_accepted(identities[0])
            last_batch[:] = identities
            import_s, sync_s = imported - started, synced - resumed
            return {"import_seconds": import_s, "credentials_file_seconds": taken - imported,
                    "sync_seconds": sync_s, "first_accepted_seconds": accepted,
                    "total_seconds": import_s + sync_s + accepted}

        runs: dict[str, list[dict[str, float]]] = {"platform": [], "floor": []}
        for i in range(repeats):
            order = ["platform", "floor"] if i % 2 == 0 else ["floor", "platform"]
            for variant in order:
                runs[variant].append(platform_run(i) if variant == "platform"
                                     else floor_run(server, devices))

        def medians(values: list[dict[str, float]]) -> dict[str, float]:
            return {k: round(median([v[k] for v in values]), 3) for k in values[0]}

        summary = {k: {"median": medians(v),
                       "runs": [{m: round(x, 3) for m, x in r.items()} for r in v]}
                   for k, v in runs.items()}
        platform_total = summary["platform"]["median"]["total_seconds"]
        floor_total = summary["floor"]["median"]["total_seconds"]
        payload: dict[str, Any] = {
            "command": f"python -m bench.fleet_provisioning --devices {devices} "
                       f"--repeats {repeats}",
            "devices": devices,
            "target": f"{devices} devices provisioned to Mosquitto in under "
                      f"{TARGET_SECONDS:g} s (issue 3)",
            "target_met": platform_total < TARGET_SECONDS,
            "devices_per_second": round(devices / platform_total),
            "ratio_to_floor": round(platform_total / floor_total, 2),
            **summary,
        }
        if connect_all:
            # The floor's file is live now; put the last platform batch back, then connect it.
            with app.app_context():
                MosquittoFiles.from_config(app.config).sync()
                db.session.remove()
            wait_until_accepted(last_batch[0])
            fleet = SimulatedFleet(last_batch)
            report = fleet.start()
            fleet.stop()
            payload["connect_all"] = report.as_dict()
        if result_name:
            payload["json"] = str(write_result(result_name, payload))
        return payload
    finally:
        raw.close()
        server.stop()
        clear_redis_prefix(prefix)
        if not keep_db:
            drop_database(database)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_provisioning",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-connect-all", action="store_true")
    parser.add_argument("--database", default="ensoul_bench_provisioning",
                        help="recreated, then dropped (must start with ensoul_bench)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--result-name", default="fleet_provisioning")
    args = parser.parse_args()
    print(json.dumps(run(args.devices, args.repeats, connect_all=not args.no_connect_all,
                         database=args.database, keep_db=args.keep_db,
                         result_name=args.result_name or None),
                     indent=2))


if __name__ == "__main__":
    main()
