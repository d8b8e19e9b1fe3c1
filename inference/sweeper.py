"""Settle the streams of brokers that died, from their last checkpoint, exactly once.

Every broker process runs one. A stream is orphaned when its owner's heartbeat key has
expired and its checkpoint is older than ``grace``. Its usage event is built from the
checkpointed units and goes through the same settle script as a broker's, which deletes the
in-flight record and appends the event together, so a stream is settled once however many
sweepers (and a broker coming back) race for it. The device gets a terminal ``error``. A
broker also settles its own records that none of its streams holds (an admission whose reply
was lost), which would otherwise hold a concurrency slot for good.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import TYPE_CHECKING

from inference import metrics, protocol
from inference.hook import INFLIGHT_TENANTS, Scripts, keys
from inference.units import Units
from inference.usage import UsageEvent

if TYPE_CHECKING:
    from inference.broker import InferenceBroker

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, broker: InferenceBroker, *, every: float = 2.0, grace_ms: int = 2000
                 ) -> None:
        self.broker = broker
        self.every = every
        self.grace_ms = grace_ms
        self.scripts: Scripts | None = None

    async def run(self, closing: asyncio.Event) -> None:
        while await self.broker.tick(self.every * random.uniform(0.75, 1.25)):
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("sweep failed: %s", exc)

    async def sweep(self) -> int:
        broker = self.broker
        redis = broker.redis
        prefix = broker.settings.prefix
        if not isinstance(getattr(broker.hook, "scripts", None), Scripts):
            return 0  # a hook that keeps no in-flight records
        settled = 0
        now_ms = int(time.time() * 1000)
        alive: dict[str, bool] = {broker.process_id: True}
        mine = {s.stream_id for s in broker.streams.values() if s.stream_id is not None}
        for raw_tenant in await redis.smembers(f"{prefix}:{INFLIGHT_TENANTS}"):
            tenant_id = raw_tenant.decode() if isinstance(raw_tenant, bytes) else raw_tenant
            records = await redis.hgetall(keys(prefix, tenant_id)["inflight"])
            for raw in records.values():
                record = json.loads(raw)
                owner = record["owner"]
                if owner not in alive:
                    alive[owner] = bool(await redis.exists(broker.heartbeat_key(owner)))
                if now_ms - int(record["checkpoint_ms"]) < self.grace_ms:
                    continue
                # Also our own records that no stream of ours holds: an admission whose answer
                # was lost on the way back from Redis.
                if alive[owner] and not (owner == broker.process_id
                                         and record["stream_id"] not in mine):
                    continue
                event = orphan_event(record, now_ms, broker.process_id)
                if await broker.hook.settle(None, event):
                    settled += 1
                    metrics.SWEPT.inc()
                    log.warning("settled stream %s of dead broker %s", event.stream_id, owner)
                    if broker.link is not None:
                        prefix_topic = f"t/{event.tenant_id}/d/{event.device_id}"
                        broker.publish(prefix_topic, protocol.DOWN, protocol.dumps({
                            "type": "error", "id": event.request_id, "code": "internal",
                            "message": "the stream was lost; its usage so far is recorded",
                            "retry_after": 1.0, "usage": event.as_public_dict()}), qos=1)
        return settled


def orphan_event(record: dict[str, object], now_ms: int, sweeper: str) -> UsageEvent:
    return UsageEvent(
        tenant_id=str(record["tenant_id"]), device_id=str(record["device_id"]),
        product_id=record.get("product_id"),  # type: ignore[arg-type]
        request_id=str(record["request_id"]), admitted_at_ms=int(record["admitted_at_ms"]),  # type: ignore[call-overload]
        settled_at_ms=now_ms, stream_id=str(record["stream_id"]), kind=str(record["kind"]),
        conversation_id=record.get("conversation_id"),  # type: ignore[arg-type]
        provider=str(record.get("provider") or ""), model=str(record.get("model") or ""),
        units=Units.from_dict(record.get("units")),  # type: ignore[arg-type]
        credits=0, credit_split={}, rate_card_version=None, ttft_ms=None, first_delta_ms=None,
        duration_ms=float(now_ms - int(record["checkpoint_ms"])),  # type: ignore[call-overload]
        finish="error", error_code="internal", broker=sweeper, settled_by="sweeper")
