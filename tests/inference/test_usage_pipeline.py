"""The usage pipeline, Redis stream to ``usage_events``: every settled request becomes exactly
one row, whatever dies on the way (the writer between its commit and its ack, redis-server by
kill -9), and a poison entry never blocks the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from core.db import db
from core.ids import uuid7
from core.redis import name
from inference.models import UsageEventRecord
from inference.units import Units
from inference.usage import (
    CRASH_AFTER_COMMIT_ENV,
    GROUP,
    UsageDecodeError,
    UsageEvent,
    UsageWriter,
    append_event,
    dead_letter_stream,
    decode,
    encode,
    streams_key,
    usage_stream,
)
from tests.factories import TenantFactory
from tests.support.processes import PROJECT_ROOT, ManagedProcess
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

NOW_MS = 1_796_000_000_000

# A writer process, as the ``usage-writer`` process line will run it (stops on SIGTERM).
WRITER_SCRIPT = """
import signal, sys, threading
from app import create_app
from inference.usage import UsageWriter
app = create_app()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
UsageWriter(app, sys.argv[1], batch=int(sys.argv[2]), block_ms=100, claim_idle_ms=300,
            reclaim_every=0.2).run(stop)
"""


def make_event(tenant_id: Any, n: int = 0, **changes: Any) -> UsageEvent:
    values: dict[str, Any] = {
        "tenant_id": str(tenant_id),
        "device_id": str(uuid.uuid5(uuid.UUID(str(tenant_id)), str(n))),  # unique per tenant
        "product_id": str(uuid.UUID(int=7)), "request_id": f"req-{n}",
        "admitted_at_ms": NOW_MS + n, "settled_at_ms": NOW_MS + n + 900,
        "stream_id": f"broker-1-{n}", "kind": "text", "provider": "local", "model": "echo",
        "units": Units(input_tokens=10 + n, output_tokens=20, tool_calls=1),
        "duration_ms": 900.5, "finish": "stop", "broker": "broker-1",
    }
    values.update(changes)
    return UsageEvent(**values)


def row_count(tenant_id: Any = None) -> int:
    query = select(func.count()).select_from(UsageEventRecord)
    if tenant_id is not None:
        query = query.where(UsageEventRecord.tenant_id == tenant_id)
    return int(db.session.scalar(query) or 0)


def drain(writer: UsageWriter) -> int:
    total = 0
    while handled := writer.drain_once():
        total += handled
    return total


def backlog(client: redis_lib.Redis, stream: str) -> tuple[int, int]:
    """(entries still in the stream, entries delivered but not acknowledged)."""
    return int(client.xlen(stream)), int(client.xpending(stream, GROUP)["pending"])


def writer_env(database_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "REDIS_URL": redis_url,
            "ENSOUL_REDIS_PREFIX": redis_prefix, "SECRET_KEY": "test-secret-key",
            "ENSOUL_ENCRYPTION_KEY": "test-encryption-key"}


# --- the event -----------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    event = make_event(uuid7(), 3, conversation_id="c-1", credits=42,
                       credit_split={"allowance": 30, "package": 12}, rate_card_version="rc-2",
                       ttft_ms=120.5, first_delta_ms=1.25, finish="quota_exhausted",
                       error_code="quota_exhausted", settled_by="sweeper",
                       units=Units(1, 2, 3, 4, 5, 6))
    text = encode(event)
    assert " " not in text  # compact
    assert decode(text) == event
    assert decode(text.encode()) == event
    assert decode(encode(make_event(uuid7(), product_id=None))).product_id is None
    assert event.as_public_dict() == {
        "input_tokens": 1, "output_tokens": 2, "audio_in_ms": 3, "audio_out_ms": 4,
        "images": 5, "tool_calls": 6, "credits": 42,
        "credit_split": {"allowance": 30, "package": 12}}


def test_decode_ignores_unknown_keys() -> None:
    event = make_event(uuid7())
    body = {**json.loads(encode(event)), "added_by_a_newer_broker": 1}
    assert decode(json.dumps(body)) == event


@pytest.mark.parametrize("change", [
    {"request_id": "r" * 65}, {"request_id": ""}, {"tenant_id": "nope"}, {"kind": "smell"},
    {"finish": "maybe"}, {"settled_by": "nobody"}, {"admitted_at_ms": "1"},
    {"admitted_at_ms": 10**18}, {"units": {"input_tokens": -1}}, {"units": {"images": 1.5}},
    {"credit_split": {"package": "12"}}, {"duration_ms": None}, {"broker": 7},
])
def test_decode_refuses_what_cannot_be_a_row(change: dict[str, Any]) -> None:
    body = {**json.loads(encode(make_event(uuid7()))), **change}
    with pytest.raises(UsageDecodeError):
        decode(json.dumps(body))


@pytest.mark.parametrize("text", ["", "not json", "[]", "{}", '{"tenant_id": null}'])
def test_decode_refuses_garbage(text: str) -> None:
    with pytest.raises(UsageDecodeError):
        decode(text)


# --- the writer, in process ----------------------------------------------------------------


def test_writer_drains_two_tenants_streams_into_rows(app: Any, redis_client: Any) -> None:
    a, b = TenantFactory(), TenantFactory()
    for n in range(23):
        append_event(redis_client, make_event(a.id, n))
    for n in range(17):
        append_event(redis_client, make_event(b.id, n, credits=n))
    assert {m.decode() for m in redis_client.smembers(streams_key())} == {
        usage_stream(a.id), usage_stream(b.id)}

    writer = UsageWriter(app, "writer-1", batch=5, block_ms=10)
    assert drain(writer) == 40
    assert (row_count(a.id), row_count(b.id)) == (23, 17)
    for tenant in (a, b):  # acknowledged and deleted: the streams stay bounded
        assert backlog(redis_client, usage_stream(tenant.id)) == (0, 0)

    row = db.session.scalars(select(UsageEventRecord).where(
        UsageEventRecord.tenant_id == b.id, UsageEventRecord.request_id == "req-9")).one()
    event = make_event(b.id, 9, credits=9)
    assert (row.device_id, row.product_id) == (uuid.UUID(event.device_id), uuid.UUID(int=7))
    assert row.tenant_id == b.id
    assert int(row.admitted_at.timestamp() * 1000) == event.admitted_at_ms
    assert int(row.settled_at.timestamp() * 1000) == event.settled_at_ms
    assert (row.input_tokens, row.output_tokens, row.tool_calls, row.images) == (19, 20, 1, 0)
    assert (row.credits, row.credit_split, row.finish, row.settled_by) == (9, {}, "stop",
                                                                           "broker")
    assert (row.duration_ms, row.ttft_ms, row.stream_id) == (900.5, None, "broker-1-9")

    append_event(redis_client, make_event(a.id, 99))  # the writer keeps following
    assert drain(writer) == 1
    assert row_count(a.id) == 24


def test_a_duplicate_event_is_one_row(app: Any, redis_client: Any) -> None:
    tenant = TenantFactory()
    event = make_event(tenant.id, 1)
    append_event(redis_client, event)
    append_event(redis_client, event)  # in the same batch
    writer = UsageWriter(app, "writer-1", block_ms=10)
    assert drain(writer) == 2
    append_event(redis_client, event)  # and in a later one
    assert drain(writer) == 1
    assert row_count(tenant.id) == 1
    # Same request id at another admission (the device reused it a day later): another row.
    append_event(redis_client, make_event(tenant.id, 1, admitted_at_ms=NOW_MS + 86_400_000))
    drain(writer)
    assert row_count(tenant.id) == 2


def test_poison_entries_go_to_the_dead_letter_stream(app: Any, redis_client: Any) -> None:
    tenant = TenantFactory()
    stream = usage_stream(tenant.id)
    append_event(redis_client, make_event(tenant.id, 1))
    redis_client.xadd(stream, {"e": "{not json"})
    redis_client.xadd(stream, {"other": "field"})
    # Decodes, but the database refuses it: no such tenant (the foreign key).
    append_event(redis_client, make_event(uuid7(), 2))
    append_event(redis_client, make_event(tenant.id, 3))

    writer = UsageWriter(app, "writer-1", block_ms=10)
    assert drain(writer) == 5
    assert row_count(tenant.id) == 2  # the good ones, around the bad ones
    assert backlog(redis_client, stream) == (0, 0)
    dead = redis_client.xrange(dead_letter_stream())
    assert len(dead) == 3
    errors = {fields[b"error"].decode(): fields for _, fields in dead}
    not_json = next(f for e, f in errors.items() if e.startswith("not JSON"))
    assert not_json[b"stream"].decode() == stream
    assert not_json[b"field:e"] == b"{not json"
    assert any(f.get(b"field:other") == b"field" for f in errors.values())
    assert any(e.startswith("refused by the database") for e in errors)


def test_a_stream_missing_from_the_discovery_set_is_found(app: Any, redis_client: Any) -> None:
    """A broker that died between its settle script and its SADD: the writer's scan finds it."""
    tenant = TenantFactory()
    redis_client.xadd(usage_stream(tenant.id), {"e": encode(make_event(tenant.id, 1))})
    assert drain(UsageWriter(app, "writer-1", block_ms=10)) == 1
    assert row_count(tenant.id) == 1


