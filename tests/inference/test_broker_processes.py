"""The inference broker as the Procfile runs it: ``flask --app app broker`` processes on a real
Mosquitto, Redis and Postgres, with devices speaking protocol v1 through the reference client.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.db import db
from core.mqtt import platform_target
from core.redis import connect_async
from inference.audio import (
    AudioFormat,
    encode_pcm_to_frames,
    pack_frame,
    synth_tone,
    unpack_frame,
)
from inference.broker import BrokerSettings, InferenceBroker
from inference.client import DeviceClient, Reply, new_request_id
from inference.hook import ADMIT, CHECKPOINT, SETTLE, LimitsHook, Scripts, settle_event
from inference.models import UsageEventRecord
from inference.providers.registry import ProviderRegistry
from inference.sweeper import Sweeper, orphan_event
from inference.usage import UsageWriter
from tests.conftest import running_mosquitto
from tests.inference.conftest import Fleet, connect_with_retry, make_fleet
from tests.inference.processes import (
    BrokerProcess,
    RouteMonitor,
    begin_on,
    broker_env,
    eventually,
    first_delta,
    in_flight,
    tcp_nodelay_of_connections,
    terminals,
    until_served,
    usage_events,
)
from tests.support.processes import PROJECT_ROOT
from tests.support.redis_server import RedisServer


@pytest.fixture
def brokers(platform: Any, inference_mosquitto: Any, log_dir: Path
            ) -> Iterator[Callable[..., BrokerProcess]]:
    """Starts broker processes on the suite's Mosquitto; each stopped after the test."""
    started: list[BrokerProcess] = []

    def _start(name: str, *, mqtt_url: str | None = None, **settings: Any) -> BrokerProcess:
        env = broker_env(platform, mqtt_url or inference_mosquitto.url, **settings)
        process = BrokerProcess(f"{name}-{uuid.uuid4().hex[:6]}", env, log_dir)
        started.append(process)
        return process.start()

    yield _start
    for process in started:
        process.stop()


async def connect_devices(fleet: Fleet, count: int) -> list[DeviceClient]:
    devices = []
    for index in range(count):
        device = DeviceClient.from_mqtt_info(fleet.info(index))
        await connect_with_retry(device)
        devices.append(device)
    return devices


async def close_devices(devices: list[DeviceClient]) -> None:
    for device in devices:
        await device.close()


def owner(reply: Any) -> str:
    assert reply.start is not None, reply.messages
    return str(reply.start["stream"]).split("-", 1)[0]


@asynccontextmanager
async def watched_device(app: Any, fleet: Fleet, *serving: BrokerProcess
                         ) -> AsyncIterator[tuple[DeviceClient, RouteMonitor]]:
    """The fleet's first device, once each of ``serving`` answers it on its route, and a
    :class:`RouteMonitor` of the route topics; both closed on exit."""
    [device] = await connect_devices(fleet, 1)
    monitor = await RouteMonitor(platform_target(app.config)).start()
    try:
        for broker in serving:
            await until_served(device, broker.route)
        yield device, monitor
    finally:
        await monitor.stop()
        await close_devices([device])


# --- 1. two processes share the devices ----------------------------------------------------


