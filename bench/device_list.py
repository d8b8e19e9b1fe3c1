"""Device-list latency at 100,000 devices: ``GET /api/v1/devices`` against its bare SQL.

    .venv/bin/python -m bench.device_list                       # 100,000 devices, 40 samples
    .venv/bin/python -m bench.device_list --devices 2000 --samples 5

The tenant's 100,000 devices (plus 20,000 of another tenant, so scoping matters) are loaded
with ``COPY``: 20 groups, statuses 70/20/7/3 % active/provisioned/suspended/retired, five
firmware versions and a rare beta (1 %), two tags each plus a rare ``vip`` tag (0.5 %), 10 %
online in the presence tracker. Each query is a page of 50 through the Flask test client with a
Bearer token (authentication, rate limits, serialisation, presence: the whole request), sampled
sequentially after a warm-up. Baseline, in the same run: the search statement that request sent
to Postgres (captured from SQLAlchemy), replayed bare with psycopg; also the number of
statements the request ran. The issue's target: p95 under 150 ms. Then, unless
``--no-what-if``, some pages again with a candidate fix applied in this process only (see
:func:`what_if`), to size each fix. Results: ``bench/results/device_list.json`` and
``device_list.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import urlencode

import psycopg

from bench.common import (
    RESULTS_DIR,
    bench_settings,
    clear_redis_prefix,
    create_vendor,
    drop_database,
    fresh_database,
    new_redis_prefix,
    percentile,
    summary_ms,
    write_result,
)
from bench.fleet_import import TAG_COLUMNS

TARGET_P95_MS = 150.0
STATUSES = ["active"] * 70 + ["provisioned"] * 20 + ["suspended"] * 7 + ["retired"] * 3
FIRMWARE = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"]
LOAD_COLUMNS = ("id", "tenant_id", "product_id", "serial", "mac", "name", "group_name",
                "status", "firmware_version", "created_at", "activated_at", "last_seen_at")


def load_devices(conn: psycopg.Connection[Any], tenant_id: uuid.UUID, product_id: uuid.UUID,
                 count: int, prefix: str) -> list[uuid.UUID]:
    """COPY ``count`` devices with tags into the tenant; return their ids in id order."""
    from core.ids import uuid7

    now = dt.datetime.now(dt.UTC)
    ids: list[uuid.UUID] = []
    base = int(uuid.uuid4().hex[:6], 16) << 24
    with conn.cursor() as cur:
        with cur.copy(f"COPY devices ({', '.join(LOAD_COLUMNS)}) FROM STDIN") as copy:
            for i in range(count):
                device_id = uuid7()
                ids.append(device_id)
                status = STATUSES[i % len(STATUSES)]
                mac = f"{base + i:012x}"
                copy.write_row((
                    device_id, tenant_id, product_id, f"{prefix}{i:07d}",
                    ":".join(mac[j:j + 2] for j in range(0, 12, 2)), f"Device {i}",
                    f"group-{i % 20}", status,
                    "2.0.0-beta" if i % 100 == 7 else FIRMWARE[i % len(FIRMWARE)],
                    now, now if status == "active" else None,
                    now if status == "active" else None))
        with cur.copy(f"COPY device_tags ({', '.join(TAG_COLUMNS)}) FROM STDIN") as copy:
            for i, device_id in enumerate(ids):
                copy.write_row((tenant_id, device_id, f"batch-{i % 20}"))
                copy.write_row((tenant_id, device_id, f"region-{i % 7}"))
                if i % 200 == 13:
                    copy.write_row((tenant_id, device_id, "vip"))
    conn.commit()
    return sorted(ids)


def mark_online(tenant_id: uuid.UUID, device_ids: list[uuid.UUID]) -> None:
    """Tell the presence tracker these devices are online, as their status messages would."""
    from fleet import presence

    tenant = str(tenant_id)
    for device_id in device_ids:
        presence.record(tenant, str(device_id), "status", {"state": "online"}, retained=False)


@contextmanager
def captured_statements() -> Iterator[list[tuple[str, Any]]]:
    """Every statement SQLAlchemy sends while the block runs, with its parameters."""
    from sqlalchemy import event

    from core.db import db

    statements: list[tuple[str, Any]] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        statements.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(db.engine, "before_cursor_execute", before)


def search_statement(statements: list[tuple[str, Any]]) -> tuple[str, Any]:
    for statement, parameters in statements:
        if "FROM devices" in statement and "ORDER BY devices.id" in statement:
            return statement, parameters
    raise RuntimeError("the request sent no device search statement")


def queries(ids: list[uuid.UUID]) -> dict[str, dict[str, str]]:
    from core.pagination import encode_cursor

    deep = encode_cursor(ids[int(len(ids) * 0.9)])
    return {
        "first_page": {},
        "deep_cursor_90pct": {"cursor": deep},
        "status_suspended": {"status": "suspended"},
        "status_suspended_deep": {"status": "suspended", "cursor": deep},
        "group": {"group": "group-7"},
        "tag": {"tag": "batch-3"},
        "tag_rare_vip": {"tag": "vip"},
        "firmware": {"firmware_version": "1.2.0"},
        "firmware_rare_beta": {"firmware_version": "2.0.0-beta"},
        "online_true": {"online": "true"},
        "online_false": {"online": "false"},
        "q_serial_prefix_100": {"q": "DL00123"},
        "q_name_prefix_11": {"q": "Device 9999"},
        "q_no_match": {"q": "ZZZ"},
        "combined_status_group_tag": {"status": "active", "group": "group-3",
                                      "tag": "region-2"},
    }


def explain(conn: psycopg.Connection[Any], statement: str, parameters: Any) -> list[str]:
    rows = conn.execute("EXPLAIN " + statement, parameters).fetchall()  # type: ignore[arg-type]
    return [r[0] for r in rows]


def plot(results: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    api95 = [results[n]["api"]["p95_ms"] for n in names]
    api50 = [results[n]["api"]["p50_ms"] for n in names]
    sql95 = [results[n]["bare_sql"]["p95_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(10, 6))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], api95, height=0.4, label="API p95", color="#d62728")
    ax.barh([i + 0.2 for i in y], api50, height=0.4, label="API p50", color="#ff9896")
    ax.barh([i - 0.2 for i in y], sql95, height=0.4, label="bare SQL p95", color="#1f77b4")
    ax.axvline(TARGET_P95_MS, color="black", linestyle="--", label="target p95 150 ms")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency per page of 50 (ms, log scale)")
    ax.set_title("GET /api/v1/devices at 100,000 devices vs its bare SQL (2 cores)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def one_request(app: Any, client: Any, auth: dict[str, str],
                path: str) -> tuple[float, list[tuple[str, Any]]]:
    with app.app_context(), captured_statements() as sent:
        started = time.perf_counter()
        response = client.get(path, headers=auth)
        elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{path}: {response.status_code} "
                           f"{response.get_data(as_text=True)[:300]}")
    return elapsed, sent


def sample_query(app: Any, client: Any, raw: psycopg.Connection[Any], auth: dict[str, str],
                 args: dict[str, str], samples: int) -> dict[str, Any]:
    """``samples`` requests of one page after a warm-up, each followed by its bare SQL."""
    path = "/api/v1/devices?" + urlencode({**args, "limit": 50})
    api, bare = [], []
    statement: tuple[str, Any] | None = None
    statement_count = items = 0
    warmup = min(3, samples)
    for i in range(samples + warmup):
        elapsed, sent = one_request(app, client, auth, path)
        if statement is None:
            statement = search_statement(sent)
            statement_count = len(sent)
            items = len(client.get(path, headers=auth).get_json()["items"])
        t1 = time.perf_counter()
        raw.execute(statement[0], statement[1]).fetchall()  # type: ignore[arg-type]
        bare_elapsed = time.perf_counter() - t1
        raw.rollback()
        if i >= warmup:  # warm-up discarded
            api.append(elapsed)
            bare.append(bare_elapsed)
    assert statement is not None
    plan = [line for line in explain(raw, *statement)
            if "Scan" in line or "Join" in line or "Sort" in line][:6]
    raw.rollback()
    return {"query": args, "items": items, "statements_per_request": statement_count,
            "api": summary_ms(api), "bare_sql": summary_ms(bare),
            "ratio_p50": round(percentile(api, 50) / percentile(bare, 50), 1),
            "plan": plan, "_api_seconds": api}


@contextmanager
def patched(target: Any, attribute: str, replacement: Any) -> Iterator[None]:
    original = getattr(target, attribute)
    setattr(target, attribute, replacement)
    try:
        yield
    finally:
        setattr(target, attribute, original)


def what_if(app: Any, client: Any, raw: psycopg.Connection[Any], vendor: Any,
            ids: list[uuid.UUID], samples: int) -> dict[str, Any]:
    """The same pages with a candidate fix applied in this process only (monkeypatched, or an
    index added to the benchmark's own database), to size each fix before anyone makes it.
    Nothing here changes the platform's code. Each variant is interleaved request by request
    with the platform as it is."""
    from sqlalchemy import all_, any_, bindparam, text
    from sqlalchemy.dialects.postgresql import ARRAY
    from sqlalchemy.orm import selectinload
    from sqlalchemy.types import Uuid

    from core.db import db
    from core.redis import get_redis
    from fleet import api as fleet_api
    from fleet import presence, services
    from fleet.models import Device

    search = services.search_devices
    base_queries = queries(ids)

    def tags_in_one_query(tenant_id: Any, filters: Any, online_ids: Any = None) -> Any:
        return search(tenant_id, filters, online_ids).options(selectinload(Device.tags))

    def presence_of_page_only(devices: list[Any]) -> list[Any]:
        if devices:
            key = presence._key(devices[0].tenant_id, "online")
            flags = get_redis().smismember(key, [str(d.id) for d in devices])
            for device, flag in zip(devices, flags, strict=True):
                device.online = bool(flag)
        return devices

    def online_as_one_array(tenant_id: Any, filters: Any, online_ids: Any = None) -> Any:
        if filters.get("online") is None or online_ids is None:
            return search(tenant_id, filters, online_ids)
        stmt = search(tenant_id, {k: v for k, v in filters.items() if k != "online"}, None)
        array = bindparam("online_ids", [uuid.UUID(i) for i in online_ids],
                          type_=ARRAY(Uuid()))
        return stmt.where(Device.id == any_(array) if filters["online"]
                          else Device.id != all_(array))

    def custom_plan_search(tenant_id: Any, filters: Any, online_ids: Any = None) -> Any:
        db.session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        return search(tenant_id, filters, online_ids)

    def interleaved(labels: list[str], variants: dict[str, list[tuple[Any, str, Any]]]
                    ) -> dict[str, Any]:
        """Each sample runs every variant in turn (rotating the order), so the machine's
        noise falls on the platform as it is and on each fix alike."""
        out: dict[str, Any] = {}
        names = list(variants)
        for label in labels:
            path = "/api/v1/devices?" + urlencode({**base_queries[label], "limit": 50})
            seconds: dict[str, list[float]] = {n: [] for n in names}
            statements: dict[str, int] = {}
            warmup = min(3, samples)
            for i in range(samples + warmup):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    with ExitStack() as stack:
                        for target, attribute, replacement in variants[name]:
                            stack.enter_context(patched(target, attribute, replacement))
                        elapsed, sent = one_request(app, client, vendor.auth, path)
                    statements.setdefault(name, len(sent))
                    if i >= warmup:
                        seconds[name].append(elapsed)
            as_is = percentile(seconds[names[0]], 50)
            out[label] = {name: {"statements_per_request": statements[name],
                                 "api": summary_ms(seconds[name]),
                                 "p50_vs_as_is": round(percentile(seconds[name], 50) / as_is,
                                                       2)}
                          for name in names}
        return out

    tags = (services, "search_devices", tags_in_one_query)
    page_presence = (fleet_api, "_with_presence", presence_of_page_only)
    results: dict[str, Any] = {
        "changes": {
            "tags_selectinload": "services.search_devices(...).options("
                                 "selectinload(Device.tags)): one query for the page's tags",
            "presence_smismember_per_page": "fleet.api._with_presence asks Redis SMISMEMBER "
                                            "for the page's ids instead of SMEMBERS of the "
                                            "whole online set",
            "online_filter_as_one_array": "online filter as id = ANY(:uuid[]) / id <> "
                                          "ALL(:uuid[]): one bound array instead of one bind "
                                          "parameter per online device",
            "custom_plans": "SET LOCAL plan_cache_mode = force_custom_plan before the search: "
                            "psycopg prepares a statement after 5 executions and Postgres "
                            "may then pick a generic plan, in which LIKE :q || '%' cannot "
                            "use the prefix indexes",
        },
        "pages": interleaved(["first_page", "deep_cursor_90pct", "status_suspended", "tag"], {
            "as_is": [], "tags_selectinload": [tags],
            "presence_smismember_per_page": [page_presence],
            "both": [tags, page_presence]}),
        "online": interleaved(["online_true", "online_false"], {
            "as_is": [],
            "online_filter_as_one_array": [(services, "search_devices", online_as_one_array)],
            "all_three": [(services, "search_devices",
                           lambda *a, **k: online_as_one_array(*a, **k).options(
                               selectinload(Device.tags))), page_presence]}),
    }
    results["prefix_search"] = interleaved(
        ["q_serial_prefix_100", "q_name_prefix_11", "q_no_match"],
        {"as_is": [], "custom_plans": [(services, "search_devices", custom_plan_search)]})
    return results


def run(devices: int = 100_000, samples: int = 40, *, other_tenant: int = 20_000,
        online_fraction: float = 0.1, database: str = "ensoul_bench_devices",
        result_name: str | None = "device_list", keep_db: bool = False,
        with_what_if: bool = True) -> dict[str, Any]:
    from app import create_app

    prefix = new_redis_prefix("devices")
    url = fresh_database(database)
    raw = psycopg.connect(url)
    try:
        app = create_app(bench_settings(url, prefix))
        with app.app_context():
            vendor = create_vendor("list")
            other = create_vendor("other")
        started = time.perf_counter()
        ids = load_devices(raw, vendor.tenant_id, vendor.product_id, devices, "DL")
        if other_tenant:
            load_devices(raw, other.tenant_id, other.product_id, other_tenant, "DL")
        raw.execute("ANALYZE")
        raw.commit()
        load_seconds = time.perf_counter() - started
        online = ids[::round(1 / online_fraction)] if online_fraction else []
        with app.app_context():
            mark_online(vendor.tenant_id, online)

        client = app.test_client()
        results: dict[str, Any] = {}
        for label, args in queries(ids).items():
            results[label] = sample_query(app, client, raw, vendor.auth, args, samples)
        all_api = [x for r in results.values() for x in r.pop("_api_seconds")]
        what_if_results = (what_if(app, client, raw, vendor, ids, samples) if with_what_if
                           else None)
        worst = max(results, key=lambda k: results[k]["api"]["p95_ms"])
        payload: dict[str, Any] = {
            "command": f"python -m bench.device_list --devices {devices} --samples {samples}",
            "devices": devices, "other_tenant_devices": other_tenant,
            "online": len(online), "page_size": 50, "samples_per_query": samples,
            "load_seconds": round(load_seconds, 1),
            "target": f"p95 under {TARGET_P95_MS:g} ms (issue 3)",
            "overall_api": summary_ms(all_api),
            "worst_query": worst, "worst_p95_ms": results[worst]["api"]["p95_ms"],
            "target_met": all(r["api"]["p95_ms"] < TARGET_P95_MS for r in results.values()),
            "queries": results,
        }
        if what_if_results is not None:
            payload["what_if"] = what_if_results
        if result_name:
            png = RESULTS_DIR / f"{result_name}.png"
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            plot(results, png)
            payload["png"] = str(png)
            payload["json"] = str(write_result(result_name, payload))
        return payload
    finally:
        raw.close()
        clear_redis_prefix(prefix)
        if not keep_db:
            drop_database(database)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.device_list", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--other-tenant", type=int, default=20_000)
    parser.add_argument("--database", default="ensoul_bench_devices",
                        help="recreated, then dropped (must start with ensoul_bench)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--result-name", default="device_list")
    parser.add_argument("--no-what-if", action="store_true",
                        help="skip re-measuring pages with candidate fixes applied")
    args = parser.parse_args()
    print(json.dumps(run(args.devices, args.samples, other_tenant=args.other_tenant,
                         database=args.database, keep_db=args.keep_db,
                         result_name=args.result_name or None,
                         with_what_if=not args.no_what_if),
                     indent=2))


if __name__ == "__main__":
    main()
