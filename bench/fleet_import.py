"""CSV import rate: ``fleet.imports.import_devices`` and the REST upload against bare inserts.

    .venv/bin/python -m bench.fleet_import                  # 10,000 rows x 3, then 100,000 x 1
    .venv/bin/python -m bench.fleet_import --rows 2000 --repeats 1 --big 0

Variants, run interleaved in each repeat so the machine's noise falls on all of them alike
(the registry is truncated before each, so every run inserts into the same empty tables):

- ``parse_only``: ``imports.parse`` (validation of every row), no database.
- ``service``: ``import_devices`` in an app context, committed (no credentials).
- ``service_with_credentials``: the same with ``issue_credentials`` and ``activate`` (a
  PBKDF2 hash per device, the encrypted one-time file, the activation events).
- ``rest``: ``POST /api/v1/device-imports`` (multipart) through the Flask test client, with the
  token authentication, rate limits and JSON answer of a real request.
- baselines (the floor): the same device, tag and event rows inserted bare with psycopg,
  ``copy`` (``COPY ... FROM STDIN``) and ``executemany`` (pipelined ``INSERT``), committed.

The issue's target: 10,000 rows in under 10 s. Results: ``bench/results/fleet_import.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Json

from bench.common import (
    Vendor,
    bench_settings,
    clear_redis_prefix,
    create_vendor,
    device_csv,
    drop_database,
    fresh_database,
    median,
    new_redis_prefix,
    write_result,
)

TARGET_SECONDS_10K = 10.0
DEVICE_COLUMNS = ("id", "tenant_id", "product_id", "serial", "mac", "name", "group_name",
                  "status", "created_at")


def truncate_registry(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE devices, device_tags, device_events, device_imports, "
                 "activation_challenges, device_licences")
    conn.commit()


def bare_rows(vendor: Vendor, data: bytes) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]],
                                                    list[tuple[Any, ...]]]:
    """The device, tag and event rows the import would write, prepared outside the timing."""
    from core.ids import uuid7

    now = dt.datetime.now(dt.UTC)
    devices, tags, events = [], [], []
    lines = data.decode().splitlines()[1:]
    for line in lines:
        serial, mac, name, group, tag_cell = line.split(",")
        device_id = uuid7()
        devices.append((device_id, vendor.tenant_id, vendor.product_id, serial, mac, name,
                        group, "provisioned", now))
        tags.extend((vendor.tenant_id, device_id, t) for t in tag_cell.split(";") if t)
        events.append((uuid7(), vendor.tenant_id, device_id, "created", "bench",
                       Json({"via": "import"}), now))
    return devices, tags, events


EVENT_COLUMNS = ("id", "tenant_id", "device_id", "kind", "actor", "details", "created_at")
TAG_COLUMNS = ("tenant_id", "device_id", "tag")


def copy_floor(conn: psycopg.Connection[Any], rows: tuple[list[Any], list[Any], list[Any]]
               ) -> None:
    devices, tags, events = rows
    with conn.cursor() as cur:
        for table, columns, data in (("devices", DEVICE_COLUMNS, devices),
                                     ("device_tags", TAG_COLUMNS, tags),
                                     ("device_events", EVENT_COLUMNS, events)):
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)))
                    ) as copy:
                for row in data:
                    copy.write_row(row)
    conn.commit()


def executemany_floor(conn: psycopg.Connection[Any],
                      rows: tuple[list[Any], list[Any], list[Any]]) -> None:
    devices, tags, events = rows
    with conn.cursor() as cur:
        for table, columns, data in (("devices", DEVICE_COLUMNS, devices),
                                     ("device_tags", TAG_COLUMNS, tags),
                                     ("device_events", EVENT_COLUMNS, events)):
            statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.SQL(", ").join(sql.Placeholder() * len(columns)))
            cur.executemany(statement, data)
    conn.commit()


def run(rows: int = 10_000, repeats: int = 3, big: int = 100_000, *,
        database: str = "ensoul_bench_import", result_name: str | None = "fleet_import",
        keep_db: bool = False) -> dict[str, Any]:
    from app import create_app
    from core.db import db
    from fleet import imports
    from fleet.models import Product

    prefix = new_redis_prefix("import")
    url = fresh_database(database)
    app = create_app(bench_settings(url, prefix))
    client = app.test_client()
    raw = psycopg.connect(url)
    try:
        with app.app_context():
            vendor = create_vendor("import")

        def service(data: bytes, **options: Any) -> float:
            with app.app_context():
                product = db.session.get(Product, vendor.product_id)
                started = time.perf_counter()
                imports.import_devices(product, data, filename="bench.csv", **options)
                db.session.commit()
                return time.perf_counter() - started

        def rest(data: bytes) -> float:
            started = time.perf_counter()
            response = client.post("/api/v1/device-imports", headers=vendor.auth, data={
                "product_id": str(vendor.product_id),
                "file": (io.BytesIO(data), "bench.csv")})
            elapsed = time.perf_counter() - started
            if response.status_code != 201:
                raise RuntimeError(f"import answered {response.status_code}: "
                                   f"{response.get_data(as_text=True)[:500]}")
            return elapsed

        def timed(func: Callable[[], None]) -> float:
            started = time.perf_counter()
            func()
            return time.perf_counter() - started

        def parse_only(data: bytes) -> float:
            return timed(lambda: imports.parse(data))

        def size_run(n: int, times: int, variants: list[str]) -> dict[str, Any]:
            seconds: dict[str, list[float]] = {v: [] for v in variants}
            for i in range(times):
                order = variants[i % len(variants):] + variants[:i % len(variants)]
                for variant in order:
                    truncate_registry(raw)
                    data = device_csv(n, f"I{i}{variant[:2].upper()}")
                    if variant == "parse_only":
                        seconds[variant].append(parse_only(data))
                    elif variant == "service":
                        seconds[variant].append(service(data))
                    elif variant == "service_with_credentials":
                        seconds[variant].append(service(data, issue_credentials=True,
                                                        activate=True))
                    elif variant == "rest":
                        seconds[variant].append(rest(data))
                    elif variant == "copy_floor":
                        prepared = bare_rows(vendor, data)
                        seconds[variant].append(timed(lambda p=prepared: copy_floor(raw, p)))
                    elif variant == "executemany_floor":
                        prepared = bare_rows(vendor, data)
                        seconds[variant].append(timed(
                            lambda p=prepared: executemany_floor(raw, p)))
            floor = median(seconds["copy_floor"])
            out: dict[str, Any] = {"rows": n, "repeats": times, "variants": {}}
            for variant, values in seconds.items():
                m = median(values)
                out["variants"][variant] = {
                    "median_seconds": round(m, 3), "rows_per_second": round(n / m),
                    "runs_seconds": [round(v, 3) for v in values],
                    "ratio_to_copy_floor": round(m / floor, 1)}
            return out

        all_variants = ["parse_only", "service", "service_with_credentials", "rest",
                        "copy_floor", "executemany_floor"]
        results = [size_run(rows, repeats, all_variants)]
        if big:
            results.append(size_run(big, 1, ["parse_only", "service", "rest", "copy_floor"]))
        first = results[0]["variants"]
        worst = max(first["service"]["median_seconds"], first["rest"]["median_seconds"],
                    first["service_with_credentials"]["median_seconds"])
        payload: dict[str, Any] = {
            "command": f"python -m bench.fleet_import --rows {rows} --repeats {repeats} "
                       f"--big {big}",
            "target": f"{rows} rows in under {TARGET_SECONDS_10K:g} s (issue 3)",
            "target_met": worst < TARGET_SECONDS_10K if rows == 10_000 else None,
            "sizes": results,
        }
        if result_name:
            payload["json"] = str(write_result(result_name, payload))
        return payload
    finally:
        raw.close()
        clear_redis_prefix(prefix)
        if not keep_db:
            drop_database(database)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", type=int, default=100_000,
                        help="a second, single run at this size (0: none)")
    parser.add_argument("--database", default="ensoul_bench_import",
                        help="recreated, then dropped (must start with ensoul_bench)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--result-name", default="fleet_import")
    args = parser.parse_args()
    print(json.dumps(run(args.rows, args.repeats, args.big, database=args.database,
                         keep_db=args.keep_db, result_name=args.result_name or None), indent=2))


if __name__ == "__main__":
    main()