def test_requests_spread_over_two_broker_processes(platform: Any, brokers: Any, run: Any,
                                                    redis_client: Any) -> None:
    fleet = make_fleet(4)
    a, b = brokers("broker-a"), brokers("broker-b")
    prefix = platform.config["ENSOUL_REDIS_PREFIX"]
    tenant_id = str(fleet.devices[0][0].tenant_id)

    async def scenario() -> None:
        devices = await connect_devices(fleet, 4)
        try:
            for broker in (a, b):
                await until_served(devices[0], broker.route)
            # Four at once per device: its limit of concurrent streams (platform fixture).
            replies = [device.begin(f"question number {n}") for n in range(4)
                       for device in devices]
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 20)
            # One more round trip per device: a second terminal would have arrived by now.
            last = [device.begin("last one") for device in devices]
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in last)), 20)

            owners = [owner(r) for r in replies]
            assert set(owners) == {a.process_id, b.process_id}, owners
            for reply in replies:
                assert [m["type"] for m in terminals(reply)] == ["end"], reply.messages
                assert terminals(reply)[0]["finish"] == "stop"
                assert reply.start is not None
                assert reply.start["route"] == f"up/r/{owner(reply)}"
            events = usage_events(redis_client, prefix, tenant_id)
            by_request = {e["request_id"]: e for e in events}
            assert len(events) == len(by_request) == len(replies) + len(last)
            for reply in replies:
                event = by_request[reply.request_id]
                assert event["broker"] == owner(reply) and event["settled_by"] == "broker"
                assert event["stream_id"] == (reply.start or {}).get("stream")
        finally:
            await close_devices(devices)

    run(scenario())


SLOW = {"ENSOUL_LOCAL_TOKENS_PER_SECOND": 10, "ENSOUL_LOCAL_ANSWER_TOKENS": 400}  # 40 s


def forwarded(monitor: RouteMonitor, device: DeviceClient, reply: Any, kind: str) -> bool:
    """Whether a broker process re-published this request's ``kind`` message on the owner's
    route (the device itself sent it on the shared topic)."""
    topic = f"{device.prefix}/up/r/{owner(reply)}"
    return any(message.get("type") == kind and message.get("id") == reply.request_id
               for message in map(json.loads, monitor.on(topic)))


def test_an_abort_ends_the_stream_on_the_route_and_on_the_shared_topic(
        platform: Any, brokers: Any, run: Any, redis_client: Any) -> None:
    fleet = make_fleet(1)
    a, b = brokers("abort-a", **SLOW), brokers("abort-b", **SLOW)
    prefix = platform.config["ENSOUL_REDIS_PREFIX"]
    tenant_id = str(fleet.devices[0][0].tenant_id)

    async def aborted(device: DeviceClient, *, use_route: bool, shift: bool = False) -> Any:
        reply = device.begin("Tell me a very long story")
        await first_delta(reply)
        if shift:  # one more message on the shared topic: the abort goes to the other process
            device.send({"type": "hello", "version": 1, "features": {}})
        device.abort(reply, use_route=use_route)
        await asyncio.wait_for(reply.done.wait(), 10)
        assert [(m["type"], m.get("finish")) for m in terminals(reply)] == [("end", "abort")], (
            reply.messages)
        assert terminals(reply)[0]["usage"]["output_tokens"] < 400
        return reply

    async def scenario() -> None:
        async with watched_device(platform, fleet, a, b) as (device, monitor):
            # On the stream's route: straight to its process, whichever holds it.
            on_route: list[Any] = []
            while {owner(r) for r in on_route} != {a.process_id, b.process_id}:
                assert len(on_route) < 6, [owner(r) for r in on_route]
                on_route.append(await aborted(device, use_route=True))
            # On the shared topic: handled where it lands, forwarded to the owner otherwise.
            on_shared: list[tuple[Any, bool]] = []
            while {hop for _, hop in on_shared} != {True, False}:
                assert len(on_shared) < 8, on_shared
                reply = await aborted(device, use_route=False, shift=len(on_shared) % 2 == 1)
                await monitor.barrier(device.prefix)
                on_shared.append((reply, forwarded(monitor, device, reply, "abort")))

            await device.ask("one more round trip", max_output_tokens=2, timeout=10)
            replies = on_route + [reply for reply, _ in on_shared]
            for reply in replies:
                assert len(terminals(reply)) == 1, reply.messages
            events = {e["request_id"]: e for e in usage_events(redis_client, prefix, tenant_id)}
            for reply in replies:
                assert events[reply.request_id]["finish"] == "abort"
                assert events[reply.request_id]["broker"] == owner(reply)
            assert not in_flight(redis_client, prefix, tenant_id)

    run(scenario())


UPLINK = AudioFormat("opus", 16000, 1, 60)