def test_pending_entries_of_a_dead_consumer_are_reclaimed(app: Any, redis_client: Any) -> None:
    tenant = TenantFactory()
    stream = usage_stream(tenant.id)
    for n in range(4):
        append_event(redis_client, make_event(tenant.id, n))
    # A consumer that read them and died without writing anything.
    redis_client.xgroup_create(stream, GROUP, id="0")
    redis_client.xreadgroup(GROUP, "ghost", {stream: ">"}, count=10)
    assert backlog(redis_client, stream) == (4, 4)

    writer = UsageWriter(app, "writer-1", block_ms=10, claim_idle_ms=0, reclaim_every=0)
    assert drain(writer) == 4
    assert row_count(tenant.id) == 4
    assert backlog(redis_client, stream) == (0, 0)


# --- crashes, with real processes ----------------------------------------------------------


@pytest.fixture
def processes(log_dir: Path) -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    yield started
    for process in reversed(started):
        process.stop()


def test_a_writer_killed_between_commit_and_ack_counts_nothing_twice(
        committed_app: Any, redis_client: Any, database_url: str, redis_url: str,
        redis_prefix: str, log_dir: Path, processes: list[ManagedProcess]) -> None:
    tenant = TenantFactory()
    stream = usage_stream(tenant.id)
    for n in range(50):
        append_event(redis_client, make_event(tenant.id, n))

    crashing = ManagedProcess(
        "usage-writer-crash", [sys.executable, "-c", WRITER_SCRIPT, "crashing", "500"],
        env={**writer_env(database_url, redis_url, redis_prefix), CRASH_AFTER_COMMIT_ENV: "1"},
        log_dir=log_dir)
    processes.append(crashing)
    crashing.start()
    assert crashing.proc is not None
    assert crashing.proc.wait(30) == 9, crashing.output()[-3000:]
    # Committed, never acknowledged: the rows are there and the entries still pending.
    assert row_count(tenant.id) == 50
    assert backlog(redis_client, stream) == (50, 50)

    survivor = ManagedProcess(
        "usage-writer-survivor", [sys.executable, "-c", WRITER_SCRIPT, "survivor", "500"],
        env=writer_env(database_url, redis_url, redis_prefix), log_dir=log_dir)
    processes.append(survivor)
    survivor.start()
    wait_until(lambda: backlog(redis_client, stream) == (0, 0), 30,
               what="the survivor to reclaim the crashed writer's entries")
    assert row_count(tenant.id) == 50
    assert "reclaimed 50 entries" in survivor.output()
    assert survivor.stop() == 0, survivor.output()[-3000:]


