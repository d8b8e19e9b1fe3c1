"""Who a device is, for admission: a profile per device in Redis, cached in each broker.

The hot path never reads Postgres. :func:`project_devices` writes each device's profile
(status, tenant, product, limits, time zone, provider choice) to Redis right after the
registry commits, before the registry's pub/sub message goes out; the broker keeps an
in-process copy, drops an entry when the registry channel names its device, drops all of
them on every Redis reconnect (pub/sub loses messages while disconnected) and never keeps one
longer than ``max_age`` seconds. A profile missing from Redis (lost data, a new broker racing a
commit) is recorded for the ``project_missing_profiles`` job, and the device is told to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

from flask import current_app
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import db
from core.redis import get_redis, name

log = logging.getLogger(__name__)

MISSES_KEY = "inference:profile-misses"
PROJECTION_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    tenant_id: str
    device_id: str
    product_id: str | None
    status: str  # the device's status; only `active` devices are served
    tenant_status: str
    timezone: str
    requests_per_minute: int
    concurrent_streams: int
    daily_request_cap: int | None
    provider: dict[str, Any] = field(default_factory=dict)  # provider settings (no secrets)
    memory: dict[str, Any] = field(default_factory=dict)  # conversation memory settings
    licence: dict[str, Any] = field(default_factory=dict)  # billing's part, opaque here

    @classmethod
    def from_json(cls, text: str | bytes) -> DeviceProfile:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def profile_key(prefix: str, tenant_id: str, device_id: str) -> str:
    return f"{prefix}:inference:{{t:{tenant_id}}}:profile:{device_id}"


class DeviceDirectory:
    """The broker's cache of device profiles."""

    def __init__(self, redis: Redis, prefix: str, *, max_age: float = 60.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.max_age = max_age
        self._cache: dict[str, tuple[float, DeviceProfile]] = {}
        self.hits = self.misses = 0

    async def get(self, tenant_id: str, device_id: str) -> DeviceProfile | None:
        cached = self._cache.get(device_id)
        now = time.monotonic()
        if cached is not None and cached[0] > now and cached[1].tenant_id == tenant_id:
            self.hits += 1
            return cached[1]
        self.misses += 1
        raw = await self.redis.get(profile_key(self.prefix, tenant_id, device_id))
        if raw is None:
            await self.redis.sadd(f"{self.prefix}:{MISSES_KEY}", f"{tenant_id}:{device_id}")
            return None
        profile = DeviceProfile.from_json(raw)
        self._cache[device_id] = (now + self.max_age, profile)
        return profile

    def invalidate(self, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            self._cache.pop(device_id, None)

    def clear(self) -> None:
        self._cache.clear()

    async def follow_registry(self, channel: str, closing: asyncio.Event,
                              connected: asyncio.Event | None = None) -> None:
        """Drop entries the registry names; drop everything whenever the subscription broke."""
        while not closing.is_set():
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    self.clear()  # whatever changed while we were not listening
                    if connected is not None:
                        connected.set()
                    while not closing.is_set():
                        message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=0.5)
                        if message is None or message["type"] != "message":
                            continue
                        try:
                            self.invalidate(json.loads(message["data"])["device_ids"])
                        except (ValueError, KeyError, TypeError):
                            log.warning("ignored a malformed registry message")
                            self.clear()
            except Exception as exc:
                self.clear()
                if connected is not None:
                    connected.clear()
                log.warning("registry subscription lost (%s); cache dropped", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closing.wait(), 0.5)


# --- projection (runs in web/worker processes, never in the broker) -------------------------


def _limits(config: Any, product: Any) -> tuple[int, int, int | None]:
    """Platform defaults, tightened (never loosened) by the product's own limits."""
    rpm = int(config["ENSOUL_INFERENCE_REQUESTS_PER_MINUTE"])
    streams = int(config["ENSOUL_INFERENCE_CONCURRENT_STREAMS"])
    cap = config.get("ENSOUL_INFERENCE_DAILY_REQUEST_CAP") or None
    if product is not None:
        own_rpm = getattr(product, "requests_per_minute", None)
        own_streams = getattr(product, "concurrent_streams", None)
        own_cap = getattr(product, "daily_request_cap", None)
        if own_rpm:
            rpm = min(rpm, own_rpm)
        if own_streams:
            streams = min(streams, own_streams)
        if own_cap:
            cap = min(cap, own_cap) if cap else own_cap
    return rpm, streams, cap


ProfilePart = Callable[[Session, uuid.UUID, list[uuid.UUID], str], dict[str, dict[str, Any]]]
_profile_parts: list[ProfilePart] = []


def register_licence_part(part: ProfilePart) -> ProfilePart:
    """Billing's part of every profile: ``part(session, tenant_id, device_ids, timezone)``
    answers device id -> the ``licence`` dict (its ``limits`` may tighten the device's)."""
    if part not in _profile_parts:
        _profile_parts.append(part)
    return part


def _tighten(profile: DeviceProfile, licence: dict[str, Any]) -> DeviceProfile:
    limits = licence.get("limits") or {}
    rpm = min(profile.requests_per_minute, limits.get("requests_per_minute") or 2**31)
    streams = min(profile.concurrent_streams, limits.get("concurrent_streams") or 2**31)
    caps = [c for c in (profile.daily_request_cap, limits.get("daily_request_cap")) if c]
    return replace(profile, requests_per_minute=rpm, concurrent_streams=streams,
                   daily_request_cap=min(caps) if caps else None, licence=licence)


def build_profiles(session: Session, tenant_id: uuid.UUID,
                   device_ids: Iterable[uuid.UUID] | None) -> list[DeviceProfile]:
    from accounts.models import Tenant
    from fleet.models import Device, Product
    from inference.settings import provider_profile, tenant_memory_settings

    config = current_app.config
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        return []
    query = select(Device, Product).join(Product, Product.id == Device.product_id).where(
        Device.tenant_id == tenant_id)
    if device_ids is not None:
        query = query.where(Device.id.in_(list(device_ids)))
    memory = tenant_memory_settings(session, tenant_id)
    providers: dict[uuid.UUID, dict[str, Any]] = {}  # one lookup per product, not per device
    profiles = []
    for device, product in session.execute(query):
        rpm, streams, cap = _limits(config, product)
        if product.id not in providers:
            providers[product.id] = provider_profile(session, tenant_id, product.id)
        profiles.append(DeviceProfile(
            tenant_id=str(tenant_id), device_id=str(device.id), product_id=str(product.id),
            status=str(device.status), tenant_status=str(tenant.status),
            timezone=tenant.timezone, requests_per_minute=rpm, concurrent_streams=streams,
            daily_request_cap=cap, provider=providers[product.id], memory=memory))
    for part in _profile_parts:
        licences = part(session, tenant_id, [uuid.UUID(p.device_id) for p in profiles],
                        tenant.timezone)
        profiles = [_tighten(p, licences.get(p.device_id) or {}) for p in profiles]
    return profiles


def project_devices(tenant_id: uuid.UUID, device_ids: Iterable[uuid.UUID] | None = None) -> int:
    """Write these devices' profiles (all of the tenant's when ``None``) to Redis."""
    ids = None if device_ids is None else [uuid.UUID(str(d)) for d in device_ids]
    prefix = current_app.config["ENSOUL_REDIS_PREFIX"]
    # Its own session: this runs from an after-commit hook, where db.session cannot query.
    with Session(bind=db.session.get_bind()) as session:
        if ids is None:
            profiles = build_profiles(session, tenant_id, None)
        else:  # in chunks: a product of 100,000 devices is past Postgres' parameter limit
            profiles = [profile for start in range(0, len(ids), PROJECTION_CHUNK)
                        for profile in build_profiles(session, tenant_id,
                                                      ids[start:start + PROJECTION_CHUNK])]
    pipe = get_redis().pipeline(transaction=False)
    found = set()
    for profile in profiles:
        found.add(profile.device_id)
        pipe.set(profile_key(prefix, profile.tenant_id, profile.device_id), profile.to_json())
    for missing in {str(i) for i in ids or []} - found:  # deleted devices
        pipe.delete(profile_key(prefix, str(tenant_id), missing))
    pipe.execute()
    return len(profiles)


def project_missing_profiles() -> int:
    """Project the devices a broker asked for and did not find (the periodic job)."""
    client = get_redis()
    wanted: dict[str, set[str]] = {}
    items = cast(list[Any], client.spop(name(MISSES_KEY), 1000) or [])
    for item in items:
        tenant_id, _, device_id = (item.decode() if isinstance(item, bytes) else item).partition(
            ":")
        wanted.setdefault(tenant_id, set()).add(device_id)
    count = 0
    for tenant_id, ids in wanted.items():
        try:
            count += project_devices(uuid.UUID(tenant_id), [uuid.UUID(i) for i in ids])
        except ValueError:
            log.warning("ignored a malformed profile miss %s", tenant_id)
    return count


def project_all() -> int:
    """Rebuild every device profile (after Redis lost its data; the CLI and a slow job)."""
    from accounts.models import Tenant

    count = 0
    for tenant_id in db.session.scalars(select(Tenant.id)):
        count += project_devices(tenant_id)
    return count