def test_voice_turns_with_and_without_the_route(platform: Any, brokers: Any, run: Any,
                                                redis_client: Any) -> None:
    fleet = make_fleet(1)
    a, b = brokers("voice-a"), brokers("voice-b")
    prefix = platform.config["ENSOUL_REDIS_PREFIX"]
    tenant_id = str(fleet.devices[0][0].tenant_id)
    packets = encode_pcm_to_frames(synth_tone(1200, 16000), UPLINK)  # 20 frames of 60 ms

    async def scenario() -> None:
        async with watched_device(platform, fleet, a, b) as (device, monitor):
            # Frames and listen stop on the route: the owner hears the whole turn.
            routed: list[Any] = []
            while {owner(r) for r in routed} != {a.process_id, b.process_id}:
                assert len(routed) < 6, [owner(r) for r in routed]
                reply = await device.voice_turn(packets, use_route=True, speak=False)
                assert [(m["type"], m.get("finish")) for m in terminals(reply)] == [
                    ("end", "stop")], reply.messages
                assert terminals(reply)[0]["usage"]["audio_in_ms"] == 1200
                assert [t["text"] for t in reply.of_type("transcript")] == [
                    "1200 milliseconds of audio"]
                routed.append(reply)

            # Frames on the shared up/audio: round-robin over both processes; the other one
            # forwards its share to the owner's route, where frames overtaken by later ones
            # are dropped. The turn still ends once, and what was heard is what is billed.
            unrouted = []
            forwarded_seqs = []
            for _ in range(4):
                before = len(monitor.messages)
                reply = await device.voice_turn(packets, use_route=False, speak=False)
                assert [(m["type"], m.get("finish")) for m in terminals(reply)] == [
                    ("end", "stop")], reply.messages
                assert 0 <= terminals(reply)[0]["usage"]["audio_in_ms"] <= 1200
                unrouted.append(reply)
                await monitor.barrier(device.prefix)
                audio = f"{device.prefix}/up/r/{owner(reply)}/audio"
                forwarded_seqs.append([unpack_frame(payload).seq for topic, payload
                                       in monitor.messages[before:] if topic == audio])
            assert any(forwarded_seqs), forwarded_seqs  # the forwarding path was taken

            await device.ask("one more round trip", max_output_tokens=2, timeout=10)
            events = {e["request_id"]: e for e in usage_events(redis_client, prefix, tenant_id)}
            for reply in routed + unrouted:
                assert len(terminals(reply)) == 1, reply.messages
                event = events[reply.request_id]
                assert event["kind"] == "voice" and event["broker"] == owner(reply)
                assert event["units"]["audio_in_ms"] == terminals(reply)[0]["usage"][
                    "audio_in_ms"]

    run(scenario())


def test_frames_forwarded_after_their_turn_ended_are_dropped_silently(
        platform: Any, brokers: Any, run: Any) -> None:
    """docs/protocol.md 11.3 and 13: a frame on the shared ``up/audio`` that another process
    forwards too late is dropped as late, and "lost or late frames are not reported". Here the
    other process is paused (SIGSTOP: a stall, a GC pause) while the turn runs, so its share of
    the frames reaches the owner's route after the turn ended."""
    fleet = make_fleet(1)
    a, b = brokers("late-a"), brokers("late-b")
    packets = encode_pcm_to_frames(synth_tone(1200, 16000), UPLINK)
    by_id = {a.process_id: a, b.process_id: b}

    async def scenario() -> None:
        async with watched_device(platform, fleet, a, b) as (device, monitor):
            request_id = new_request_id()
            reply = device.replies.setdefault(request_id, Reply(request_id))
            device.send({"type": "listen", "state": "start", "id": request_id,
                         "options": {"speak": False}})
            start = await device.started(reply)
            assert start.get("type") == "start", reply.messages
            owning = by_id[owner(reply)]
            other = b if owning is a else a
            while not device.unsolicited.empty():  # the hello answers
                device.unsolicited.get_nowait()

            other.process.signal(signal.SIGSTOP)
            try:
                for seq, packet in enumerate(packets):  # round robin: half go to `other`
                    device.send_raw(pack_frame(packet, seq=seq), "up/audio", qos=0)
                device.send({"type": "listen", "state": "stop", "id": request_id},
                            route=owning.route)
                await asyncio.wait_for(reply.done.wait(), 10)
            finally:
                other.process.signal(signal.SIGCONT)
            assert [(m["type"], m.get("finish")) for m in terminals(reply)] == [
                ("end", "stop")], reply.messages
            assert terminals(reply)[0]["usage"]["audio_in_ms"] < 1200  # `other` had a share

            # `other` wakes up and forwards its share to the owner, whose turn is over.
            route_audio = f"{device.prefix}/{owning.route}/audio"
            await eventually(lambda: monitor.on(route_audio), 10,
                             what="the paused process to forward its frames")
            unsolicited = await until_served(device, owning.route)  # the owner handled them
            while not device.unsolicited.empty():
                unsolicited.append(device.unsolicited.get_nowait())
            assert [m for m in unsolicited if m.get("type") == "error"] == [], (
                f"late frames forwarded by {other.process_id} were reported to the device")

    run(scenario())


