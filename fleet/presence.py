"""Device presence: who is online, when each device was last heard of, what it reports.

A device publishes, retained, ``{"state": "online"}`` on ``t/{tenant}/d/{device}/status`` after
connecting, with the last will ``{"state": "offline"}`` (retained, QoS 1) on the same topic, and
may publish retained JSON on ``.../state`` (``firmware_version``, ``config_version``, battery...).
:class:`PresenceTracker` (the ``broker`` process) follows those topics and keeps, per tenant in
Redis, the set of online devices, last-seen times (epoch ms) and the last reported state; it
never writes Postgres per message. :func:`flush_to_database` (the ``flush_presence`` job, every
``ENSOUL_PRESENCE_FLUSH_SECONDS``) copies last-seen times and reported versions to the
``devices`` rows in bulk. Every key carries the tenant's hash tag ``{t:<tenant>}``, so one
tenant's keys stay in one Redis Cluster slot.

Retained messages are replayed on every (re)connect of the tracker, which rebuilds the online
set after a tracker restart or a Redis loss. A device that loses broker access (revoked,
suspended, retired, reset) is disconnected by Mosquitto's reload *without* its will, so the
tracker, told by the registry channel, publishes the retained offline status for it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any, cast

import paho.mqtt.client as paho
from flask import Flask
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Table, bindparam, case, func, select, update

from core.db import UTCDateTime, db, on_commit
from core.mqtt import MqttTarget, new_client
from core.redis import get_redis, name
from fleet.access import REGISTRY_CHANNEL
from fleet.broker_access.rules import has_broker_access
from fleet.models import Device

log = logging.getLogger(__name__)

SHARE_GROUP = "ensoul-presence"
OFFLINE = json.dumps({"state": "offline"})
KINDS = ("status", "state")
MAX_PAYLOAD = 4096
VERSION_MAX = 64  # the devices columns' width
UNKNOWN_DEVICE_TTL = 60.0
FLUSH_BATCH = 1000
TENANTS_KEY = "presence:tenants"
STATS_KEY = "presence:stats"


def _key(tenant_id: uuid.UUID | str, kind: str) -> str:
    return name("presence", f"{{t:{tenant_id}}}", kind)


def _ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- reading presence ----------------------------------------------------------------------


def online_ids(tenant_id: uuid.UUID | str) -> set[str]:
    return {_text(m) for m in get_redis().smembers(_key(tenant_id, "online"))}


def online_flags(tenant_id: uuid.UUID | str, device_ids: list[str]) -> list[bool]:
    """Whether each of these devices is online: one round trip for a page of devices."""
    if not device_ids:
        return []
    flags = get_redis().smismember(_key(tenant_id, "online"), device_ids)
    return [bool(flag) for flag in flags]


def online_count(tenant_id: uuid.UUID | str) -> int:
    return int(get_redis().scard(_key(tenant_id, "online")))


def is_online(tenant_id: uuid.UUID | str, device_id: uuid.UUID | str) -> bool:
    return bool(get_redis().sismember(_key(tenant_id, "online"), str(device_id)))


def last_seen(tenant_id: uuid.UUID | str, device_id: uuid.UUID | str) -> dt.datetime | None:
    """When the platform last heard of the device (Redis; newer than ``devices.last_seen_at``)."""
    raw = get_redis().hget(_key(tenant_id, "last_seen"), str(device_id))
    return dt.datetime.fromtimestamp(int(raw) / 1000, dt.UTC) if raw else None


def reported_state(tenant_id: uuid.UUID | str, device_id: uuid.UUID | str) -> dict[str, Any]:
    raw = get_redis().hget(_key(tenant_id, "state"), str(device_id))
    return json.loads(raw) if raw else {}


# --- recording presence --------------------------------------------------------------------


class MalformedPayload(ValueError):
    pass


def _parse(kind: str, payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise MalformedPayload(f"{len(payload)} bytes, more than {MAX_PAYLOAD}")
    if kind == "status" and not payload:
        return {"state": "offline"}  # the retained status was cleared
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise MalformedPayload(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedPayload("not a JSON object")
    if kind == "status" and body.get("state") not in ("online", "offline"):
        raise MalformedPayload('"state" must be "online" or "offline"')
    return body


def record(tenant_id: str, device_id: str, kind: str, body: dict[str, Any], *,
           retained: bool, now: dt.datetime | None = None) -> None:
    """Apply one parsed status or state message to Redis (one round trip)."""
    now_ms = _ms(now or dt.datetime.now(dt.UTC))
    pipe = get_redis().pipeline(transaction=False)
    pipe.sadd(name(TENANTS_KEY), tenant_id)
    online = kind == "status" and body["state"] == "online"
    if online:
        pipe.sadd(_key(tenant_id, "online"), device_id)
    elif kind == "status":
        pipe.srem(_key(tenant_id, "online"), device_id)
    else:
        pipe.hset(_key(tenant_id, "state"), device_id, json.dumps(body, separators=(",", ":")))
    # A replayed retained message is old news, except "online": its device is connected now.
    if online or not retained:
        pipe.hset(_key(tenant_id, "last_seen"), device_id, now_ms)
    pipe.sadd(_key(tenant_id, "dirty"), device_id)
    pipe.execute()


def _count(outcome: str) -> None:
    get_redis().hincrby(name(STATS_KEY), outcome, 1)


def stats() -> dict[str, int]:
    """Messages ignored (not a registered device's topic) and malformed, since Redis began."""
    return {_text(k): int(v) for k, v in get_redis().hgetall(name(STATS_KEY)).items()}


def online_without_access(tenant_id: str, device_ids: list[str]) -> list[str]:
    """Those of ``device_ids`` that are online but may no longer use the broker."""
    if not device_ids:
        return []
    flags = get_redis().smismember(_key(tenant_id, "online"), device_ids)
    online = [d for d, flag in zip(device_ids, flags, strict=True) if flag]
    if not online:
        return []
    allowed = {str(i) for i in db.session.execute(
        select(Device.id).where(Device.tenant_id == uuid.UUID(tenant_id),
                                Device.id.in_([uuid.UUID(d) for d in online]),
                                has_broker_access())).scalars()}
    return [d for d in online if d not in allowed]


def _pubsub_failed(exc: BaseException, pubsub: Any, thread: Any) -> None:
    log.warning("presence tracker: registry channel failed (%s); resubscribing", exc)
    time.sleep(1.0)  # back off; the pub/sub connection resubscribes on its next read


# --- the tracker ---------------------------------------------------------------------------


def _split(topic: str) -> tuple[str, str, str] | None:
    """``(tenant_id, device_id, kind)`` of ``t/{tenant}/d/{device}/{status|state}``."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "t" or parts[2] != "d" or parts[4] not in KINDS:
        return None
    try:
        return str(uuid.UUID(parts[1])), str(uuid.UUID(parts[3])), parts[4]
    except ValueError:
        return None


class PresenceTracker:
    """Follows every device's status and state topics and records them in Redis.

    Client discipline after Home Assistant's MQTT client: an explicit client id, paho's
    VERSION2 callbacks, subscriptions renewed on every connect, a stop on an authentication
    refusal, and every handler wrapped so one bad message is logged (truncated) and skipped.
    """

    def __init__(self, app: Flask, target: MqttTarget, *, shared: bool = True,
                 client_id: str | None = None) -> None:
        self.app = app
        self.target = target
        self.topics = [f"t/+/d/+/{kind}" for kind in KINDS]
        if shared:
            self.topics = [f"$share/{SHARE_GROUP}/{topic}" for topic in self.topics]
        self.client_id = client_id or (
            f"ensoul-presence-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        self.client = new_client(self.client_id, target)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.subscribed = threading.Event()
        self.refused = threading.Event()
        self.counts: Counter[str] = Counter()
        self._known: dict[tuple[str, str], float] = {}  # -> expiry (inf for registered)
        self._pubsub: Any = None
        self._registry_thread: Any = None

    def start(self) -> None:
        """Connect in the background; paho reconnects on its own after a loss."""
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()
        # Not via a pushed app context: popping one ends the caller's database session.
        redis_ext = self.app.extensions["ensoul_redis"]
        self._pubsub = redis_ext.client.pubsub(ignore_subscribe_messages=True)
        channel = f"{redis_ext.prefix}:{REGISTRY_CHANNEL}"
        self._pubsub.subscribe(**{channel: self._on_registry_change})
        self._registry_thread = self._pubsub.run_in_thread(
            sleep_time=1.0, daemon=True, exception_handler=_pubsub_failed)

    def stop(self) -> None:
        if self._registry_thread is not None:
            self._registry_thread.stop()
            self._registry_thread.join(5)
            self._pubsub.close()
        self.client.disconnect()
        self.client.loop_stop()

    # paho callbacks (the network thread)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            log.error("presence tracker: %s refused the login: %s", self.target.safe_url, reason)
            self.refused.set()
            client.disconnect()  # stop: retrying a refused login only hammers the broker
            return
        self.subscribed.clear()
        client.subscribe([(topic, 1) for topic in self.topics])
        log.info("presence tracker connected to %s", self.target.safe_url)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Any) -> None:
        refused = [r for r in reasons if r.is_failure]
        if refused:
            log.error("presence tracker: subscription refused: %s", refused)
        else:
            self.subscribed.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Any) -> None:
        self.subscribed.clear()
        if reason.is_failure:
            log.warning("presence tracker disconnected: %s", reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            with self.app.app_context():
                outcome = self.handle(message.topic, bytes(message.payload),
                                      retained=message.retain)
        except Exception:
            outcome = "failed"
            log.exception("presence tracker: cannot handle %s %r", message.topic,
                          message.payload[:200])
        self.counts[outcome] += 1

    def _on_registry_change(self, message: dict[str, Any]) -> None:
        """Say offline, retained, for online devices that just lost broker access.

        Mosquitto disconnects them on its next reload without publishing their will, which
        would leave their retained "online" (and the online set) behind for good.
        """
        try:
            change = json.loads(message["data"])
            with self.app.app_context():
                lost = online_without_access(change["tenant_id"], change["device_ids"])
            for device_id in lost:
                self.client.publish(f"t/{change['tenant_id']}/d/{device_id}/status", OFFLINE,
                                    qos=1, retain=True)
        except Exception:
            log.exception("presence tracker: cannot apply registry change %r",
                          message.get("data", b"")[:200])

    # the work (app context)

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> str:
        """Record one message; return what happened: recorded, ignored or malformed."""
        parts = _split(topic)
        if parts is None or not self._registered(parts[0], parts[1]):
            _count("ignored")
            return "ignored"
        tenant_id, device_id, kind = parts
        try:
            body = _parse(kind, payload)
        except MalformedPayload as exc:
            log.warning("presence: malformed %s from %s (%s): %r", kind, device_id, exc,
                        payload[:200])
            _count("malformed")
            return "malformed"
        record(tenant_id, device_id, kind, body, retained=retained)
        return "recorded"

    def _registered(self, tenant_id: str, device_id: str) -> bool:
        key = (tenant_id, device_id)
        expiry = self._known.get(key)
        now = time.monotonic()
        if expiry is not None and expiry > now:
            return expiry == float("inf")
        found = db.session.execute(
            select(Device.id).where(Device.id == uuid.UUID(device_id),
                                    Device.tenant_id == uuid.UUID(tenant_id))
        ).first() is not None
        if len(self._known) > 1_000_000:
            self._known.clear()
        self._known[key] = float("inf") if found else now + UNKNOWN_DEVICE_TTL
        return found


# --- flushing to the database --------------------------------------------------------------


def _version(state: dict[str, Any], field: str) -> str | None:
    value = state.get(field)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        text = str(value).strip()
        return text[:VERSION_MAX] if text else None
    return None


_table = cast(Table, Device.__table__)
_seen = bindparam("b_seen", type_=UTCDateTime())
_FLUSH = (
    update(_table)
    .where(_table.c.id == bindparam("b_id"), _table.c.tenant_id == bindparam("b_tenant"))
    .values(
        last_seen_at=case(
            (_table.c.last_seen_at.is_(None) | (_table.c.last_seen_at < _seen), _seen),
            else_=_table.c.last_seen_at),
        firmware_version=func.coalesce(bindparam("b_firmware"), _table.c.firmware_version),
        config_version=func.coalesce(bindparam("b_config"), _table.c.config_version),
    )
)


def flush_to_database() -> dict[str, int]:
    """Copy what changed since the last flush to ``devices`` (bulk, by tenant); commit is the
    caller's. Devices whose rows are written are forgotten in Redis only after the commit."""
    redis = get_redis()
    flushed = 0
    for raw_tenant in redis.smembers(name(TENANTS_KEY)):
        tenant_id = _text(raw_tenant)
        dirty, flushing = _key(tenant_id, "dirty"), _key(tenant_id, "flushing")
        # Leftovers of a flush that died before its commit are taken again.
        pipe = redis.pipeline(transaction=True)
        pipe.sunionstore(flushing, [flushing, dirty])
        pipe.delete(dirty)
        pipe.smembers(flushing)
        members = sorted(_text(m) for m in pipe.execute()[2])
        for start in range(0, len(members), FLUSH_BATCH):
            flushed += _flush_batch(tenant_id, members[start:start + FLUSH_BATCH])
        if members:
            on_commit(lambda key=flushing: redis.delete(key))
    return {"devices": flushed}


def _flush_batch(tenant_id: str, device_ids: list[str]) -> int:
    redis = get_redis()
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(_key(tenant_id, "last_seen"), device_ids)
    pipe.hmget(_key(tenant_id, "state"), device_ids)
    seen_values, states = pipe.execute()
    rows = []
    for device_id, seen_ms, raw_state in zip(device_ids, seen_values, states, strict=True):
        state = _loads(raw_state)
        rows.append({
            "b_id": uuid.UUID(device_id), "b_tenant": uuid.UUID(tenant_id),
            "b_seen": (dt.datetime.fromtimestamp(int(seen_ms) / 1000, dt.UTC)
                       if seen_ms else None),
            "b_firmware": _version(state, "firmware_version"),
            "b_config": _version(state, "config_version"),
        })
    if rows:
        db.session.execute(_FLUSH, rows)
    return len(rows)


def _loads(raw: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