def test_redis_killed_and_restarted_loses_no_acknowledged_usage(
        committed_app: Any, database_url: str, redis_prefix: str, tmp_path: Path,
        log_dir: Path, processes: list[ManagedProcess]) -> None:
    server = RedisServer(tmp_path, log_dir, "redis-usage")
    processes.append(server.process)
    server.process.start()
    assert server.client.config_get("appendfsync") == {"appendfsync": "everysec"}
    tenants = [TenantFactory(), TenantFactory()]
    streams = [usage_stream(t.id) for t in tenants]

    def start_writer(consumer: str) -> ManagedProcess:
        writer = ManagedProcess(
            f"usage-writer-{consumer}", [sys.executable, "-c", WRITER_SCRIPT, consumer, "20"],
            env=writer_env(database_url, server.url, redis_prefix), log_dir=log_dir)
        processes.append(writer)
        return writer.start()

    def append(numbers: range) -> None:
        for n in numbers:
            append_event(server.client, make_event(tenants[n % 2].id, n))

    def kill_and_restart_redis() -> None:
        wait_until(server.aof_holds_every_write, 10, what="the AOF to hold every write")
        server.process.kill9()
        server.process.start()

    # 1. Exact: at the kill, 300 entries unwritten, 40 of them delivered to a consumer that
    # never acknowledges (what a writer dying mid-batch leaves). All of it must come back.
    first = start_writer("first")
    append(range(100))
    wait_until(lambda: row_count() == 100 and all(backlog(server.client, s) == (0, 0)
                                                  for s in streams), 30, what="100 rows")
    assert first.stop() == 0, first.output()[-3000:]
    append(range(100, 400))
    server.client.xreadgroup(GROUP, "ghost", dict.fromkeys(streams, ">"), count=20)
    kill_and_restart_redis()
    assert [backlog(server.client, s) for s in streams] == [(150, 20), (150, 20)]
    second = start_writer("second")
    wait_until(lambda: row_count() == 400, 30, what="every event after the restart")
    assert second.output().count("reclaimed 20 entries") == 2  # the ghost's

    # 2. Chaos: Redis dies again while the writer is busy; the writer rides the outage out.
    append(range(400, 800))
    kill_and_restart_redis()
    wait_until(lambda: row_count() == 800, 60, what="every event after the second restart")
    wait_until(lambda: all(backlog(server.client, s) == (0, 0) for s in streams), 30,
               what="the streams to be drained")
    assert row_count() == 800
    distinct = select(func.count()).select_from(
        select(UsageEventRecord.device_id, UsageEventRecord.request_id).distinct().subquery())
    assert db.session.scalar(distinct) == 800
    assert server.client.xlen(dead_letter_stream()) == 0
    assert second.running, second.output()[-3000:]
    assert second.stop() == 0, second.output()[-3000:]