# --- 2. a broker killed mid-stream -----------------------------------------------------------


def test_a_killed_brokers_stream_is_settled_once_by_the_sweeper(
        platform: Any, brokers: Any, run: Any, redis_client: Any) -> None:
    fleet = make_fleet(1)
    a, b = brokers("sweep-a", **SLOW), brokers("sweep-b", **SLOW)
    prefix = platform.config["ENSOUL_REDIS_PREFIX"]
    tenant_id = str(fleet.devices[0][0].tenant_id)
    killed_id = a.process_id
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        [device] = await connect_devices(fleet, 1)
        redis = connect_async(platform.config["REDIS_URL"])
        try:
            for broker in (a, b):
                await until_served(device, broker.route)
            reply = begin_on(device, a.route, "Tell me a very long story")
            await first_delta(reply)
            assert owner(reply) == a.process_id
            stream_id = reply.start["stream"]  # type: ignore[index]
            await eventually(
                lambda: in_flight(redis_client, prefix, tenant_id).get(stream_id, {}).get(
                    "units", {}).get("output_tokens", 0) > 0,
                5, what="a checkpoint with output tokens")

            a.kill9()
            record = in_flight(redis_client, prefix, tenant_id)[stream_id]  # the last one
            assert record["owner"] == killed_id and record["units"]["output_tokens"] > 0

            await asyncio.wait_for(reply.done.wait(), 20)  # heartbeat TTL 5 s, sweeps ~2 s
            [terminal] = terminals(reply)
            assert terminal["type"] == "error" and terminal["code"] == "internal", terminal
            assert terminal["usage"] == {**record["units"], "credits": 0, "credit_split": {}}
            [event] = [e for e in usage_events(redis_client, prefix, tenant_id)
                       if e["request_id"] == reply.request_id]
            assert event["settled_by"] == "sweeper" and event["broker"] == b.process_id
            assert event["stream_id"] == stream_id and event["units"] == record["units"]
            assert (event["finish"], event["error_code"]) == ("error", "internal")
            assert stream_id not in in_flight(redis_client, prefix, tenant_id)

            # The killed broker comes back as a new process: it serves, settles nothing old.
            a.start()
            assert a.process_id != killed_id
            await until_served(device, a.route)
            again = begin_on(device, a.route, "Are you back?", max_output_tokens=3)
            await asyncio.wait_for(again.done.wait(), 10)
            assert [m["type"] for m in terminals(again)] == ["end"], again.messages
            # Whoever settles the orphan again (a racing sweeper, a late broker) is refused.
            scripts = Scripts(redis, admit=ADMIT, settle=SETTLE, checkpoint=CHECKPOINT)
            assert not await settle_event(redis, scripts, prefix,
                                          orphan_event(record, event["settled_at_ms"], "x"))
            # The sweeper that settled it, sending its settle again (its answer lost on the
            # way back), is told it did, and nothing is appended twice.
            assert await settle_event(redis, scripts, prefix,
                                      orphan_event(record, event["settled_at_ms"], b.process_id))
            assert await Sweeper(in_process_broker(platform, redis)).sweep() == 0
            events = [e for e in usage_events(redis_client, prefix, tenant_id)
                      if e["request_id"] == reply.request_id]
            assert len(events) == 1 and len(terminals(reply)) == 1, (events, reply.messages)
            seen.update(request_id=reply.request_id, units=record["units"])
        finally:
            await redis.aclose()
            await close_devices([device])

    run(scenario())

    writer = UsageWriter(platform, "test-writer", block_ms=10)
    while writer.drain_once():
        pass
    rows = db.session.scalars(select(UsageEventRecord).where(
        UsageEventRecord.request_id == seen["request_id"])).all()
    assert [(r.settled_by, r.broker, r.finish, r.error_code) for r in rows] == [
        ("sweeper", b.process_id, "error", "internal")]
    assert rows[0].output_tokens == seen["units"]["output_tokens"]
    assert writer.drain_once() == 0


