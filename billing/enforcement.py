"""The credit hook: licences and credits enforced inside the stream.

It implements the inference broker's :class:`~inference.hook.BillingHook` and replaces its
limits-only default (``ENSOUL_BILLING_HOOK``, ``config/settings.py``). Everything it needs is in
the device's profile (``DeviceProfile.licence``, projected by :mod:`billing.profiles`) and in
Redis (:mod:`billing.scripts`); it never reads Postgres.

- ``admit`` refuses a device without a live licence (``license_required``, or
  ``license_expired`` once its grace has ended, or a plan without the request's modality), then
  runs one script: de-duplication, limits, the daily cap, and a reservation of the input's
  price plus one *chunk* of output (``ENSOUL_BILLING_CHUNK_*``) along the burn order. The
  stream's budget is what the reservation buys, in metered units.
- ``extend`` reserves the next chunk when the stream used its budget; with nothing left it
  refuses, and the broker cuts the stream (``end`` ``finish: "quota_exhausted"``).
- ``settle`` prices the final units in the script that deletes the in-flight record, commits
  along the reservation, gives the rest back and appends the priced event to the usage stream.
  A stream whose broker died is settled by the sweeper the same way.

The overdraft is bounded: a stream is cut as soon as it used more than it reserved, and a
reservation is one chunk ahead, so a stream overshoots by at most one chunk's credits (its
last, partly used block is priced whole).
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Flask
from redis.asyncio import Redis

from billing import scripts
from billing.pricing import block_price
from inference.directory import DeviceProfile
from inference.hook import (
    ADMIT as LIMITS_ADMIT,
)
from inference.hook import (
    CHECKPOINT,
    DEDUP_WINDOW_SECONDS,
    INFLIGHT_TENANTS,
    USAGE_STREAMS_SET,
    Admission,
    Refused,
    Scripts,
    checkpoint_records,
    in_flight_record,
    keys,
    tenant_zone,
)
from inference.units import UNIT_NAMES, Units
from inference.usage import UsageEvent, encode

UNLIMITED = 2**31 - 1  # a metric the rate card does not charge


def billing_keys(prefix: str, tenant_id: str) -> dict[str, str]:
    tag = f"{prefix}:billing:{{t:{tenant_id}}}"
    return {"acct": f"{tag}:acct", "pkgs": f"{tag}:pkgs", "resv": f"{tag}:resv",
            "grants": f"{tag}:grants"}


Rates = Mapping[str, tuple[int, int]]  # metric -> (block units, credits per block)


def price(rates: Rates, units: Units) -> int:
    return sum(block_price(getattr(units, metric), block, credits)
               for metric, (block, credits) in rates.items())


def budget_for(rates: Rates, reserved: int, used: Units) -> Units:
    """The units a stream may reach with ``reserved`` credits, one metric at a time: what is
    left of the current block plus the whole blocks the slack still pays for."""
    slack = max(0, reserved - price(rates, used))
    budget = dict.fromkeys(UNIT_NAMES, UNLIMITED)
    for metric, (block, credits) in rates.items():
        if credits:
            budget[metric] = (-(-getattr(used, metric) // block) + slack // credits) * block
    return Units(**budget)


def licence_refusal(licence: Mapping[str, Any], kind: str, now: float,
                    request_id: str) -> Refused | None:
    state = licence.get("state")
    if state == "expired" or (state == "licensed" and now >= licence["grace_ends"]):
        return Refused("license_expired", request_id=request_id)
    if state != "licensed" or now < licence["starts"]:
        return Refused("license_required", request_id=request_id)
    if kind not in licence.get("modalities", ()):  # text, vision, voice: the plan's names
        return Refused("license_required", f"the device's plan does not include {kind}",
                       request_id=request_id)
    return None


def rates_at(licence: Mapping[str, Any], now: float) -> tuple[str, dict[str, tuple[int, int]]]:
    card = licence.get("next_rates")
    if not card or now < card["from"]:
        card = licence.get("rates") or {"version": None, "rates": {}}
    return card["version"], {m: (int(r[0]), int(r[1])) for m, r in card["rates"].items()}


def allowance_grant(licence: Mapping[str, Any], month: str) -> int:
    if month == licence.get("first_month"):
        return int(licence.get("first_month_allowance", 0))
    return int(licence.get("allowance", 0))


TERMS_CACHE_SIZE = 50_000


@dataclass(frozen=True, slots=True)
class Terms:
    rates: dict[str, tuple[int, int]]
    allowance: str
    grant: int
    overage: str
    overage_limit: int
    header: str
    licence: Mapping[str, Any]  # kept alive: the cache key holds its id


@functools.lru_cache(maxsize=4096)
def local_calendar(timezone: str, minute: int) -> tuple[str, str]:
    """The tenant's month (``YYYY-MM``) and day (``YYYYMMDD``) during this UTC minute (every
    zone's offset is a whole number of minutes)."""
    local = dt.datetime.fromtimestamp(minute * 60, tenant_zone(timezone))
    return local.strftime("%Y-%m"), local.strftime("%Y%m%d")


