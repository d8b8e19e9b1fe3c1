"""The credit hook against the limits-only hook it replaces, and the usage writer with the ledger.

    .venv/bin/python -m bench.billing_hook                     # the full run (~4 min)
    .venv/bin/python -m bench.billing_hook --repeats 1 --latency-streams 50 --broker-repeats 0

One billed tenant (a plan with a rate card, a seat per device, one big package; allowance 0, so
every reservation walks the burn order to the package) gets its device profiles through the
real projection (``project_devices``, read back from Redis as the broker reads them). The hooks
run in this process on one ``redis.asyncio`` client (``core.redis.connect_async``, the
broker's) against the benchmarks' Redis db 14 under a per-run prefix, next to a floor: one
no-op ``EVALSHA`` per call on the same client. Variants run interleaved in every repeat (the
order rotates) and the figures quoted are medians over the repeats.

1. Latency: a stream is ``admit`` (a 200-token prompt), the ``extend`` calls a 250-token answer
   needs past its first chunk (2 with the shipped 50-token chunk, at the budget's edge as the
   broker calls them; the limits-only hook never extends: unlimited budget) and ``settle``;
   p50/p99 of each call. 1 stream back to back (the hook's own service time); 50 streams on 50
   coroutines, each on its own device, paced (``--pace-ms`` between a stream's calls: the open
   streams of a busy broker) and back to back (a saturated closed loop: mostly queueing in the
   client). Targets: admit p99 < 0.5 ms, settle p99 < 1 ms.
2. Throughput: ``--throughput-concurrency`` coroutines loop admit + settle (a 50-token answer,
   inside the first chunk: no extend) for ``--throughput-seconds``: admitted requests/s of one
   asyncio process, its CPU and Redis's per request; target: the credit hook under 10 %
   slower than the limits-only one. ``credit_250`` adds the two extends of a 250-token answer.
   Then, unless ``--broker-repeats 0``, the full broker path: ``bench.inference_latency``'s
   throughput phase (coalesced, 1 broker process, zero-latency provider, 50-token answers,
   ``--broker-devices`` devices x 1 open request) with ``ENSOUL_BILLING_HOOK`` set to
   ``billing.enforcement:make_hook`` and to ``inference.hook:limits_only``, its tenant given
   seats and a big package the same way.
3. Usage writer: the tenant's usage stream pre-filled with ``--writer-events`` priced events
   (with ``credit_split``) by the credit hook's admit and settle, then
   ``UsageWriter.drain_once`` timed until every event is in ``usage_events`` (billing's settled
   hook posting the consumption to the ledger in the same transaction); the same with that hook
   removed (in this process only); and baselines on the very rows the writer wrote (read back,
   deleted, inserted
   again): psycopg ``executemany`` of the writer's ``INSERT ... ON CONFLICT DO NOTHING``, and
   ``COPY``, in batches of the writer's size, each committed. Target: the writer at least half
   the ``executemany`` figure.
4. Overdraft: ``--overdraft-streams`` streams admitted at once against a package of
   ``--overdraft-balance`` credits (4 devices of another tenant), then all extending in
   interleaved steps of ``--overdraft-step-tokens``; billed credits against the balance, the
   overdraft in total and per stream, in credits, chunks and output tokens past the budget.

Results: ``bench/results/billing_hook.json`` and ``.png`` (latency CDFs and throughput bars).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Json

from bench.common import (
    PROJECT_ROOT,
    REDIS_URL,
    RESULTS_DIR,
    bench_settings,
    clear_redis_prefix,
    create_vendor,
    drop_database,
    fresh_database,
    median,
    new_redis_prefix,
    write_result,
)
from bench.inference_latency import (
    LIMITS,
    Bench,
    cpu_seconds,
    machine_busy,
    pids_named,
    summary,
)

RATES = {"output_tokens": (100, 1), "input_tokens": (1000, 1), "audio_in_ms": (10_000, 1),
         "audio_out_ms": (10_000, 1)}  # 1 credit per 100 output tokens, 1,000 input, 10 s audio
PROMPT_TOKENS = 200
LONG_ANSWER = 250  # past two chunk boundaries: two extends with the shipped 50-token chunk
SHORT_ANSWER = 50  # inside the first chunk
BIG_PACKAGE = 10**9
PLAN_LIMITS = {"requests_per_minute": 1_000_000, "concurrent_streams": 1_000}
HOOKS = {"limits": "inference.hook:limits_only", "credit": "billing.enforcement:make_hook"}
TARGETS = {"admit_p99_ms": 0.5, "settle_p99_ms": 1.0, "throughput_ratio_at_least": 0.9,
           "writer_fraction_of_bare_at_least": 0.5}
DEDUP_WINDOW = 600  # seconds: the bench's seen-keys expire soon even if cleanup fails


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- a billed tenant, through the real services -------------------------------------------------


def billing_plan() -> Any:
    """A plan with the rate card above, limits out of the way and no allowance (committed)."""
    from billing import catalog
    from core.db import db

    plan = catalog.create_plan(f"bench-{uuid.uuid4().hex[:8]}", "Bench plan",
                               allowance_credits=0, prices={"CNY": (9000, "0.7")},
                               **PLAN_LIMITS)
    catalog.publish_rate_card(plan, RATES)
    db.session.commit()
    return plan


def fund(tenant_id: uuid.UUID, plan: Any, *, seats: int, credits: int) -> None:
    """Seats for the tenant's active devices and a package of ``credits``, paid (committed: the
    package reaches Redis after the commit)."""
    from billing import purchases

    purchases.mark_paid(purchases.order_pack(tenant_id, "CNY", plan.id, seats))
    buy_package(tenant_id, credits)


def buy_package(tenant_id: uuid.UUID, credits: int) -> None:
    from billing import catalog, purchases
    from core.db import db

    offer = catalog.create_package_offer(f"bench-{uuid.uuid4().hex[:8]}", "Bench credits",
                                         credits, 365, {"CNY": 100})
    purchases.mark_paid(purchases.order_package(tenant_id, "CNY", offer.id, 1))
    db.session.commit()


def billed_tenant(label: str, plan: Any, devices: int, credits: int) -> tuple[uuid.UUID, list[Any]]:
    """A tenant with ``devices`` active devices, each with a seat, and a package; its device
    profiles projected to Redis and read back as the broker reads them."""
    from flask import current_app

    from core.db import db
    from core.redis import get_redis
    from fleet import services
    from fleet.models import Product
    from inference.directory import DeviceProfile, profile_key, project_devices

    vendor = create_vendor(label)
    product = db.session.get(Product, vendor.product_id)
    suffix = uuid.uuid4().hex[:6]
    made = []
    for index in range(devices):
        device = services.create_device(product, f"BH-{suffix}-{index:05d}")
        services.activate(device)
        made.append(str(device.id))
    db.session.commit()
    fund(vendor.tenant_id, plan, seats=devices, credits=credits)
    project_devices(vendor.tenant_id)
    prefix = current_app.config["ENSOUL_REDIS_PREFIX"]
    profiles = [DeviceProfile.from_json(get_redis().get(
        profile_key(prefix, str(vendor.tenant_id), device_id))) for device_id in made]
    if any(p.licence.get("state") != "licensed" for p in profiles):
        raise RuntimeError(f"a device has no licence: {[p.licence for p in profiles][:2]}")
    return vendor.tenant_id, profiles


# --- streams through a hook ---------------------------------------------------------------------


def make_hooks(redis: Any, prefix: str, config: Any) -> dict[str, Any]:
    """Both hooks on one client, as the broker builds them (the credit hook's shipped chunk)."""
    from billing.enforcement import CreditHook, default_chunk
    from inference.hook import LimitsHook

    return {"limits": LimitsHook(redis, prefix, dedup_window=DEDUP_WINDOW),
            "credit": CreditHook(redis, prefix, chunk=default_chunk(config),
                                 dedup_window=DEDUP_WINDOW)}


class NoopHook:
    """The floor: one no-op ``EVALSHA`` per call on the same client, with the budget steps of
    the credit hook (so a stream makes the same calls): the round trip alone."""

    SCRIPT = "return 1"

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.sha = hashlib.sha1(self.SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis' id

    async def admit(self, device: Any, request_id: str, kind: str, estimate: Any, *,
                    stream_id: str, owner: str) -> Any:
        from inference.hook import Admission
        from inference.units import Units

        await self.redis.evalsha(self.sha, 0)
        return Admission(device, request_id, stream_id, kind, int(time.time() * 1000), owner,
                         Units(output_tokens=100))

    async def extend(self, admission: Any, used: Any) -> Any:
        from inference.units import Units

        await self.redis.evalsha(self.sha, 0)
        return Units(output_tokens=used.output_tokens + 99)

    async def settle(self, admission: Any, event: Any) -> bool:
        await self.redis.evalsha(self.sha, 0)
        return True


def usage_event(admission: Any, units: Any, finish: str = "stop") -> Any:
    from inference.usage import UsageEvent

    device = admission.device
    return UsageEvent(
        tenant_id=device.tenant_id, device_id=device.device_id, product_id=device.product_id,
        request_id=admission.request_id, admitted_at_ms=admission.admitted_at_ms,
        settled_at_ms=int(time.time() * 1000), stream_id=admission.stream_id,
        kind=admission.kind, provider="local", model="bench", units=units, duration_ms=1.0,
        finish=finish, broker="bench")


Times = dict[str, list[float]]


async def one_stream(hook: Any, profile: Any, answer_tokens: int, times: Times | None,
                     pause: float = 0.0) -> Any:
    """admit, the extends the answer needs (at each budget edge, as the broker calls them),
    settle, with ``pause`` seconds before each call after the first; each call timed into
    ``times`` (ms) unless it is ``None``."""
    from inference.units import Units

    clock = time.perf_counter
    request_id = uuid.uuid4().hex
    started = clock()
    admission = await hook.admit(profile, request_id, "text", Units(input_tokens=PROMPT_TOKENS),
                                 stream_id=f"bh-{request_id}", owner="bench")
    if times is not None:
        times["admit"].append((clock() - started) * 1000)
    budget = admission.budget
    while budget is not None and budget.output_tokens < answer_tokens:
        used = Units(input_tokens=PROMPT_TOKENS, output_tokens=budget.output_tokens + 1)
        if pause:
            await asyncio.sleep(pause)
        started = clock()
        budget = admission.budget = await hook.extend(admission, used)
        if times is not None:
            times["extend"].append((clock() - started) * 1000)
    event = usage_event(admission, Units(input_tokens=PROMPT_TOKENS,
                                         output_tokens=answer_tokens))
    if pause:
        await asyncio.sleep(pause)
    started = clock()
    if not await hook.settle(admission, event):
        raise RuntimeError(f"stream {admission.stream_id} was settled twice")
    if times is not None:
        times["settle"].append((clock() - started) * 1000)
    return event


async def stream_latency(hook: Any, profiles: Sequence[Any], concurrency: int, streams: int,
                         warmup: int, pace: float = 0.0, answer_tokens: int = LONG_ANSWER
                         ) -> Times:
    """``streams`` streams (after ``warmup`` untimed ones) on ``concurrency`` coroutines, each
    on its own device: back to back, or with ``pace`` seconds between a stream's calls and
    between streams, the coroutines' starts spread over one stream's length."""
    times: Times = {"admit": [], "extend": [], "settle": []}
    counter = iter(range(warmup + streams))

    async def worker(index: int) -> None:
        profile = profiles[index % len(profiles)]
        if pace:
            await asyncio.sleep(4 * pace * index / concurrency)
        for number in counter:
            await one_stream(hook, profile, answer_tokens,
                             times if number >= warmup else None, pace)
            if pace:
                await asyncio.sleep(pace)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return times


async def stream_throughput(hook: Any, profiles: Sequence[Any], concurrency: int,
                            seconds: float, answer_tokens: int) -> dict[str, Any]:
    """Admitted (and settled) requests/s of ``concurrency`` coroutines looping streams."""
    redis_pids = pids_named("redis-server")
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal count
        profile = profiles[index % len(profiles)]
        while time.perf_counter() < deadline:
            await one_stream(hook, profile, answer_tokens, None)
            count += 1

    redis_cpu = sum(cpu_seconds(p) or 0.0 for p in redis_pids)
    busy, total = machine_busy()
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    redis_cpu = sum(cpu_seconds(p) or 0.0 for p in redis_pids) - redis_cpu
    busy_after, total_after = machine_busy()
    return {"requests": count, "seconds": round(wall, 3),
            "requests_per_second": round(count / wall, 1),
            "machine_busy_cores": round((busy_after - busy) / (total_after - total)
                                        * (os.cpu_count() or 1), 2)
            if total_after > total else None,
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "process_cpu_us_per_request": round(cpu / count * 1e6, 1) if count else None,
            "redis_server_cpu_us_per_request": round(redis_cpu / count * 1e6, 1)
            if count else None}


async def drop_usage_streams(redis: Any, prefix: str) -> None:
    """The settled events pile up in the usage streams (no writer runs here): drop them."""
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:usage:*", count=1000)]
    if keys:
        await redis.delete(*keys)


def latency_sizes(args: argparse.Namespace) -> list[tuple[str, int, float]]:
    """(label, concurrency, pace): one stream back to back; more streams paced (open streams
    of a busy broker) and back to back (a saturated closed loop: queueing in the client)."""
    sizes = []
    for concurrency in args.concurrency:
        if concurrency == 1:
            sizes.append(("1", 1, 0.0))
        else:
            sizes.append((str(concurrency), concurrency, args.pace_ms / 1000))
            sizes.append((f"{concurrency}_saturated", concurrency, 0.0))
    return sizes


def rotated(items: Sequence[str], repeat: int) -> list[str]:
    shift = repeat % len(items)
    return [*items[shift:], *items[:shift]]


def over_repeats(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per repeat p50/p99 of one call, and their medians."""
    p50 = [r[key]["p50"] for r in runs if r[key]["n"]]
    p99 = [r[key]["p99"] for r in runs if r[key]["n"]]
    if not p50:
        return {"n": 0}
    return {"p50_ms": round(median(p50), 3), "p99_ms": round(median(p99), 3),
            "runs_p50_ms": p50, "runs_p99_ms": p99,
            "samples_per_run": [r[key]["n"] for r in runs]}


async def hook_phases(args: argparse.Namespace, prefix: str, config: Any,
                      profiles: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                         dict[str, list[float]]]:
    """Parts 1 and 2 on one client: latency per call, then the admit+settle loop."""
    from core.redis import connect_async

    redis = connect_async(REDIS_URL)
    hooks = {**make_hooks(redis, prefix, config), "noop": NoopHook(redis)}
    await redis.script_load(NoopHook.SCRIPT)
    pooled: dict[str, list[float]] = {}  # every sample, for the CDFs
    latency: dict[str, Any] = {}
    throughput: dict[str, Any] = {}
    try:
        for hook in hooks.values():  # scripts loaded, connections opened, code warm
            await stream_latency(hook, profiles, max(args.concurrency), 0,
                                 warmup=4 * max(args.concurrency))
        runs: dict[str, list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            for size, concurrency, pace in latency_sizes(args):
                for name in rotated(list(hooks), repeat):
                    times = await stream_latency(hooks[name], profiles, concurrency,
                                                 args.latency_streams, warmup=concurrency,
                                                 pace=pace)
                    await drop_usage_streams(redis, prefix)
                    label = f"{name}_{size}"
                    runs.setdefault(label, []).append(
                        {call: summary(values) for call, values in times.items()})
                    for call, values in times.items():
                        pooled.setdefault(f"{label}_{call}", []).extend(values)
            log(f"latency repeat {repeat + 1}: " + ", ".join(
                f"{label} admit p99 {r[-1]['admit']['p99']} settle p99 {r[-1]['settle']['p99']}"
                for label, r in runs.items()))
        for label, label_runs in runs.items():
            latency[label] = {call: over_repeats(label_runs, call)
                              for call in ("admit", "extend", "settle")
                              if any(r[call]["n"] for r in label_runs)}

        variants = {"limits": ("limits", SHORT_ANSWER), "credit": ("credit", SHORT_ANSWER),
                    "credit_250": ("credit", LONG_ANSWER), "noop": ("noop", SHORT_ANSWER)}
        throughput_runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            for variant in rotated(list(variants), repeat):
                name, tokens = variants[variant]
                result = await stream_throughput(hooks[name], profiles,
                                                 args.throughput_concurrency,
                                                 args.throughput_seconds, tokens)
                await drop_usage_streams(redis, prefix)
                throughput_runs[variant].append(result)
            log(f"throughput repeat {repeat + 1}: " + ", ".join(
                f"{v} {r[-1]['requests_per_second']}/s" for v, r in throughput_runs.items()))
        for variant, results in throughput_runs.items():
            throughput[variant] = {
                "answer_tokens": variants[variant][1],
                "extends_per_request": 2 if variant == "credit_250" else 0,
                "requests_per_second": round(median(
                    [r["requests_per_second"] for r in results]), 1),
                "process_cpu_us_per_request": round(median(
                    [r["process_cpu_us_per_request"] or 0 for r in results]), 1),
                "redis_server_cpu_us_per_request": round(median(
                    [r["redis_server_cpu_us_per_request"] or 0 for r in results]), 1),
                "runs": results}
        for variant in ("credit", "credit_250"):  # each repeat's runs are next to each other
            ratios = [r["requests_per_second"] / b["requests_per_second"] for r, b in zip(
                throughput_runs[variant], throughput_runs["limits"], strict=True)
                if b["requests_per_second"]]
            throughput[f"ratio_{variant}_to_limits"] = round(median(ratios), 3) \
                if ratios else None
            throughput[f"ratio_{variant}_to_limits_per_repeat"] = [round(r, 3) for r in ratios]
        throughput["concurrency"] = args.throughput_concurrency
        throughput["seconds_per_run"] = args.throughput_seconds
    finally:
        await drop_usage_streams(redis, prefix)
        await redis.aclose()
    return latency, throughput, pooled


# --- the usage writer ---------------------------------------------------------------------------


async def prefill(prefix: str, config: Any, profiles: Sequence[Any], events: int,
                  concurrency: int) -> None:
    """The usage streams emptied, then ``events`` priced events in the tenant's, settled by
    the credit hook."""
    from core.redis import connect_async

    redis = connect_async(REDIS_URL)
    try:
        await drop_usage_streams(redis, prefix)
        hook = make_hooks(redis, prefix, config)["credit"]
        await stream_latency(hook, profiles, concurrency, 0, warmup=events,
                             answer_tokens=SHORT_ANSWER)
    finally:
        await redis.aclose()


WRITERS = ("writer", "writer_without_ledger")


def drain(app: Any, events: int, batch: int, variant: str) -> float:
    """Seconds for one ``UsageWriter`` to write ``events`` entries: as shipped (``writer``:
    billing's ledger posting in the writer's transaction) or without the ledger (in this
    process only)."""
    from billing.settlement import post_usage
    from inference import usage

    hooks = usage._settled_hooks  # the registry, in this process only
    saved = list(hooks)
    if variant == "writer_without_ledger":
        hooks.remove(post_usage)
    try:
        writer = usage.UsageWriter(app, f"bench-{uuid.uuid4().hex[:6]}", batch=batch,
                                   block_ms=1)
        with app.app_context():  # as UsageWriter.run: one context for the loop
            done = 0
            started = time.perf_counter()
            while done < events:
                done += writer.drain_once()
                if time.perf_counter() - started > 600:
                    raise TimeoutError(f"the writer wrote {done} of {events} in 10 min")
            return time.perf_counter() - started
    finally:
        hooks[:] = saved


def usage_columns(conn: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_events' "
        "ORDER BY ordinal_position")]


def take_rows(conn: psycopg.Connection[Any], columns: list[str]) -> list[tuple[Any, ...]]:
    """The rows the writer wrote, removed again so the baselines insert the very same ones."""
    rows = [tuple(Json(v) if isinstance(v, dict) else v for v in row) for row in conn.execute(
        sql.SQL("SELECT {} FROM usage_events").format(
            sql.SQL(", ").join(map(sql.Identifier, columns))))]
    empty_usage(conn)
    return rows


def empty_usage(conn: psycopg.Connection[Any]) -> None:
    conn.execute("DELETE FROM usage_events")
    conn.commit()
    conn.autocommit = True
    try:
        conn.execute("VACUUM usage_events")
    finally:
        conn.autocommit = False


def executemany_floor(conn: psycopg.Connection[Any], columns: list[str],
                      rows: list[tuple[Any, ...]], batch: int) -> float:
    statement = sql.SQL("INSERT INTO usage_events ({}) VALUES ({}) ON CONFLICT (device_id, "
                        "request_id, admitted_at) DO NOTHING").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)))
    started = time.perf_counter()
    with conn.cursor() as cur:
        for start in range(0, len(rows), batch):
            cur.executemany(statement, rows[start:start + batch])
            conn.commit()
    return time.perf_counter() - started


def copy_floor(conn: psycopg.Connection[Any], columns: list[str], rows: list[tuple[Any, ...]],
               batch: int) -> float:
    statement = sql.SQL("COPY usage_events ({}) FROM STDIN").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)))
    started = time.perf_counter()
    with conn.cursor() as cur:
        for start in range(0, len(rows), batch):
            with cur.copy(statement) as copy:
                for row in rows[start:start + batch]:
                    copy.write_row(row)
            conn.commit()
    return time.perf_counter() - started


def writer_phases(args: argparse.Namespace, app: Any, url: str,
                  profiles: Sequence[Any]) -> dict[str, Any]:
    events, batch = args.writer_events, args.writer_batch
    prefix, config = app.config["ENSOUL_REDIS_PREFIX"], app.config
    seconds: dict[str, list[float]] = {v: [] for v in (
        *WRITERS, "executemany_floor", "copy_floor")}
    ledger_entries: dict[str, int] = {}
    with psycopg.connect(url) as conn:
        columns = usage_columns(conn)
        empty_usage(conn)
        for repeat in range(args.repeats):
            for variant in rotated(list(WRITERS), repeat):
                asyncio.run(prefill(prefix, config, profiles, events, 50))
                before = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()
                conn.commit()
                seconds[variant].append(drain(app, events, batch, variant))
                written = conn.execute("SELECT count(*) FROM usage_events").fetchone()
                after = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()
                conn.commit()
                assert written is not None and before is not None and after is not None
                if written[0] != events:
                    raise RuntimeError(f"{variant}: {written[0]} rows for {events} events")
                ledger_entries[variant] = after[0] - before[0]
                rows = take_rows(conn, columns)
            for variant in rotated(["executemany_floor", "copy_floor"], repeat):
                floor = executemany_floor if variant == "executemany_floor" else copy_floor
                seconds[variant].append(floor(conn, columns, rows, batch))
                empty_usage(conn)
            log(f"usage writer repeat {repeat + 1}: " + ", ".join(
                f"{v} {events / s[-1]:.0f}/s" for v, s in seconds.items()))
    out: dict[str, Any] = {"events": events, "batch": batch,
                           "ledger_entries_per_event": {
                               v: round(n / events, 3) for v, n in ledger_entries.items()},
                           "variants": {}}
    for variant, values in seconds.items():
        out["variants"][variant] = {
            "events_per_second": round(events / median(values)),
            "median_seconds": round(median(values), 3),
            "runs_seconds": [round(v, 3) for v in values]}
    rate = {v: out["variants"][v]["events_per_second"] for v in seconds}
    out["writer_fraction_of_executemany"] = round(rate["writer"] / rate["executemany_floor"], 3)
    out["writer_fraction_of_copy"] = round(rate["writer"] / rate["copy_floor"], 3)
    out["ledger_share_of_writer_time"] = round(
        1 - out["variants"]["writer_without_ledger"]["median_seconds"]
        / out["variants"]["writer"]["median_seconds"], 3)
    return out


# --- the overdraft ------------------------------------------------------------------------------


async def overdraft_run(prefix: str, config: Any, profiles: Sequence[Any], streams: int,
                        steps: int, step_tokens: int) -> dict[str, Any]:
    """Every stream admitted before any extends, then all extending in interleaved steps."""
    from billing.enforcement import billing_keys, price
    from core.redis import connect_async
    from inference.hook import Refused
    from inference.units import Units

    redis = connect_async(REDIS_URL)
    hook = make_hooks(redis, prefix, config)["credit"]
    acct = billing_keys(prefix, profiles[0].tenant_id)["acct"]

    async def balance() -> int:
        return sum(int(v) for k, v in (await redis.hgetall(acct)).items()
                   if k.startswith(b"package:"))

    async def one(index: int, started: asyncio.Barrier) -> tuple[str, Any, int]:
        try:
            admission = await hook.admit(profiles[index % len(profiles)], uuid.uuid4().hex,
                                         "text", Units(), stream_id=f"od-{uuid.uuid4().hex}",
                                         owner="bench")
        except Refused as refused:
            await started.wait()
            return refused.code, None, 0
        await started.wait()
        used, finish, past_budget = Units(), "stop", 0
        try:
            for _ in range(steps):
                used = used + Units(output_tokens=step_tokens)
                if not admission.budget.covers(used):
                    admission.budget = await hook.extend(admission, used)
                await asyncio.sleep(0)
        except Refused:
            finish = "quota_exhausted"
            past_budget = used.output_tokens - admission.budget.output_tokens
        event = usage_event(admission, used, finish)
        await hook.settle(admission, event)
        return finish, event, past_budget

    try:
        before = await balance()
        barrier = asyncio.Barrier(streams)
        results = await asyncio.gather(*(one(i, barrier) for i in range(streams)))
        after = await balance()
    finally:
        await drop_usage_streams(redis, prefix)
        await redis.aclose()
    rates = {m: tuple(r) for m, r in profiles[0].licence["rates"]["rates"].items()}
    chunk = price(rates, hook.chunk_for("text"))
    events = [e for _, e, _ in results if e is not None]
    billed = sum(e.credits for e in events)
    overdrafts = [e.credit_split.get("overdraft", 0) for e in events]
    return {"streams": streams, "balance_before": before, "balance_after": after,
            "admitted": len(events),
            "refused_at_admission": sum(1 for _, e, _ in results if e is None),
            "cut_quota_exhausted": sum(1 for _, e, _ in results
                                       if e is not None and e.finish == "quota_exhausted"),
            "max_output_tokens_past_budget": max(p for _, _, p in results),
            "chunk_output_tokens": hook.chunk.output_tokens,
            "billed_credits": billed, "overdraft_credits": sum(overdrafts),
            "streams_overdrawn": sum(1 for o in overdrafts if o),
            "max_overdraft_per_stream_credits": max(overdrafts, default=0),
            "chunk_credits": chunk,
            "max_overdraft_per_stream_chunks": round(max(overdrafts, default=0) / chunk, 2),
            "overdraft_bound_credits": chunk * len(events),
            "billed_equals_balance_plus_overdraft": billed == before - after + sum(overdrafts)}


def overdraft_phases(args: argparse.Namespace, app: Any, plan: Any) -> dict[str, Any]:
    prefix, config = app.config["ENSOUL_REDIS_PREFIX"], app.config
    with app.app_context():
        tenant_id, profiles = billed_tenant("overdraft", plan, 4, args.overdraft_balance)
    runs = []
    for repeat in range(args.repeats):
        if repeat:  # the previous run used its package up: a new one of the same size
            with app.app_context():
                buy_package(tenant_id, args.overdraft_balance)
        runs.append(asyncio.run(overdraft_run(prefix, config, profiles, args.overdraft_streams,
                                              args.overdraft_steps, args.overdraft_step_tokens)))
        log(f"overdraft repeat {repeat + 1}: {runs[-1]}")
    keys = ("billed_credits", "overdraft_credits", "max_overdraft_per_stream_chunks",
            "admitted", "cut_quota_exhausted")
    return {"balance": args.overdraft_balance, "streams": args.overdraft_streams,
            "steps": args.overdraft_steps, "step_output_tokens": args.overdraft_step_tokens,
            "median": {k: median([r[k] for r in runs]) for k in keys},
            "max_overdraft_per_stream_chunks_worst": max(
                r["max_overdraft_per_stream_chunks"] for r in runs),
            "runs": runs}


# --- the full broker path -----------------------------------------------------------------------


class BilledBrokerBench(Bench):
    """``bench.inference_latency``'s setup, then seats for its devices and a big package."""

    def setup(self) -> dict[str, Any]:
        from core.db import db
        from inference.directory import project_devices

        info = super().setup()
        assert self.tenant_id is not None
        with self.app.app_context():
            fund(self.tenant_id, billing_plan(), seats=len(self.identities) + 1,
                 credits=BIG_PACKAGE)
            info["profiles_projected"] = project_devices(self.tenant_id)
            db.session.remove()
        return info


def broker_phases(args: argparse.Namespace) -> dict[str, Any]:
    from bench import inference_latency
    from bench.inference_load import PLAN_ENV

    options = inference_latency.parser().parse_args([
        "--streams", "", "--ramp", "", "--throughput-procs", "1",
        "--throughput-devices", str(args.broker_devices),
        "--throughput-duration", str(args.broker_duration), "--warmup", "2", "--drain", "3",
        "--burst", "0", "--admission-samples", "0", "--result-name", "",
        "--database", f"{args.database}_broker"])
    bench = BilledBrokerBench(options)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in HOOKS}
    try:
        setup = bench.setup()
        for repeat in range(args.broker_repeats):
            for name in rotated(list(HOOKS), repeat):
                service = bench.platform(1, rate=0, coalesce_ms=20)
                for env in service.envs:
                    env["ENSOUL_BILLING_HOOK"] = HOOKS[name]
                result = bench.phase(service, "throughput", args.broker_devices,
                                     duration=args.broker_duration, tokens=options.deltas)
                [process] = result["per_process"]
                runs[name].append({
                    "admitted_requests_per_second": process["admitted_requests_per_second"],
                    "admission_mean_ms": process["admission_mean_ms"],
                    "ended_requests_per_second": result["ended_requests_per_second"],
                    "errors": result["errors"], "broker_errors": process["errors"],
                    "broker_cpu_cores": result["cpu_cores"].get("broker"),
                    "machine_busy_cores": result["cpu_cores"].get("machine_busy_cores"),
                    "request_ms_p50": result["request_ms"]["p50"],
                    "request_ms_p99": result["request_ms"]["p99"]})
                log(f"broker {name} repeat {repeat + 1}: {runs[name][-1]}")
    finally:
        bench.cleanup()
        os.environ.pop(PLAN_ENV, None)
    out: dict[str, Any] = {
        "setup": setup, "devices": args.broker_devices, "open_requests_per_device": 1,
        "answer_tokens": options.deltas, "coalesce_ms": 20, "processes": 1,
        "seconds_per_run": args.broker_duration, "hooks": HOOKS}
    for name, results in runs.items():
        out[name] = {
            "admitted_requests_per_second": round(median(
                [r["admitted_requests_per_second"] for r in results]), 1),
            "admission_mean_ms": round(median(
                [r["admission_mean_ms"] or 0 for r in results]), 3),
            "broker_cpu_us_per_request": round(median(
                [r["broker_cpu_cores"] / r["admitted_requests_per_second"] * 1e6
                 for r in results if r["admitted_requests_per_second"]] or [0]), 1),
            "runs": results}
    ratios = [c["admitted_requests_per_second"] / b["admitted_requests_per_second"]
              for c, b in zip(runs["credit"], runs["limits"], strict=True)
              if b["admitted_requests_per_second"]]
    out["ratio_credit_to_limits"] = round(median(ratios), 3) if ratios else None
    out["ratio_credit_to_limits_per_repeat"] = [round(r, 3) for r in ratios]
    return out


# --- the run ------------------------------------------------------------------------------------


def targets_met(latency: dict[str, Any], throughput: dict[str, Any], writer: dict[str, Any]
                ) -> dict[str, Any]:
    met: dict[str, Any] = {}
    for label, calls in latency.items():
        if label.startswith("credit_") and not label.endswith("_saturated"):
            concurrency = label.split("_", 1)[1]
            met[f"admit_p99_under_{TARGETS['admit_p99_ms']}ms_at_{concurrency}"] = \
                calls["admit"]["p99_ms"] < TARGETS["admit_p99_ms"]
            met[f"settle_p99_under_{TARGETS['settle_p99_ms']}ms_at_{concurrency}"] = \
                calls["settle"]["p99_ms"] < TARGETS["settle_p99_ms"]
    ratio = throughput.get("ratio_credit_to_limits")
    met["throughput_under_10pct_slower"] = None if ratio is None else \
        ratio >= TARGETS["throughput_ratio_at_least"]
    met["writer_at_least_half_of_executemany"] = (
        writer["writer_fraction_of_executemany"] >= TARGETS["writer_fraction_of_bare_at_least"])
    return met


def compare_latency(latency: dict[str, Any], args: argparse.Namespace
                    ) -> list[dict[str, Any]]:
    rows = []
    for size, concurrency, pace in latency_sizes(args):
        credit, limits = latency[f"credit_{size}"], latency[f"limits_{size}"]
        noop = latency[f"noop_{size}"]
        row: dict[str, Any] = {"size": size, "streams": concurrency,
                               "pace_ms": round(pace * 1000, 1)}
        for call in ("admit", "settle"):
            for p in ("p50_ms", "p99_ms"):
                row[f"{call}_{p}"] = {"credit": credit[call][p], "limits": limits[call][p],
                                      "noop_evalsha": noop[call][p],
                                      "ratio": round(credit[call][p] / limits[call][p], 2)
                                      if limits[call][p] else None}
        for p in ("p50_ms", "p99_ms"):
            row[f"extend_{p}"] = {"credit": credit["extend"][p],
                                  "noop_evalsha": noop["extend"][p]}
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app import create_app
    from core.db import db

    prefix = new_redis_prefix("billing")
    url = fresh_database(args.database)
    app = create_app(bench_settings(url, prefix, **LIMITS))
    payload: dict[str, Any] = {
        "command": "python -m bench.billing_hook " + shlex.join(sys.argv[1:]),
        "targets": TARGETS, "rates": {m: list(r) for m, r in RATES.items()},
        "chunk": {"output_tokens": app.config["ENSOUL_BILLING_CHUNK_OUTPUT_TOKENS"],
                  "audio_ms": app.config["ENSOUL_BILLING_CHUNK_AUDIO_MS"]},
        "stream": {"prompt_tokens": PROMPT_TOKENS, "answer_tokens": LONG_ANSWER,
                   "throughput_answer_tokens": SHORT_ANSWER},
        "repeats": args.repeats}
    started = time.perf_counter()
    try:
        with app.app_context():
            plan = billing_plan()
            tenant_id, profiles = billed_tenant("billing", plan, args.devices, BIG_PACKAGE)
            db.session.remove()
        payload["setup"] = {"devices": len(profiles), "tenant_id": str(tenant_id),
                            "licence_state": profiles[0].licence.get("state"),
                            "seconds": round(time.perf_counter() - started, 2)}
        latency, throughput, pooled = asyncio.run(
            hook_phases(args, prefix, app.config, profiles))
        payload["latency"] = {"streams_per_run": args.latency_streams, **latency}
        payload["compare_latency"] = compare_latency(latency, args)
        payload["throughput"] = throughput
        payload["usage_writer"] = writer_phases(args, app, url, profiles)
        payload["overdraft"] = overdraft_phases(args, app, plan)
        if args.broker_repeats:
            payload["broker"] = broker_phases(args)
        else:
            payload["broker"] = {"skipped": "--broker-repeats 0"}
        payload["target_met"] = targets_met(latency, throughput, payload["usage_writer"])
        payload["seconds"] = round(time.perf_counter() - started, 1)
        if args.result_name:
            png = RESULTS_DIR / f"{args.result_name}.png"
            plot(pooled, payload, args, png)
            payload["png"] = str(png.relative_to(PROJECT_ROOT))
            payload["json"] = str(write_result(args.result_name, payload)
                                  .relative_to(PROJECT_ROOT))
        return payload
    finally:
        clear_redis_prefix(prefix)
        if not args.keep_db:
            drop_database(args.database)


def plot(pooled: dict[str, list[float]], payload: dict[str, Any], args: argparse.Namespace,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colours = {"credit": "tab:blue", "limits": "tab:orange", "noop": "tab:grey"}
    styles = ["-", "--", ":", "-."]
    sizes = [size for size in latency_sizes(args) if not size[0].endswith("_saturated")]
    for axis, call in zip(axes[0], ("admit", "extend", "settle"), strict=True):
        for index, (size, streams, pace) in enumerate(sizes):
            for hook in ("credit", "limits", "noop"):
                values = sorted(pooled.get(f"{hook}_{size}_{call}", []))
                if not values:
                    continue
                ys = [(i + 1) / len(values) for i in range(len(values))]
                mode = f"paced {pace * 1000:g} ms" if pace else "back to back"
                name = "no-op EVALSHA" if hook == "noop" else hook
                axis.plot(values, ys, styles[index % len(styles)], color=colours[hook],
                          label=f"{name}, {streams} stream{'s' if streams != 1 else ''}, "
                                f"{mode}", linewidth=1)
        target = {"admit": TARGETS["admit_p99_ms"], "settle": TARGETS["settle_p99_ms"]}.get(call)
        if target:
            axis.axvline(target, color="grey", linewidth=0.8)
            axis.axhline(0.99, color="grey", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_title(f"hook.{call} latency (all repeats)")
        axis.set_xlabel("ms (log)")
        axis.set_ylabel("fraction of calls")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")

    def bars(axis: Any, labels: list[str], values: list[float], title: str, unit: str) -> None:
        axis.bar(labels, values, color=["tab:blue", "tab:cyan", "tab:orange", "tab:grey",
                                        "tab:green"][:len(labels)])
        for x, value in enumerate(values):
            axis.annotate(f"{value:,.0f}", (x, value), ha="center", va="bottom", fontsize=8)
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.tick_params(axis="x", labelsize=8)

    throughput = payload["throughput"]
    bars(axes[1][0], ["credit", "credit\n+2 extends", "limits", "no-op\nEVALSHA"],
         [throughput[v]["requests_per_second"] for v in ("credit", "credit_250", "limits",
                                                          "noop")],
         f"admit+settle loop, {args.throughput_concurrency} coroutines, one process",
         "requests/s")
    writer = payload["usage_writer"]["variants"]
    bars(axes[1][1], ["UsageWriter\n+ ledger", "no ledger", "bare\nexecutemany",
                      "bare\nCOPY"],
         [writer[v]["events_per_second"] for v in (*WRITERS, "executemany_floor",
                                                    "copy_floor")],
         f"usage events to Postgres (batches of {args.writer_batch})", "events/s")
    broker = payload.get("broker", {})
    if "credit" in broker:
        bars(axes[1][2], ["broker,\ncredit hook", "broker,\nlimits hook"],
             [broker[h]["admitted_requests_per_second"] for h in ("credit", "limits")],
             "full broker, 1 process (admitted requests/s)", "requests/s")
    else:
        axes[1][2].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.billing_hook", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", type=int, default=50, help="devices of the billed tenant")
    p.add_argument("--concurrency", type=ints, default=[1, 50],
                   help="concurrent streams of the latency runs (default 1,50)")
    p.add_argument("--pace-ms", type=float, default=20.0,
                   help="pause between a stream's calls when more than one stream runs (each "
                        "size also runs back to back, saturated)")
    p.add_argument("--latency-streams", type=int, default=1500,
                   help="timed streams per hook, concurrency and repeat")
    p.add_argument("--throughput-concurrency", type=int, default=50)
    p.add_argument("--throughput-seconds", type=float, default=3.0)
    p.add_argument("--writer-events", type=int, default=6000)
    p.add_argument("--writer-batch", type=int, default=500, help="UsageWriter's batch")
    p.add_argument("--overdraft-streams", type=int, default=200)
    p.add_argument("--overdraft-balance", type=int, default=37)
    p.add_argument("--overdraft-steps", type=int, default=40)
    p.add_argument("--overdraft-step-tokens", type=int, default=20)
    p.add_argument("--broker-repeats", type=int, default=3,
                   help="full broker throughput runs per hook (0: none)")
    p.add_argument("--broker-devices", type=int, default=50)
    p.add_argument("--broker-duration", type=float, default=6.0)
    p.add_argument("--database", default="ensoul_bench_billing_hook",
                   help="recreated, then dropped (must start with ensoul_bench); the broker "
                        "phases use <name>_broker")
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--result-name", default="billing_hook")
    return p


def main() -> None:
    args = parser().parse_args()
    payload = run(args)
    print(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