def in_process_broker(app: Any, redis: Any) -> InferenceBroker:
    """A broker object that is never run: what the :class:`Sweeper` needs of one."""
    prefix = app.config["ENSOUL_REDIS_PREFIX"]
    return InferenceBroker(platform_target(app.config), redis, LimitsHook(redis, prefix),
                           ProviderRegistry(app.config), BrokerSettings(prefix=prefix),
                           process_id="test-sweeper")


# --- 3. Redis restarts mid-stream --------------------------------------------------------------


def test_a_redis_restart_mid_stream_loses_no_usage(platform: Any, brokers: Any, run: Any,
                                                   tmp_path: Path, log_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer(tmp_path, log_dir, "redis-broker")
    server.process.start()
    try:
        # The platform's Redis is this one: the device profiles are projected here.
        monkeypatch.setattr(platform.extensions["ensoul_redis"], "client", server.client)
        fleet = make_fleet(1)
        broker = brokers("redis-restart", redis_url=server.url,
                         ENSOUL_LOCAL_TOKENS_PER_SECOND=10, ENSOUL_LOCAL_ANSWER_TOKENS=15)
        prefix = platform.config["ENSOUL_REDIS_PREFIX"]
        tenant_id = str(fleet.devices[0][0].tenant_id)

        async def scenario() -> None:
            [device] = await connect_devices(fleet, 1)
            try:
                await until_served(device, broker.route)
                reply = device.begin("Count to fifteen slowly")
                await first_delta(reply)
                stream_id = reply.start["stream"]  # type: ignore[index]
                assert server.process.stop() == 0  # SIGTERM: a clean shutdown, AOF written
                await eventually(lambda: f"settling {stream_id} failed" in broker.output(), 20,
                                 what="the broker to try settling while Redis is down")
                assert reply.terminal is None  # the end waits for its usage record
                server.process.start()

                await asyncio.wait_for(reply.done.wait(), 15)
                [end] = terminals(reply)
                assert (end["type"], end["finish"]) == ("end", "stop"), reply.messages
                assert end["usage"]["output_tokens"] == 15
                [event] = [e for e in usage_events(server.client, prefix, tenant_id)
                           if e["request_id"] == reply.request_id]
                assert event["units"]["output_tokens"] == 15 and event["finish"] == "stop"
                assert stream_id not in in_flight(server.client, prefix, tenant_id)

                # It keeps serving: the profile is read again (the cache was dropped).
                assert "cache dropped" in broker.output()
                after = await device.ask("Still there?", max_output_tokens=3, timeout=15)
                assert [(m["type"], m.get("finish")) for m in terminals(after)] == [
                    ("end", "length")], after.messages
                assert len(terminals(reply)) == 1
            finally:
                await close_devices([device])

        run(scenario())
    finally:
        server.process.stop()


# --- 4. Mosquitto restarts ---------------------------------------------------------------------


def test_a_mosquitto_restart(platform: Any, brokers: Any, run: Any, redis_client: Any,
                             log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_mosquitto(log_dir, "broker-mosquitto") as instance:
        for key, value in instance.platform_config().items():
            monkeypatch.setitem(platform.config, key, value)
        fleet = make_fleet(2)  # their passwords go to this instance's files
        broker = brokers("mqtt-restart", mqtt_url=instance.url,
                         ENSOUL_LOCAL_TOKENS_PER_SECOND=10, ENSOUL_LOCAL_ANSWER_TOKENS=80)
        prefix = platform.config["ENSOUL_REDIS_PREFIX"]
        tenant_id = str(fleet.devices[0][0].tenant_id)

        async def scenario() -> None:
            streaming, probe = await connect_devices(fleet, 2)
            try:
                await until_served(probe, broker.route)
                reply = streaming.begin("Tell me a story of eighty words")
                await first_delta(reply)

                instance.process.restart()
                def reconnected(device: DeviceClient) -> bool:
                    assert device.link is not None
                    return device.link.connects == 2 and device.link.subscribed.is_set()

                await eventually(lambda: reconnected(streaming) and reconnected(probe), 15,
                                 what="the devices to reconnect")
                await until_served(probe, broker.route)  # reconnected and resubscribed
                after = await probe.ask("Back?", max_output_tokens=3, timeout=10)
                assert [(m["type"], m.get("finish")) for m in terminals(after)] == [
                    ("end", "length")], after.messages

                # Both of its clients (inference, presence) reconnected, Nagle off again.
                def both_connected() -> list[int] | None:
                    values = tcp_nodelay_of_connections(broker.pid, instance.port)
                    return values if len(values) >= 2 else None

                values = await eventually(both_connected, 15,
                                          what="the presence tracker to reconnect")
                assert all(values), values

                # The stream in flight ends once and its usage is recorded once. Mosquitto
                # (2.0) publishes every connected device's will on a clean shutdown, so the
                # broker saw the device "offline" and aborted the stream (_device_gone); the
                # end (QoS 1, queued by paho) reached the device once both had reconnected.
                # Were the will ignored, the stream would run on to "stop" (deltas published
                # during the outage, QoS 0, are lost either way).
                await asyncio.wait_for(reply.done.wait(), 15)
                [end] = terminals(reply)
                assert end["type"] == "end" and end["finish"] in ("abort", "stop"), reply.messages
                [event] = [e for e in usage_events(redis_client, prefix, tenant_id)
                           if e["request_id"] == reply.request_id]
                assert event["finish"] == end["finish"] and event["settled_by"] == "broker"
                assert event["units"] == {k: v for k, v in end["usage"].items()
                                          if k not in ("credits", "credit_split")}
                assert 0 < event["units"]["output_tokens"] <= 80
                if end["finish"] == "stop":
                    assert event["units"]["output_tokens"] == 80
                assert not in_flight(redis_client, prefix, tenant_id)
                seqs = [d["seq"] for d in reply.of_type("delta")]
                assert seqs == sorted(set(seqs))
            finally:
                await close_devices([streaming, probe])

        run(scenario())


# --- 5. Nagle is off on the broker's MQTT connection -------------------------------------------


def test_the_broker_connection_to_mosquitto_has_tcp_nodelay(
        platform: Any, inference_mosquitto: Any, start_broker: Any, brokers: Any) -> None:
    thread = start_broker()
    sock = thread.broker.link.client.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    process = brokers("nodelay")
    values = tcp_nodelay_of_connections(process.pid, inference_mosquitto.port)
    assert len(values) >= 2 and all(values), values  # the inference link and presence

    template = (PROJECT_ROOT / "config/mosquitto/mosquitto.conf.template").read_text()
    settings = [line.split() for line in template.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert ["set_tcp_nodelay", "true"] in settings
