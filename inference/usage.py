"""Usage events: from a settled request to a ``usage_events`` row, lossless and counted once.

The broker settles a request in one Redis script that deletes its in-flight record and appends
the encoded :class:`UsageEvent` to the tenant's usage stream (``usage:{t:<tenant>}``, entries
``e <json>``, and with billing's credit hook ``p <json>``: the price set beside the event by
the settle script, merged into it when read); the stream's key is also added to the discovery
set ``usage:streams``.
:class:`UsageWriter` (the ``usage-writer`` consumer group) reads every stream, inserts a batch
in one statement that ignores rows already written (``ON CONFLICT (device_id, request_id,
admitted_at) DO NOTHING``), commits, and only then acknowledges and deletes the entries.

What each failure costs:
- writer dies after the commit, before the ack: its entries stay pending; another writer (or
  itself, restarted) takes them with XAUTOCLAIM and the insert finds the rows already there;
- writer dies before the commit: same, nothing was written;
- Postgres down: nothing is acknowledged; the entries are retried from this consumer's
  pending list once the database answers;
- Redis killed: the AOF holds every entry and the group's state (``config/redis.conf``);
- an undecodable entry, or one the database refuses (say an unknown tenant): moved to the
  dead-letter stream ``usage:dead`` with the error, then acknowledged, never blocking the rest.

Acknowledged entries are deleted (XACK then XDEL, one MULTI on one key) rather than trimmed:
MAXLEN trimming could drop entries not yet read under a backlog, and MINID trimming from the
group's last-delivered id would drop entries delivered but still pending (a crashed writer's),
so both could lose usage; XDEL removes exactly what is in Postgres, and the stream stays bounded
by the backlog. This relies on ``usage-writer`` being the streams' only consumer group: anything
else that wants usage reads the table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import redis as redis_lib
from flask import Flask, current_app, has_app_context
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from core.db import db, insert_ignoring_duplicates, utcnow
from core.ids import uuid7
from core.redis import get_redis, name
from inference.models import UsageEventRecord
from inference.units import UNIT_NAMES, Units

log = logging.getLogger(__name__)

GROUP = "usage-writer"
FIELD = "e"  # the event as the broker encoded it
PRICE_FIELD = "p"  # billing's price of it, when billing set it apart (merged into the event)
KINDS = ("text", "vision", "voice")
FINISHES = ("stop", "length", "abort", "quota_exhausted", "error")
SETTLED_BY = ("broker", "sweeper")
REQUEST_ID_MAX = 64
# Test-only: exit right after the commit, before the ack (the crash the pending list covers).
CRASH_AFTER_COMMIT_ENV = "ENSOUL_USAGE_WRITER_CRASH_AFTER_COMMIT"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# What the database refuses of a row (through SQLAlchemy on SQLite, the driver on Postgres).
REFUSED = (IntegrityError, DataError, psycopg.errors.IntegrityError, psycopg.errors.DataError)

SettledHook = Callable[[list["UsageEvent"]], None]
_settled_hooks: list[SettledHook] = []


def register_settled_hook(hook: SettledHook) -> SettledHook:
    """``hook(events)`` runs in the writer's transaction, after the rows are inserted and before
    the commit (billing posts the events' credits to its ledger). It must be idempotent: a batch
    is written again after a crash before its acknowledgement."""
    if hook not in _settled_hooks:
        _settled_hooks.append(hook)
    return hook


@dataclass(slots=True, kw_only=True)
class UsageEvent:
    """The immutable record of one request: what it consumed and what that cost."""

    tenant_id: str
    device_id: str
    product_id: str | None = None
    request_id: str  # the device's choice, at most 64 characters
    admitted_at_ms: int  # fixed at admission: part of the de-duplication key
    settled_at_ms: int
    stream_id: str
    kind: str  # text | vision | voice
    conversation_id: str | None = None
    provider: str
    model: str
    units: Units = field(default_factory=Units)
    credits: int = 0  # 0 until billing prices the units
    credit_split: dict[str, int] = field(default_factory=dict)  # source -> credits
    grants: dict[str, int] = field(default_factory=dict)  # allowance account -> its grant
    rate_card_version: str | None = None
    ttft_ms: float | None = None  # provider's time to first token
    first_delta_ms: float | None = None  # platform receive -> first delta published
    duration_ms: float
    finish: str  # stop | length | abort | quota_exhausted | error
    error_code: str | None = None
    broker: str  # the settling process
    settled_by: str = "broker"  # broker | sweeper

    def as_public_dict(self) -> dict[str, Any]:
        """What the device sees as ``end.usage``."""
        return {**self.units.as_dict(), "credits": self.credits,
                "credit_split": dict(self.credit_split)}


class UsageDecodeError(ValueError):
    """An entry that can never become a row (it goes to the dead-letter stream)."""


def encode(event: UsageEvent) -> str:
    return orjson.dumps(event).decode()  # dataclasses, nested ones too, natively


def entry_data(fields: dict[bytes, bytes]) -> Any:
    """A stream entry's event as JSON data: the event with its price merged in."""
    data = orjson.loads(fields.get(FIELD.encode(), b""))
    price = fields.get(PRICE_FIELD.encode())
    if price is not None and isinstance(data, dict):
        priced = orjson.loads(price)
        if not isinstance(priced, dict):
            raise UsageDecodeError("the price is not a JSON object")
        data.update(priced)
    return data


def decode(text: str | bytes | dict[bytes, bytes]) -> UsageEvent:
    """Parse and validate an encoded event or a stream entry's fields; unknown keys are ignored
    so an older writer accepts a newer broker's events."""
    try:
        data = entry_data(text) if isinstance(text, dict) else orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise UsageDecodeError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageDecodeError("not a JSON object")
    units = data.get("units") or {}
    split = data.get("credit_split") or {}
    grants = data.get("grants") or {}
    if not isinstance(units, dict) or not isinstance(split, dict) or \
            not isinstance(grants, dict):
        raise UsageDecodeError("units, credit_split and grants must be objects")
    event = UsageEvent(
        tenant_id=_uuid(data, "tenant_id"),
        device_id=_uuid(data, "device_id"),
        product_id=_uuid(data, "product_id", optional=True),
        request_id=_text(data, "request_id", max_length=REQUEST_ID_MAX),
        admitted_at_ms=_int(data, "admitted_at_ms"),
        settled_at_ms=_int(data, "settled_at_ms"),
        stream_id=_text(data, "stream_id"),
        kind=_choice(data, "kind", KINDS),
        conversation_id=_optional_text(data, "conversation_id"),
        provider=_text(data, "provider", min_length=0),
        model=_text(data, "model", min_length=0),
        units=Units(**{unit: _int(units, unit, default=0, minimum=0) for unit in UNIT_NAMES}),
        credits=_int(data, "credits", default=0),
        credit_split={str(k): _int(split, k) for k in split},
        grants={str(k): _int(grants, k, minimum=0) for k in grants},
        rate_card_version=_optional_text(data, "rate_card_version"),
        ttft_ms=_float(data, "ttft_ms", optional=True),
        first_delta_ms=_float(data, "first_delta_ms", optional=True),
        duration_ms=_float(data, "duration_ms") or 0.0,
        finish=_choice(data, "finish", FINISHES),
        error_code=_optional_text(data, "error_code"),
        broker=_text(data, "broker", min_length=0),
        settled_by=_choice(data, "settled_by", SETTLED_BY, default="broker"),
    )
    for moment in (event.admitted_at_ms, event.settled_at_ms):
        _moment(moment)  # in datetime's range, or poison now rather than at the insert
    return event


_REQUIRED: Any = object()


def _get(data: dict[str, Any], key: str, default: Any) -> Any:
    if key not in data or data[key] is None:
        if default is _REQUIRED:
            raise UsageDecodeError(f"{key} is missing")
        return default
    return data[key]


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(data: dict[str, Any], key: str, optional: bool = False) -> Any:
    value = _get(data, key, None if optional else _REQUIRED)
    if value is None:
        return None
    if isinstance(value, str) and _CANONICAL_UUID.fullmatch(value):
        return value  # as the broker writes them; anything else is parsed below
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise UsageDecodeError(f"{key} is not a UUID: {str(value)[:80]!r}") from None


def _text(data: dict[str, Any], key: str, *, min_length: int = 1,
          max_length: int | None = None) -> str:
    value = _get(data, key, _REQUIRED)
    if not isinstance(value, str) or len(value) < min_length:
        raise UsageDecodeError(f"{key} must be a non-empty string" if min_length
                               else f"{key} must be a string")
    if max_length is not None and len(value) > max_length:
        raise UsageDecodeError(f"{key} is longer than {max_length} characters")
    return value


def _optional_text(data: dict[str, Any], key: str) -> str | None:
    return _text(data, key, min_length=0) if data.get(key) is not None else None


def _int(data: dict[str, Any], key: str, *, default: Any = _REQUIRED,
         minimum: int | None = None) -> int:
    value = _get(data, key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageDecodeError(f"{key} must be an integer")
    if minimum is not None and value < minimum:
        raise UsageDecodeError(f"{key} must be at least {minimum}")
    return value


def _float(data: dict[str, Any], key: str, optional: bool = False) -> float | None:
    value = _get(data, key, None if optional else _REQUIRED)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise UsageDecodeError(f"{key} must be a number")
    return float(value)


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...],
            default: Any = _REQUIRED) -> str:
    value = _get(data, key, default)
    if value not in choices:
        raise UsageDecodeError(f"{key} must be one of {', '.join(choices)}")
    return str(value)


