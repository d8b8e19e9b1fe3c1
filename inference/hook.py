"""The billing hook: the one seam between inference and billing.

The broker hands every request to a :class:`BillingHook` and imports no billing module.
``admit`` answers in one Redis round trip (one Lua script): request-id de-duplication,
per-device rate and concurrency limits, the daily cap, the in-flight record the sweeper
settles from, and a budget in metered units. ``extend`` asks for more when a stream used its
budget. ``settle`` is the only place a usage event is emitted: its script deletes the
in-flight record and appends the event in one step, so a request is settled exactly once,
by its broker or, if that died, by the sweeper.

:class:`LimitsHook` is this issue's implementation: limits enforced, unlimited budget, events
with zero credits. Billing replaces it with credits.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from inference.directory import DeviceProfile
from inference.protocol import ProtocolError
from inference.units import Units
from inference.usage import UsageEvent, encode

DEDUP_WINDOW_SECONDS = 24 * 3600


@dataclass(slots=True)
class Admission:
    device: DeviceProfile
    request_id: str
    stream_id: str
    kind: str  # text | vision | voice
    admitted_at_ms: int
    owner: str  # the broker process holding the stream
    budget: Units | None  # None: unlimited
    state: dict[str, Any] = field(default_factory=dict)  # the hook's own data


class Refused(ProtocolError):
    """An admission or extension refused with a device-facing code.

    ``repeated``: not the first refusal of its kind in the window; the broker drops it silently
    (a device flooding past its rate limit gets one error, not one per message)."""

    repeated = False


class BillingHook(Protocol):
    async def admit(self, device: DeviceProfile, request_id: str, kind: str, estimate: Units,
                    *, stream_id: str, owner: str) -> Admission: ...

    async def extend(self, admission: Admission, used: Units) -> Units | None: ...

    async def checkpoint(self, entries: list[tuple[Admission, Units]]) -> None: ...

    async def settle(self, admission: Admission | None, event: UsageEvent) -> bool:
        """``admission`` is ``None`` when the sweeper settles a dead broker's stream."""


def keys(prefix: str, tenant_id: str) -> dict[str, str]:
    """Every per-tenant key carries the tenant's hash tag, so one tenant stays in one slot."""
    tag = f"{prefix}:inference:{{t:{tenant_id}}}"
    return {
        "inflight": f"{tag}:inflight",  # hash: stream id -> in-flight record (JSON)
        "streams": f"{tag}:streams",  # hash: device id -> open stream count
        "seen": f"{tag}:seen",  # prefix: seen:{device}:{request id} -> stream id
        "rate": f"{tag}:rate",  # prefix: rate:{device}:{minute}
        "day": f"{tag}:day",  # prefix: day:{device}:{yyyymmdd}
        "usage": f"{prefix}:usage:{{t:{tenant_id}}}",  # the tenant's usage stream
    }


# KEYS: inflight, streams, seen, rate, day
# ARGV: device, request id, stream id, record JSON, dedup ttl, minute, rpm, concurrency,
#       day, daily cap (0 = none), seconds left in the minute
ADMIT = """
local seen = KEYS[3] .. ':' .. ARGV[1] .. ':' .. ARGV[2]
if redis.call('EXISTS', seen) == 1 then return {'duplicate_request', 0, 0} end
local rate = KEYS[4] .. ':' .. ARGV[1] .. ':' .. ARGV[6]
local count = tonumber(redis.call('GET', rate) or '0')
if count >= tonumber(ARGV[7]) then
  local refused = redis.call('INCR', rate .. ':refused')
  redis.call('EXPIRE', rate .. ':refused', 61)
  return {'rate_limited', refused, tonumber(ARGV[11])}
end
local open = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if open >= tonumber(ARGV[8]) then return {'concurrency_limited', 0, 1} end
local day = KEYS[5] .. ':' .. ARGV[1] .. ':' .. ARGV[9]
local cap = tonumber(ARGV[10])
if cap > 0 and tonumber(redis.call('GET', day) or '0') >= cap then
  return {'daily_cap_reached', 0, 0}
end
redis.call('SET', seen, ARGV[3], 'EX', ARGV[5])
redis.call('INCR', rate)
redis.call('EXPIRE', rate, 61)
redis.call('INCR', day)
redis.call('EXPIRE', day, 172800)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return {'ok', 0, 0}
"""

# A settle re-sent by the client after its answer was lost (redis-py runs a pipeline again
# after a connection error) finds its stream gone: a marker naming who settled it, kept a few
# minutes, tells that settler it was its own settle and not a sweeper's.
SETTLED_TTL_SECONDS = 300

# KEYS: inflight, streams, usage stream; ARGV: stream id, device, event JSON, settler
SETTLE = """
local done = KEYS[1] .. ':settled:' .. ARGV[1]
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  if redis.call('GET', done) == ARGV[4] then return 1 end
  return 0
end
redis.call('SET', done, ARGV[4], 'EX', """ + str(SETTLED_TTL_SECONDS) + """)
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
redis.call('XADD', KEYS[3], '*', 'e', ARGV[3])
return 1
"""