class CreditHook:
    def __init__(self, redis: Redis, prefix: str, *, chunk: Units,
                 dedup_window: int = DEDUP_WINDOW_SECONDS) -> None:
        self.redis = redis
        self.prefix = prefix
        self.chunk = chunk
        self.dedup_window = dedup_window
        # The sweeper settles with scripts.sha["settle"] and the limits' key layout.
        self.scripts = Scripts(redis, admit=scripts.ADMIT, extend=scripts.EXTEND,
                               settle=scripts.SETTLE, checkpoint=CHECKPOINT,
                               limits_admit=LIMITS_ADMIT)
        self._tenants_seen: set[str] = set()
        self._terms_cache: dict[tuple[str, str, int, bool], Terms] = {}
        self._output_chunk = Units(output_tokens=chunk.output_tokens)
        self._voice_chunk = Units(output_tokens=chunk.output_tokens,
                                  audio_in_ms=chunk.audio_in_ms, audio_out_ms=chunk.audio_out_ms)

    def chunk_for(self, kind: str) -> Units:
        return self._voice_chunk if kind == "voice" else self._output_chunk

    async def admit(self, device: DeviceProfile, request_id: str, kind: str, estimate: Units,
                    *, stream_id: str, owner: str) -> Admission:
        now = time.time()
        licence = device.licence
        refusal = licence_refusal(licence, kind, now, request_id)
        if refusal is not None:
            raise refusal
        now_ms = int(now * 1000)
        minute = int(now // 60)
        month, day = local_calendar(device.timezone, minute)
        terms = self._terms(device, month, now)
        rates = terms.rates
        wanted = price(rates, estimate + self.chunk_for(kind))
        at_least = price(rates, estimate)
        at_least = at_least + 1 if wanted > at_least else wanted
        admission = Admission(device, request_id, stream_id, kind, now_ms, owner, None)
        k = keys(self.prefix, device.tenant_id)
        b = billing_keys(self.prefix, device.tenant_id)
        if device.tenant_id not in self._tenants_seen:  # for the sweeper; once per process
            await self.redis.sadd(f"{self.prefix}:{INFLIGHT_TENANTS}", device.tenant_id)
            self._tenants_seen.add(device.tenant_id)
        code, refused_count, retry_after, taken = await self.scripts.call(
            self.redis, "admit",
            [k["inflight"], k["streams"], k["seen"], k["rate"], k["day"], b["acct"], b["pkgs"],
             b["resv"], b["grants"]],
            [device.device_id, request_id, stream_id,
             in_flight_record(admission, Units(), now_ms=now_ms), self.dedup_window,
             minute, device.requests_per_minute, device.concurrent_streams,
             day, device.daily_request_cap or 0,
             max(1, int(60 - now % 60)), wanted, at_least, terms.allowance, terms.grant,
             int(now), terms.overage, terms.overage_limit, terms.header])
        code = code.decode() if isinstance(code, bytes) else code
        if code != "ok":
            refused = Refused(code, request_id=request_id,
                              retry_after=float(retry_after) if retry_after else None)
            refused.repeated = int(refused_count) > 1
            raise refused
        admission.state.update(rates=rates, reserved=int(taken))
        if wanted > 0:
            admission.budget = budget_for(rates, int(taken), estimate)
        return admission

    def _terms(self, device: DeviceProfile, month: str, now: float) -> Terms:
        """What a device's admissions this month share, built once: the rate card, the burn
        order's accounts and the reservation header the scripts keep."""
        licence = device.licence
        card = licence.get("next_rates")
        current = card is not None and now >= card["from"]
        key = (device.device_id, month, id(licence), current)
        terms = self._terms_cache.get(key)
        if terms is None:
            if len(self._terms_cache) > TERMS_CACHE_SIZE:
                self._terms_cache.clear()
            version, rates = rates_at(licence, now)
            allowance = f"allowance:{device.device_id}:{month}"
            grant = allowance_grant(licence, month)
            overage, limit = f"overage:{month}", int(licence.get("overage_limit", -1))
            header = orjson.dumps({"r": {m: list(r) for m, r in rates.items()}, "v": version,
                                   "o": [allowance, grant, overage, limit]}).decode()
            terms = self._terms_cache[key] = Terms(rates, allowance, grant, overage, limit,
                                                    header, licence)
        return terms

    async def extend(self, admission: Admission, used: Units) -> Units | None:
        rates = admission.state["rates"]
        reserved = admission.state["reserved"]
        wanted = price(rates, used + self.chunk_for(admission.kind)) - reserved
        if wanted <= 0:
            return budget_for(rates, reserved, used)
        b = billing_keys(self.prefix, admission.device.tenant_id)
        taken = int(await self.scripts.call(
            self.redis, "extend", [b["acct"], b["pkgs"], b["resv"], b["grants"]],
            [admission.stream_id, wanted, int(time.time())]))
        if taken > 0:
            admission.state["reserved"] = reserved = reserved + taken
        if price(rates, used) > reserved:
            raise Refused("quota_exhausted", request_id=admission.request_id)
        return budget_for(rates, reserved, used)

    async def checkpoint(self, entries: list[tuple[Admission, Units]]) -> None:
        await checkpoint_records(self.redis, self.scripts, self.prefix, entries)

    async def settle(self, admission: Admission | None, event: UsageEvent) -> bool:
        k = keys(self.prefix, event.tenant_id)
        b = billing_keys(self.prefix, event.tenant_id)
        result: list[Any] = []

        async def run(pipe: Any) -> None:
            units = event.units
            pipe.evalsha(self.scripts.sha["settle"], 7, k["inflight"], k["streams"], k["usage"],
                         b["acct"], b["pkgs"], b["resv"], b["grants"],
                         event.stream_id, event.device_id, encode(event), int(time.time()),
                         units.input_tokens, units.output_tokens, units.audio_in_ms,
                         units.audio_out_ms, units.images, units.tool_calls, event.broker)
            pipe.sadd(f"{self.prefix}:{USAGE_STREAMS_SET}", k["usage"])
            result[:] = await pipe.execute()

        await self.scripts.pipelined(self.redis, run)
        settled = result[0]
        if not settled[0]:
            return False
        event.credits = int(settled[1])
        if len(settled) > 2:
            event.credit_split = {k: int(v) for k, v in orjson.loads(settled[2]).items()}
        return True


def default_chunk(config: Mapping[str, Any]) -> Units:
    return Units(output_tokens=int(config["ENSOUL_BILLING_CHUNK_OUTPUT_TOKENS"]),
                 audio_in_ms=int(config["ENSOUL_BILLING_CHUNK_AUDIO_MS"]),
                 audio_out_ms=int(config["ENSOUL_BILLING_CHUNK_AUDIO_MS"]))


def make_hook(app: Flask, redis: Redis) -> CreditHook:
    """``ENSOUL_BILLING_HOOK = "billing.enforcement:make_hook"`` (the default)."""
    return CreditHook(redis, app.config["ENSOUL_REDIS_PREFIX"], chunk=default_chunk(app.config),
                      dedup_window=int(app.config["ENSOUL_INFERENCE_DEDUP_HOURS"]) * 3600)