def _moment(epoch_ms: int) -> dt.datetime:
    try:
        return _EPOCH + dt.timedelta(milliseconds=epoch_ms)  # exact: no float rounding
    except OverflowError:
        raise UsageDecodeError(f"{epoch_ms} is not a time in epoch milliseconds") from None


# --- streams -------------------------------------------------------------------------------


def usage_stream(tenant_id: uuid.UUID | str) -> str:
    """The tenant's usage stream; its hash tag keeps it in the tenant's Redis Cluster slot."""
    return name("usage", f"{{t:{tenant_id}}}")


def streams_key() -> str:
    return name("usage", "streams")


def dead_letter_stream() -> str:
    return name("usage", "dead")


def append_event(redis: redis_lib.Redis, event: UsageEvent) -> str:
    """Append ``event`` as the broker's settle script does (tests and embedded tools)."""
    stream = usage_stream(event.tenant_id)
    pipe = redis.pipeline(transaction=False)
    pipe.sadd(streams_key(), stream)
    pipe.xadd(stream, {FIELD: encode(event)})
    return _str(pipe.execute()[1])


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# --- the writer ----------------------------------------------------------------------------

Entry = tuple[str, str, dict[bytes, bytes] | None]  # stream, entry id, fields (None: deleted)

_table: Table = UsageEventRecord.__table__  # type: ignore[assignment]
_UNIQUE_KEY = ["device_id", "request_id", "admitted_at"]