# KEYS: inflight; ARGV: stream id, record JSON (only while the stream is still in flight)
CHECKPOINT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 0
"""

USAGE_STREAMS_SET = "usage:streams"
INFLIGHT_TENANTS = "inference:inflight-tenants"


def local_day(timezone: str, now: float) -> str:
    return dt.datetime.fromtimestamp(now, tenant_zone(timezone)).strftime("%Y%m%d")


@functools.lru_cache(maxsize=1024)
def tenant_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


def in_flight_record(admission: Admission, used: Units, *, now_ms: int) -> str:
    """What the sweeper needs to settle a stream whose broker died."""
    return orjson.dumps({
        "tenant_id": admission.device.tenant_id, "device_id": admission.device.device_id,
        "product_id": admission.device.product_id, "request_id": admission.request_id,
        "stream_id": admission.stream_id, "kind": admission.kind,
        "admitted_at_ms": admission.admitted_at_ms, "owner": admission.owner,
        "provider": admission.state.get("provider", ""), "model": admission.state.get("model", ""),
        "conversation_id": admission.state.get("conversation_id"),
        "units": used.as_dict(), "checkpoint_ms": now_ms,
    }).decode()


class LimitsHook:
    """Limits, daily cap and de-duplication enforced; unlimited budget; zero credits."""

    def __init__(self, redis: Redis, prefix: str, *,
                 dedup_window: int = DEDUP_WINDOW_SECONDS) -> None:
        self.redis = redis
        self.prefix = prefix
        self.dedup_window = dedup_window
        self.scripts = Scripts(redis, admit=ADMIT, settle=SETTLE, checkpoint=CHECKPOINT)
        self._tenants_seen: set[str] = set()

    async def admit(self, device: DeviceProfile, request_id: str, kind: str, estimate: Units,
                    *, stream_id: str, owner: str) -> Admission:
        now = time.time()
        now_ms = int(now * 1000)
        admission = Admission(device, request_id, stream_id, kind, now_ms, owner, None)
        k = keys(self.prefix, device.tenant_id)
        minute = int(now // 60)
        if device.tenant_id not in self._tenants_seen:  # for the sweeper; once per process
            await self.redis.sadd(f"{self.prefix}:{INFLIGHT_TENANTS}", device.tenant_id)
            self._tenants_seen.add(device.tenant_id)
        code, refused_count, retry_after = await self.scripts.call(
            self.redis, "admit", [k["inflight"], k["streams"], k["seen"], k["rate"], k["day"]],
            [device.device_id, request_id, stream_id,
                  in_flight_record(admission, Units(), now_ms=now_ms), self.dedup_window,
                  minute, device.requests_per_minute, device.concurrent_streams,
                  local_day(device.timezone, now), device.daily_request_cap or 0,
             max(1, int(60 - now % 60))])
        code = code.decode() if isinstance(code, bytes) else code
        if code != "ok":
            refusal = Refused(code, request_id=request_id,
                              retry_after=float(retry_after) if retry_after else None)
            refusal.repeated = int(refused_count) > 1
            raise refusal
        return admission

    async def extend(self, admission: Admission, used: Units) -> Units | None:
        return None  # unlimited

    async def checkpoint(self, entries: list[tuple[Admission, Units]]) -> None:
        await checkpoint_records(self.redis, self.scripts, self.prefix, entries)

    async def settle(self, admission: Admission | None, event: UsageEvent) -> bool:
        return await settle_event(self.redis, self.scripts, self.prefix, event)


async def checkpoint_records(redis: Redis, scripts: Scripts, prefix: str,
                             entries: list[tuple[Admission, Units]]) -> None:
    """Refresh the in-flight records of streams still open, in one pipeline (the sweeper
    settles a dead broker's stream from them)."""
    if not entries:
        return
    now_ms = int(time.time() * 1000)

    async def run(pipe: Any) -> None:
        for admission, used in entries:
            k = keys(prefix, admission.device.tenant_id)
            pipe.evalsha(scripts.sha["checkpoint"], 1, k["inflight"], admission.stream_id,
                         in_flight_record(admission, used, now_ms=now_ms))
        await pipe.execute()

    await scripts.pipelined(redis, run)


async def settle_event(redis: Redis, scripts: Scripts, prefix: str, event: UsageEvent) -> bool:
    """Delete the in-flight record and append the usage event, unless already settled."""
    k = keys(prefix, event.tenant_id)
    result: list[Any] = []

    async def run(pipe: Any) -> None:
        pipe.evalsha(scripts.sha["settle"], 3, k["inflight"], k["streams"], k["usage"],
                     event.stream_id, event.device_id, encode(event), event.broker)
        pipe.sadd(f"{prefix}:{USAGE_STREAMS_SET}", k["usage"])
        result[:] = await pipe.execute()

    await scripts.pipelined(redis, run)
    return bool(result[0])


class Scripts:
    """Lua scripts called by SHA, reloaded once if Redis forgot them (a restart, a flush).

    redis-py's Script objects check SCRIPT EXISTS before every pipeline: a second round trip
    on the hot path. Here the SHA is computed locally and a NOSCRIPT answer reloads them.
    """

    def __init__(self, redis: Redis, **sources: str) -> None:
        self.sources = sources
        self.sha = {name: hashlib.sha1(body.encode()).hexdigest()  # noqa: S324 - Redis' id
                    for name, body in sources.items()}

    async def load(self, redis: Redis) -> None:
        for body in self.sources.values():
            await redis.script_load(body)

    async def call(self, redis: Redis, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha[name], len(keys), *keys, *args)

    async def pipelined(self, redis: Redis, run: Callable[[Any], Awaitable[None]]) -> None:
        for attempt in (1, 2):
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    await run(pipe)
                return
            except NoScriptError:
                if attempt == 2:
                    raise
                await self.load(redis)


def limits_only(app: Any, redis: Redis) -> LimitsHook:
    """``ENSOUL_BILLING_HOOK = "inference.hook:limits_only"``: the broker without billing."""
    return LimitsHook(redis, app.config["ENSOUL_REDIS_PREFIX"],
                      dedup_window=int(app.config["ENSOUL_INFERENCE_DEDUP_HOURS"]) * 3600)
