"""The inference broker: devices' requests in over MQTT, answers streamed straight back.

One asyncio process; several share the load through a shared subscription on the devices'
``up`` topics. Mosquitto hands shared messages out round-robin, so a stream's follow-ups
(abort, audio frames, listen stop) could land on another process: the ``start`` message names
the stream's *route*, ``up/r/{process}``, which only its process subscribes to. A follow-up
sent on the shared topic anyway is forwarded to its owner (found from the stream id the
admission stored) by re-publishing it on the owner's route.

The hot path never touches Postgres: device profiles come from :class:`DeviceDirectory`,
limits and the usage record from the :class:`BillingHook`'s Redis scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core.mqtt import MqttTarget
from inference import metrics, protocol
from inference.audio import AudioError, unpack_frame
from inference.directory import DeviceDirectory, DeviceProfile
from inference.hook import BillingHook, Refused
from inference.link import MqttLink
from inference.protocol import ProtocolError
from inference.providers.registry import ProviderRegistry
from inference.sessions import Memory
from inference.streams import Stream, StreamRunner, hello_formats
from inference.sweeper import Sweeper

log = logging.getLogger(__name__)

SHARE_GROUP = "ensoul-inference"
HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    prefix: str = "ensoul"
    shared: bool = True
    dedup_seconds: int = 86400
    request_timeout: float = 120.0
    coalesce_ms: float = 20.0
    coalesce_bytes: int = 512
    checkpoint_ms: float = 250.0
    device_messages_per_second: float = 20.0
    turn_idle_seconds: float = 10.0
    registry_channel: str = "ensoul:registry"

    @classmethod
    def from_config(cls, config: Any, *, shared: bool) -> BrokerSettings:
        prefix = config["ENSOUL_REDIS_PREFIX"]
        return cls(prefix=prefix, shared=shared,
                   dedup_seconds=int(config["ENSOUL_INFERENCE_DEDUP_HOURS"]) * 3600,
                   request_timeout=float(config["ENSOUL_INFERENCE_REQUEST_TIMEOUT_SECONDS"]),
                   coalesce_ms=float(config["ENSOUL_INFERENCE_COALESCE_MS"]),
                   coalesce_bytes=int(config["ENSOUL_INFERENCE_COALESCE_BYTES"]),
                   checkpoint_ms=float(config["ENSOUL_INFERENCE_CHECKPOINT_MS"]),
                   device_messages_per_second=float(
                       config["ENSOUL_INFERENCE_DEVICE_MESSAGES_PER_SECOND"]),
                   turn_idle_seconds=float(config["ENSOUL_INFERENCE_TURN_IDLE_SECONDS"]),
                   registry_channel=f"{prefix}:registry")


class TokenBucket:
    """Per-device flood control before anything reaches Redis."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float) -> None:
        self.tokens = burst
        self.stamp = time.monotonic()

    def full(self, rate: float, burst: float) -> bool:
        return self.tokens + (time.monotonic() - self.stamp) * rate >= burst

    def take(self, rate: float, burst: float) -> bool:
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class InferenceBroker:
    def __init__(self, target: MqttTarget, redis: Redis, hook: BillingHook,
                 providers: ProviderRegistry, settings: BrokerSettings, *,
                 process_id: str | None = None) -> None:
        self.target = target
        self.redis = redis
        self.hook = hook
        self.providers = providers
        self.settings = settings
        self.process_id = process_id or f"b{secrets.token_hex(4)}"
        self.directory = DeviceDirectory(redis, settings.prefix)
        self.memory = Memory(redis, settings.prefix)
        self.streams: dict[tuple[str, str], Stream] = {}  # (device, request id) -> stream
        self.turns: dict[str, Stream] = {}  # device -> its open voice turn
        self.buckets: dict[str, TokenBucket] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.link: MqttLink | None = None
        self.runner: StreamRunner | None = None
        self.ready = asyncio.Event()
        # Background loops end on this rather than on cancellation, which redis-py's asyncio
        # client can swallow while a command is in flight (a stop then waited forever).
        self.closing = asyncio.Event()
        self._error_stamps: dict[str, float] = {}

    @property
    def route(self) -> str:
        return f"{protocol.ROUTE}/{self.process_id}"

    def subscriptions(self) -> list[tuple[str, int]]:
        up = [("t/+/d/+/up", 1), ("t/+/d/+/up/audio", 0)]
        if self.settings.shared:
            up = [(f"$share/{SHARE_GROUP}/{topic}", qos) for topic, qos in up]
        return [*up, (f"t/+/d/+/{self.route}", 1), (f"t/+/d/+/{self.route}/audio", 0),
                ("t/+/d/+/status", 0)]

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; streams in flight are ended before returning."""
        registry_ready = asyncio.Event()
        link = MqttLink(self.target, f"ensoul-inference-{self.process_id}", self.on_message,
                        subscriptions=self.subscriptions())
        self.link = link
        self.runner = StreamRunner(self)
        sweeper = Sweeper(self)
        background = [
            asyncio.create_task(self.directory.follow_registry(
                self.settings.registry_channel, self.closing, registry_ready)),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._checkpoints()),
            asyncio.create_task(sweeper.run(self.closing)),
        ]
        await link.start()
        try:
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(link.refused.wait())]
            connected = asyncio.create_task(link.connected.wait())
            await asyncio.wait([connected, *waiters], return_when=asyncio.FIRST_COMPLETED)
            if link.connected.is_set():
                self.ready.set()
                log.info("inference broker %s serving on %s", self.process_id,
                         self.target.safe_url)
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        finally:
            await self._shutdown(background)

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        for stream in list(self.streams.values()):
            stream.cancel("shutdown")
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        self.closing.set()
        _, stuck = await asyncio.wait(background, timeout=5)
        for task in stuck:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.redis.delete(self.heartbeat_key(self.process_id))
        if self.link is not None:
            await self.link.stop()
        await self.providers.close()

    # --- background duties --------------------------------------------------------------

    def heartbeat_key(self, process_id: str) -> str:
        return f"{self.settings.prefix}:inference:broker:{process_id}"

    async def tick(self, seconds: float) -> bool:
        """Wait ``seconds``; False once the broker is closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)
        return not self.closing.is_set()

    async def _heartbeat(self) -> None:
        while not self.closing.is_set():
            if len(self.buckets) > 50_000:  # forget devices that are not flooding
                rate = self.settings.device_messages_per_second
                self.buckets = {d: b for d, b in self.buckets.items()
                                if not b.full(rate, rate * 2)}
            try:
                await self.redis.set(self.heartbeat_key(self.process_id), str(os.getpid()),
                                     ex=int(HEARTBEAT_SECONDS * 5))
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await self.tick(HEARTBEAT_SECONDS)

    async def _checkpoints(self) -> None:
        """Write the metered units of streams in flight, so a sweeper can settle them."""
        while await self.tick(self.settings.checkpoint_ms / 1000):
            entries = [(s.admission, s.used) for s in self.streams.values()
                       if s.admission is not None and not s.settled]
            try:
                await self.hook.checkpoint(entries)
            except Exception as exc:
                log.warning("checkpoint failed: %s", exc)

    def spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("broker task failed", exc_info=task.exception())

    # --- publishing -----------------------------------------------------------------------

    def publish(self, prefix: str, suffix: str, payload: bytes, qos: int = 0) -> None:
        assert self.link is not None
        self.link.publish(f"{prefix}/{suffix}", payload, qos)

    def send_error(self, prefix: str, error: ProtocolError, *, throttle_key: str | None = None
                   ) -> None:
        """An ``error`` on ``down``; repeated unsolicited errors are sent once a second."""
        if throttle_key is not None:
            now = time.monotonic()
            if self._error_stamps.get(throttle_key, 0) > now:
                metrics.DROPPED.labels(error.code).inc()
                return
            self._error_stamps[throttle_key] = now + 1.0
            if len(self._error_stamps) > 100_000:
                self._error_stamps.clear()
        metrics.ERRORS.labels(error.code).inc()
        self.publish(prefix, protocol.DOWN, protocol.error_message(error), qos=1)

    # --- dispatch (paho's callback, on the loop) -------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        received = time.perf_counter()
        parts = topic.split("/", 4)
        if len(parts) != 5 or parts[0] != "t" or parts[2] != "d":
            metrics.DROPPED.labels("topic").inc()
            return
        _, tenant_id, _, device_id, suffix = parts
        prefix = f"t/{tenant_id}/d/{device_id}"
        if suffix == "status":  # offline, or cleared (an empty retained message)
            if not payload or b'"offline"' in payload[:64]:
                self._device_gone(device_id)
            return
        routed = suffix.startswith(protocol.ROUTE + "/")
        if suffix.endswith("/audio") or suffix == protocol.UP_AUDIO:
            self._on_audio(prefix, tenant_id, device_id, payload, routed)
            return
        bucket = self.buckets.get(device_id)
        rate = self.settings.device_messages_per_second
        if bucket is None:
            bucket = self.buckets[device_id] = TokenBucket(rate * 2)
        if not bucket.take(rate, rate * 2):  # a flood: one error a second, the rest dropped
            metrics.DROPPED.labels("flood").inc()
            self.send_error(prefix, ProtocolError(
                "rate_limited", "too many messages; this and further ones are dropped",
                retry_after=1.0), throttle_key=f"{device_id}:flood")
            return
        try:
            message = protocol.parse(payload)
        except ProtocolError as exc:
            self.send_error(prefix, exc)
            return
        if isinstance(message, protocol.Abort):
            self._on_abort(prefix, tenant_id, device_id, message, payload, routed)
        elif isinstance(message, protocol.Listen) and message.state == "stop":
            self._on_listen_stop(prefix, tenant_id, device_id, message, payload, routed)
        else:
            assert self.runner is not None
            stream = None
            if isinstance(message, protocol.Hello):
                try:
                    hello_formats(message)
                except ProtocolError as exc:
                    self.send_error(prefix, exc)
                    return
            else:
                stream = self._register(prefix, device_id, message, received)
                if stream is None:
                    return
            self.spawn(self.runner.serve(prefix, tenant_id, device_id, message, stream))

    def _register(self, prefix: str, device_id: str,
                  message: protocol.Request | protocol.Listen, received: float) -> Stream | None:
        """Register the stream now, on the loop, so an abort, audio or stop that overtakes
        ``start`` finds it; a request id still here is a redelivery."""
        key = (device_id, message.id)
        if key in self.streams:
            self.send_error(prefix, ProtocolError("duplicate_request", request_id=message.id))
            return None
        voice = isinstance(message, protocol.Listen)
        kind = "voice" if voice else ("vision" if message.images else "text")  # type: ignore[union-attr]
        stream = Stream(prefix, message.id, kind, received)
        self.streams[key] = stream
        if voice:
            self.turns[device_id] = stream
        return stream

    def forget(self, device_id: str, stream: Stream) -> None:
        if self.streams.get((device_id, stream.request_id)) is stream:
            del self.streams[(device_id, stream.request_id)]
        if self.turns.get(device_id) is stream:
            del self.turns[device_id]

    def _on_abort(self, prefix: str, tenant_id: str, device_id: str, message: protocol.Abort,
                  payload: bytes, routed: bool) -> None:
        stream = self.streams.get((device_id, message.id))
        if stream is not None:
            stream.cancel("abort")
        elif not routed:
            self.spawn(self._forward(prefix, tenant_id, device_id, message.id, payload, ""))

    def _on_listen_stop(self, prefix: str, tenant_id: str, device_id: str,
                        message: protocol.Listen, payload: bytes, routed: bool) -> None:
        stream = self.streams.get((device_id, message.id))
        if stream is not None and stream.kind == "voice":
            stream.stop_turn()
        elif not routed:
            self.spawn(self._forward(prefix, tenant_id, device_id, message.id, payload, ""))
        else:
            self.send_error(prefix, ProtocolError("unknown_request", request_id=message.id))

    def _on_audio(self, prefix: str, tenant_id: str, device_id: str, payload: bytes,
                  routed: bool) -> None:
        try:
            frame = unpack_frame(payload)
        except AudioError as exc:
            self.send_error(prefix, ProtocolError(exc.code, exc.message),
                            throttle_key=f"{device_id}:audio")
            return
        stream = self.turns.get(device_id)
        if stream is not None:
            stream.add_frame(frame)
        elif not routed:
            self.spawn(self._forward(prefix, tenant_id, device_id, None, payload, "/audio"))
        else:  # forwarded or sent after its turn ended: late frames are not reported
            metrics.DROPPED.labels("late_audio").inc()

    async def _forward(self, prefix: str, tenant_id: str, device_id: str,
                       request_id: str | None, payload: bytes, suffix: str) -> None:
        """Hand a follow-up that reached this process to the process holding its stream."""
        from inference.hook import keys

        throttle_key = f"{device_id}:unknown" if request_id is not None else f"{device_id}:audio"
        if self._error_stamps.get(throttle_key, 0) > time.monotonic():
            metrics.DROPPED.labels("unroutable").inc()  # a burst: no lookup per frame
            return
        k = keys(self.settings.prefix, tenant_id)
        try:
            stream_id = await self.redis.get(
                f"{k['seen']}:{device_id}:{request_id if request_id is not None else 'turn'}")
        except Exception as exc:  # Redis away: the follow-up cannot be routed
            log.warning("could not look up a stream's owner: %s", exc)
            metrics.DROPPED.labels("unroutable").inc()
            return
        if isinstance(stream_id, bytes):
            stream_id = stream_id.decode()
        owner = stream_id.split("-", 1)[0] if stream_id else None
        if owner is None or owner == self.process_id:
            if request_id is not None:
                error = ProtocolError("unknown_request", request_id=request_id)
            else:
                error = ProtocolError("bad_request", "no voice turn is open")
            self.send_error(prefix, error, throttle_key=throttle_key)
            return
        self.publish(prefix, f"{protocol.ROUTE}/{owner}{suffix}", payload,
                     qos=0 if suffix else 1)

    def _device_gone(self, device_id: str) -> None:
        """A device that went offline cannot hear its answers: stop its streams."""
        for (owner, _), stream in list(self.streams.items()):
            if owner == device_id:
                stream.cancel("disconnect")


def profile_refusal(profile: DeviceProfile | None, request_id: str | None) -> ProtocolError | None:
    """Why this device may not be served at all, before any Redis script runs."""
    if profile is None:
        return ProtocolError("internal", "the device's profile is loading; retry",
                             request_id=request_id, retry_after=1.0)
    if profile.tenant_status != "active" or profile.status == "suspended":
        return ProtocolError("device_suspended", request_id=request_id)
    if profile.status != "active":
        return ProtocolError("unauthorized", "only active devices may use inference",
                             request_id=request_id)
    return None


Refusal = Refused
Factory = Callable[[Redis, str], BillingHook]