def _insert(dialect: str) -> Any:
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(_table).on_conflict_do_nothing(index_elements=_UNIQUE_KEY)


def _row(event: UsageEvent, written_at: dt.datetime) -> dict[str, Any]:
    return {
        "id": uuid7(),
        "tenant_id": uuid.UUID(event.tenant_id),
        "device_id": uuid.UUID(event.device_id),
        "product_id": uuid.UUID(event.product_id) if event.product_id else None,
        "request_id": event.request_id,
        "admitted_at": _moment(event.admitted_at_ms),
        "settled_at": _moment(event.settled_at_ms),
        "stream_id": event.stream_id,
        "kind": event.kind,
        "conversation_id": event.conversation_id,
        "provider": event.provider,
        "model": event.model,
        "input_tokens": event.units.input_tokens,
        "output_tokens": event.units.output_tokens,
        "audio_in_ms": event.units.audio_in_ms,
        "audio_out_ms": event.units.audio_out_ms,
        "images": event.units.images,
        "tool_calls": event.units.tool_calls,
        "credits": event.credits,
        "credit_split": dict(event.credit_split),
        "rate_card_version": event.rate_card_version,
        "ttft_ms": event.ttft_ms,
        "first_delta_ms": event.first_delta_ms,
        "duration_ms": event.duration_ms,
        "finish": event.finish,
        "error_code": event.error_code,
        "broker": event.broker,
        "settled_by": event.settled_by,
        "written_at": written_at,
    }


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class UsageWriter:
    """Moves usage events from the tenants' streams to ``usage_events``; run several at once
    with distinct consumer names (each entry goes to one of them)."""

    def __init__(self, app: Flask, consumer: str, batch: int = 500, block_ms: int = 1000, *,
                 claim_idle_ms: int = 60_000, reclaim_every: float = 30.0,
                 rescan_every: float = 300.0, forget_consumers_after_ms: int = 3_600_000) -> None:
        self.app = app
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms  # pending this long: its consumer is presumed dead
        self.reclaim_every = reclaim_every
        self.rescan_every = rescan_every
        self.forget_consumers_after_ms = forget_consumers_after_ms
        self.crash_after_commit = os.environ.get(CRASH_AFTER_COMMIT_ENV) == "1"
        self._grouped: set[str] = set()  # streams known to have the group
        self._next_reclaim = 0.0  # the first step reclaims at once
        self._next_scan = 0.0
        self._retry_own = True  # our own pending entries first (a restart, a failed write)

    # -- the loop

    def run(self, stop: threading.Event) -> None:
        log.info("usage writer %s started", self.consumer)
        with self._context():
            while not stop.is_set():
                try:
                    if self.drain_once() == 0 and not self._grouped:
                        stop.wait(self.block_ms / 1000)  # no stream yet: nothing to block on
                except (redis_lib.ConnectionError, redis_lib.TimeoutError, OperationalError) as exc:
                    log.warning("usage writer %s: %s; retrying", self.consumer, exc)  # an outage
                    self._recover(stop)
                except Exception:
                    log.exception("usage writer %s: step failed; retrying", self.consumer)
                    self._recover(stop)
        log.info("usage writer %s stopped", self.consumer)

    def _recover(self, stop: threading.Event) -> None:
        db.session.rollback()
        self._retry_own = True
        self._grouped.clear()
        stop.wait(1.0)

    def drain_once(self) -> int:
        """One step: reclaim if due, then read (blocking up to ``block_ms`` when idle) and
        write. Returns how many entries left the streams (written, duplicates, dead letters)."""
        with self._context():
            streams = self._discover()
            if not streams:
                return 0
            handled = 0
            now = time.monotonic()
            if now >= self._next_reclaim:
                self._next_reclaim = now + self.reclaim_every
                handled += self._reclaim(streams)
            if self._retry_own:
                entries = self._read(streams, "0", None)
                if entries:
                    return handled + self._process(entries)
                self._retry_own = False
            block = None if handled else self.block_ms
            return handled + self._process(self._read(streams, ">", block))

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        # Reuse the caller's context: popping a new one would end its database session.
        if has_app_context() and current_app._get_current_object() is self.app:  # type: ignore[attr-defined]
            yield
        else:
            with self.app.app_context():
                yield

    # -- Redis

    def _discover(self) -> list[str]:
        redis = get_redis()
        if time.monotonic() >= self._next_scan:
            # A broker that died between its settle script and its SADD left a stream the
            # set does not name: find every usage stream by its name now and then.
            self._next_scan = time.monotonic() + self.rescan_every
            pattern = _glob_escape(name("usage")) + ":{t:*}"
            found = list(redis.scan_iter(match=pattern, count=1000, _type="STREAM"))
            if found:
                redis.sadd(streams_key(), *found)
        streams = sorted(_str(s) for s in redis.smembers(streams_key()))
        for stream in streams:
            if stream not in self._grouped:
                try:
                    # From id 0: entries appended before the group existed are usage too.
                    redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except redis_lib.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._grouped.add(stream)
        return streams

    def _read(self, streams: list[str], since: str, block: int | None) -> list[Entry]:
        """Up to ``batch`` entries *per stream*, all written in one statement."""
        try:
            reply: Any = get_redis().xreadgroup(GROUP, self.consumer,
                                                dict.fromkeys(streams, since),
                                                count=self.batch, block=block)
        except redis_lib.ResponseError as exc:
            if "NOGROUP" in str(exc):  # a stream lost its group (deleted, Redis replaced)
                self._grouped.clear()
                return []
            raise
        return [(_str(stream), _str(entry_id), fields or None)
                for stream, entries in reply or [] for entry_id, fields in entries]

    def _reclaim(self, streams: list[str]) -> int:
        """Take over entries that other (presumably dead) consumers left pending."""
        redis = get_redis()
        handled = 0
        for stream in streams:
            start = "0-0"
            while True:
                reply: Any = redis.xautoclaim(stream, GROUP, self.consumer,
                                              self.claim_idle_ms, start_id=start,
                                              count=self.batch)
                start, claimed = _str(reply[0]), reply[1]
                if len(reply) > 2 and reply[2]:
                    log.error("usage writer: %s had pending entries deleted before their ack: "
                              "%s", stream, [_str(i) for i in reply[2]][:20])
                if claimed:
                    log.warning("usage writer %s: reclaimed %d entries of %s", self.consumer,
                                len(claimed), stream)
                    handled += self._process([(stream, _str(i), f or None) for i, f in claimed])
                if start == "0-0":
                    break
            self._forget_idle_consumers(stream)
        return handled

    def _forget_idle_consumers(self, stream: str) -> None:
        """Consumer names carry a pid: drop the departed ones that hold nothing."""
        redis = get_redis()
        for consumer in redis.xinfo_consumers(stream, GROUP):
            consumer_name = _str(consumer["name"])
            if (consumer_name != self.consumer and int(consumer["pending"]) == 0
                    and int(consumer["idle"]) > self.forget_consumers_after_ms):
                redis.xgroup_delconsumer(stream, GROUP, consumer_name)

    # -- one batch

    def _process(self, entries: list[Entry]) -> int:
        if not entries:
            return 0
        written_at = utcnow()
        rows: list[tuple[Entry, UsageEvent, dict[str, Any]]] = []
        dead: list[tuple[Entry, str]] = []
        for entry in entries:
            fields = entry[2]
            if fields is None:
                continue  # deleted while pending: nothing left to write, only to acknowledge
            try:
                event = decode(fields)
                rows.append((entry, event, _row(event, written_at)))
            except UsageDecodeError as exc:
                dead.append((entry, str(exc)))
        try:
            dead += self._write(rows)
        except Exception:
            db.session.rollback()
            self._retry_own = True  # nothing acknowledged: try these again first
            raise
        if self.crash_after_commit:
            os._exit(9)
        if dead:
            self._dead_letter(dead)
        self._acknowledge(entries)
        return len(entries)

    def _write(self, rows: list[tuple[Entry, UsageEvent, dict[str, Any]]]
               ) -> list[tuple[Entry, str]]:
        """Insert, run the settled hooks (billing's ledger) in the same transaction and commit;
        rows the database refuses come back for the dead-letter stream."""
        if not rows:
            return []
        session = db.session
        try:
            insert_ignoring_duplicates(_table, [row for _, _, row in rows], _UNIQUE_KEY)
            for hook in _settled_hooks:
                hook([event for _, event, _ in rows])
            session.commit()
            return []
        except REFUSED:
            session.rollback()
        # One bad row fails the whole statement: find it, one transaction per row (rare).
        refused = []
        for entry, event, row in rows:
            try:
                insert_ignoring_duplicates(_table, [row], _UNIQUE_KEY)
                for hook in _settled_hooks:
                    hook([event])
                session.commit()
            except REFUSED as exc:
                session.rollback()
                refused.append((entry, f"refused by the database: {getattr(exc, 'orig', exc)}"))
        return refused

    def _dead_letter(self, dead: list[tuple[Entry, str]]) -> None:
        """Before the ack: a crash in between repeats a dead letter, never loses one."""
        pipe = get_redis().pipeline(transaction=False)
        for (stream, entry_id, fields), error in dead:
            log.error("usage writer: %s %s moved to the dead-letter stream: %s", stream,
                      entry_id, error)
            body: dict[Any, Any] = {"stream": stream, "entry": entry_id, "error": error[:2000],
                                    "consumer": self.consumer}
            body.update({b"field:" + key: value for key, value in (fields or {}).items()})
            pipe.xadd(dead_letter_stream(), body)
        pipe.execute()

    def _acknowledge(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id, _ in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        pipe = get_redis().pipeline(transaction=True)  # an ack never stays without its delete
        for stream, ids in by_stream.items():
            pipe.xack(stream, GROUP, *ids)
            pipe.xdel(stream, *ids)
        pipe.execute()


def run_usage_writer(app: Flask, stop: threading.Event, consumer: str | None = None) -> None:
    """The ``usage-writer`` process: drain until ``stop`` is set."""
    UsageWriter(app, consumer or default_consumer()).run(stop)