# --- the embedded profile: SQLite and the in-process Redis ---------------------------------

EMBEDDED_SCRIPT = """
import json, sys
from alembic import command
from app import create_app
from accounts.services import create_tenant
from core.cli import alembic_config
from core.db import db
from core.redis import get_redis
from inference.usage import UsageWriter, append_event, dead_letter_stream, usage_stream
from tests.inference.test_usage_pipeline import make_event, row_count

url = sys.argv[1]
command.upgrade(alembic_config(url), "head")
app = create_app({"DATABASE_URL": url, "REDIS_URL": "memory://", "SECRET_KEY": "s",
                  "ENSOUL_ENCRYPTION_KEY": "k", "ENSOUL_SKIP_LOGGING": True})
with app.app_context():
    tenant = create_tenant("Embedded vendor", "EUR", "UTC")
    db.session.commit()
    for n in range(7):
        append_event(get_redis(), make_event(tenant.id, n))
    append_event(get_redis(), make_event(tenant.id, 3))
    get_redis().xadd(usage_stream(tenant.id), {"e": "poison"})
    writer = UsageWriter(app, "embedded", batch=3, block_ms=10)
    handled = 0
    while step := writer.drain_once():
        handled += step
    print(json.dumps({"handled": handled, "rows": row_count(tenant.id),
                      "dead": get_redis().xlen(dead_letter_stream())}))
"""


def test_the_embedded_profile_writes_usage_to_sqlite(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "MQTT_URL")}
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDED_SCRIPT, f"sqlite:///{tmp_path / 'embedded.db'}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "handled": 9, "rows": 7, "dead": 1}


def test_stream_names_carry_the_tenant_hash_tag(app: Any) -> None:
    tenant_id = uuid7()
    assert usage_stream(tenant_id) == name("usage", f"{{t:{tenant_id}}}")
    assert streams_key() == name("usage", "streams")
    assert dead_letter_stream() == name("usage", "dead")
