"""Every error a device can get, from the real broker on Mosquitto, Redis and Postgres.

Each test drives the broker the way firmware would and asserts the exact shape of the
``error`` message (type, code, message, id, retry_after, usage), that the request got exactly
one terminal message and that the broker still serves a good request afterwards. Messages for
an id are collected until a later round trip on the same ``down`` topic (a second request's
``end`` or a ``hello`` answer) has come back: the broker publishes them in order, QoS 1, so
anything it sent for the first id arrived before that barrier. Nothing waits on a sleep.

license_required, license_expired and quota_exhausted belong to the billing hook (next issue).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from core.db import db
from core.mqtt import platform_target
from fleet import services
from fleet.access import registry_channel
from inference import protocol
from inference import services as inference_services
from inference.audio import (
    MAX_FRAME_BYTES,
    AudioFormat,
    encode_pcm_to_frames,
    pack_frame,
    synth_tone,
)
from inference.client import OFFLINE, ONLINE, DeviceClient, Reply, new_request_id
from inference.directory import MISSES_KEY, profile_key, project_devices, project_missing_profiles
from inference.hook import keys
from inference.link import MqttLink
from inference.models import ProviderConfig
from inference.service import BrokerThread
from tests.inference.conftest import Fleet, connect_with_retry, make_fleet
from tests.support.fake_openai import FakeOpenAI
from tests.support.waiting import free_port, wait_until

SCHEMAS = Path(__file__).resolve().parents[2] / "inference" / "protocol_schemas"
UPLINK = AudioFormat("opus", 16000, 1, 60)
NOT_TERMINAL = ("duplicate_request", "unknown_request")  # answer a repeat or a follow-up
SLOW = {"ENSOUL_LOCAL_TOKENS_PER_SECOND": 2.0}  # 12 tokens: a stream open for ~5.5 s
ABSENT = object()


# --- the environment: a fleet, a broker thread, connected device clients ---------------------


@dataclass
class Env:
    app: Any
    fleet: Fleet
    thread: BrokerThread
    clients: list[DeviceClient]
    redis: Any
    run: Callable[[Any], Any]

    @property
    def device(self) -> DeviceClient:
        return self.clients[0]

    @property
    def prefix(self) -> str:
        return str(self.app.config["ENSOUL_REDIS_PREFIX"])

    @property
    def tenant_id(self) -> str:
        return str(self.fleet.devices[0][0].tenant_id)

    def device_id(self, index: int = 0) -> str:
        return self.clients[index].client_id

    @property
    def route(self) -> str:
        assert self.thread.broker is not None
        return self.thread.broker.route

    def usage(self) -> list[dict[str, Any]]:
        stream = keys(self.prefix, self.tenant_id)["usage"]
        return [json.loads(fields[b"e"]) for _, fields in self.redis.xrange(stream)]

    def cached(self, index: int = 0) -> bool:
        assert self.thread.broker is not None
        return self.device_id(index) in self.thread.broker.directory._cache

    def use_provider(self, **spec: Any) -> ProviderConfig:
        """The tenant's default provider, configured as a vendor would (the service behind
        ``POST /api/v1/providers``); its devices' profiles follow after the commit."""
        config = inference_services.create_provider(
            uuid.UUID(self.tenant_id),
            {"name": f"p-{uuid.uuid4().hex[:8]}", "kind": "openai", "model": "gpt-x",
             "is_default": True, **spec})
        db.session.commit()
        self.reproject()
        return config

    def back_to_local(self, config: ProviderConfig) -> None:
        inference_services.delete_provider(db.session.merge(config))
        db.session.commit()
        self.reproject()

    def reproject(self) -> None:
        """What a registry change does after commit: project, then invalidate the caches."""
        project_devices(uuid.UUID(self.tenant_id))
        self.redis.publish(registry_channel(), json.dumps({
            "tenant_id": self.tenant_id,
            "device_ids": [self.device_id(i) for i in range(len(self.clients))]}))
        wait_until(lambda: not any(self.cached(i) for i in range(len(self.clients))), 10,
                   what="the broker's profile cache to drop the devices")


@pytest.fixture
def make_env(platform: Any, start_broker: Callable[..., BrokerThread], run: Any,
             redis_client: Any, monkeypatch: pytest.MonkeyPatch,
             request: pytest.FixtureRequest) -> Iterator[Callable[..., Env]]:
    """``make_env(count, status=..., **config)``: config is set before the fleet's profiles
    are projected and before the broker reads its settings."""
    clients: list[DeviceClient] = []

    def _make(count: int = 1, *, status: str = "active", **config: Any) -> Env:
        for key, value in config.items():
            monkeypatch.setitem(platform.config, key, value)
        fleet = make_fleet(count, status=status)
        thread = start_broker()
        link = thread.broker.link  # type: ignore[union-attr]
        wait_until(link.subscribed.is_set, 10, what="the broker's subscriptions")  # type: ignore[union-attr]
        connected = []
        for index in range(count):
            client = DeviceClient.from_mqtt_info(fleet.info(index))
            run(connect_with_retry(client))
            clients.append(client)
            connected.append(client)
        env = Env(platform, fleet, thread, connected, redis_client, run)
        if "fake_openai" in request.fixturenames:
            env.use_provider(base_url=request.getfixturevalue("fake_openai").base_url)
        return env

    yield _make
    for client in clients:
        run(client.close())


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """The local fake OpenAI server; ``make_env`` makes it the tenant's default provider.

    ``[fake:<scenario>]`` in a request's text picks the server's behaviour for it."""
    server = FakeOpenAI().start()
    yield server
    server.stop()


# --- messages -----------------------------------------------------------------------------


def request(request_id: str | None = None, text: str | None = "Hello, bear!", **fields: Any
            ) -> dict[str, Any]:
    body: dict[str, Any] = {} if text is None else {"text": text}
    body.update(fields.pop("input", {}))
    return {"type": "request", "id": request_id or new_request_id(), "input": body, **fields}


def png(width: int, height: int, size: int | None = None) -> bytes:
    """A real PNG; ``size`` pads it (after IEND) to exactly that many bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\x00\x00\x00" * width for _ in range(height))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    if size is not None:
        assert size >= len(data)
        data += b"\x00" * (size - len(data))
    return data


def png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(
        ">IIBBBBB", width, height, 8, 2, 0, 0, 0) + b"\x00" * 4


def image(data: bytes, mime: str = "image/png") -> dict[str, str]:
    return {"mime": mime, "data": base64.b64encode(data).decode()}


def dumps(message: Any) -> bytes:
    return json.dumps(message).encode()


# --- waiting and checking -------------------------------------------------------------------


def track(client: DeviceClient, request_id: str) -> Reply:
    """Collect what the platform sends for an id the test publishes by hand."""
    return client.replies.setdefault(request_id, Reply(request_id))


async def done(reply: Reply, timeout: float = 15.0) -> dict[str, Any]:
    """The request's terminal (not a duplicate_request or unknown_request answer)."""
    deadline = time.monotonic() + timeout
    while not terminals(reply):
        await asyncio.wait_for(reply.queue.get(), max(0.01, deadline - time.monotonic()))
    return terminals(reply)[0]


async def next_of(reply: Reply, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    while True:
        found = [m for m in reply.messages if m.get("type") == kind]
        if found:
            return found[0]
        await asyncio.wait_for(reply.queue.get(), timeout)


async def serves(client: DeviceClient, finish: str = "stop", **options: Any) -> Reply:
    """A good request answered with a normal ``end``: also the barrier of earlier messages."""
    reply = await client.ask("Are you still there?", timeout=20, **options)
    end = reply.terminal
    assert end is not None and end["type"] == "end" and end["finish"] == finish, reply.messages
    assert [m["type"] for m in reply.messages].count("start") == 1
    for message in reply.messages:
        schema_check(message)
    return reply


async def hello_barrier(client: DeviceClient, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Say hello; return the unsolicited messages that came before its answer."""
    client.send({"type": "hello", "version": 1})
    before: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = await asyncio.wait_for(client.unsolicited.get(),
                                             max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"no hello answer; before it: {before}") from None
        if message.get("type") == "hello":
            return before
        before.append(message)


async def audio_errors(client: DeviceClient, count: int = 1) -> list[dict[str, Any]]:
    """Errors caused by audio frames. Frames and JSON travel on different subscriptions (and
    a frame on the shared topic may take a Redis lookup), so a hello is no barrier for them:
    wait for the errors, then check with a hello that nothing else came."""
    errors = [await asyncio.wait_for(client.unsolicited.get(), 10) for _ in range(count)]
    assert await hello_barrier(client) == [], errors
    return errors


def terminals(reply: Reply) -> list[dict[str, Any]]:
    return [m for m in reply.messages if m.get("type") == "end" or (
        m.get("type") == "error" and m.get("code") not in NOT_TERMINAL)]


def one_terminal(reply: Reply) -> dict[str, Any]:
    found = terminals(reply)
    assert len(found) == 1, f"{len(found)} terminal messages for {reply.request_id}: " \
                            f"{reply.messages}"
    assert reply.messages[-1] is found[0] or all(
        m.get("code") in NOT_TERMINAL for m in reply.messages[reply.messages.index(found[0]) + 1:]
    ), f"messages after the terminal: {reply.messages}"
    return found[0]


def schema_check(message: dict[str, Any]) -> None:
    """Validate a platform message against its JSON schema (inference/protocol_schemas)."""
    import jsonschema

    path = SCHEMAS / f"down.{message.get('type')}.json"
    assert path.exists(), f"no schema for {message}"
    jsonschema.validate(message, json.loads(path.read_text()))


def check_error(message: dict[str, Any], code: str, *, request_id: str | None = None,
                retry_after: Any = ABSENT, usage: bool = False,
                says: str | None = None) -> dict[str, Any]:
    """The exact shape of an ``error``: these keys and no others."""
    expected_keys = {"type", "code", "message"}
    if request_id is not None:
        expected_keys.add("id")
    if retry_after is not ABSENT:
        expected_keys.add("retry_after")
    if usage:
        expected_keys.add("usage")
    assert message.get("type") == "error" and message.get("code") == code, message
    assert set(message) == expected_keys, message
    assert message.get("id") == request_id, message
    assert isinstance(message["message"], str) and message["message"], message
    if says is not None:
        assert says.lower() in message["message"].lower(), message
    if retry_after is not ABSENT:
        if callable(retry_after):
            assert retry_after(message["retry_after"]), message
        else:
            assert message["retry_after"] == retry_after, message
    schema_check(message)
    return message


def check_recorded(env: Env, terminal: dict[str, Any], finish: str,
                   error_code: str | None = None) -> dict[str, Any]:
    """``usage`` of a terminal equals the one usage event stored for the request."""
    events = [e for e in env.usage() if e["request_id"] == terminal["id"]]
    assert len(events) == 1, events
    [event] = events
    usage = terminal["usage"]
    assert event["units"] == {k: v for k, v in usage.items()
                              if k not in ("credits", "credit_split")}
    assert usage["credits"] == event["credits"] and usage["credit_split"] == event["credit_split"]
    assert event["finish"] == finish and event["error_code"] == error_code, event
    return event


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "it") -> None:
    """``wait_until`` with the test's loop running (the device clients live on it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)  # polling interval, not synchronisation


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("ensoul_inference_dropped_total", {"reason": reason}) or 0.0


def outside_minute_edge(margin: float = 8.0) -> None:
    """Rate limits count per calendar minute: start a test early enough in one."""
    wait_until(lambda: time.time() % 60 < 60 - margin, 70, what="a fresh minute")


# --- bad_request ------------------------------------------------------------------------------

WITHOUT_ID: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"hello bear", "JSON"),
    "not UTF-8": (b"\xff\xfe\xfa\x00{", "JSON"),
    "JSON array": (b'[{"type": "request"}]', "object"),
    "JSON string": (b'"request"', "object"),
    "JSON null": (b"null", "object"),
    "id too short": (dumps(request("short")), "id"),
    "id not a string": (dumps(request(None) | {"id": 12345678901234567890}), "id"),
    "id with a slash": (dumps(request("a/b" * 8)), "id"),
    "no id": (dumps({"type": "request", "input": {"text": "hi"}}), "id"),
    "unknown type without id": (dumps({"type": "dance"}), "dance"),
    "hello version 2": (dumps({"type": "hello", "version": 2}), "version"),
    "hello version true": (dumps({"type": "hello", "version": True}), "version"),
    "hello version 1.0": (dumps({"type": "hello", "version": 1.0}), "version"),
    "hello audio not an object": (dumps({"type": "hello", "version": 1, "audio": 16000}),
                                  "audio"),
    "hello audio rate 44100": (dumps({"type": "hello", "version": 1,
                                      "audio": {"sample_rate": 44100}}), "sample_rate"),
    "hello audio unknown field": (dumps({"type": "hello", "version": 1,
                                         "audio": {"bitrate": 16000}}), "bitrate"),
    "hello features not an object": (dumps({"type": "hello", "version": 1, "features": []}),
                                     "features"),
    "listen stop with a bad id": (dumps({"type": "listen", "state": "stop", "id": "x"}), "id"),
    "deeply nested JSON": (b'{"type": "request", "x": ' + b"[" * 100_000 + b"]" * 100_000
                           + b"}", ""),
    # Valid JSON to Python's json module, but no UTF-8 encoder can write it back out.
    "a lone surrogate in the text": (dumps(request(text="Hi")).replace(b'"Hi"', b'"\\ud800"'),
                                     "UTF-8"),
}


@pytest.mark.parametrize("payload,says", list(WITHOUT_ID.values()), ids=list(WITHOUT_ID))
def test_bad_request_without_a_readable_id(make_env: Callable[..., Env], run: Any,
                                           payload: bytes, says: str) -> None:
    env = make_env(1)
    env.device.send_raw(payload)

    before = run(hello_barrier(env.device))

    assert len(before) == 1, before
    check_error(before[0], "bad_request", says=says or None)
    run(serves(env.device))


def _with_id(rid: str) -> dict[str, dict[str, Any]]:
    return {
        "input is a string": {"type": "request", "id": rid, "input": "hello"},
        "input missing": {"type": "request", "id": rid},
        "input empty": request(rid, text=None),
        "text blank": request(rid, text="   \n"),
        "text a number": request(rid, text=None, input={"text": 42}),
        "images not a list": request(rid, input={"images": "a.png"}),
        "image not an object": request(rid, input={"images": ["a.png"]}),
        "image mime gif": request(rid, input={"images": [image(png(2, 2), "image/gif")]}),
        "image not base64": request(rid, input={"images": [
            {"mime": "image/png", "data": "not base64!"}]}),
        "image base64 with a line break": request(rid, input={"images": [
            {"mime": "image/png", "data": "iVBORw0K\nGgo="}]}),
        "image not a PNG": request(rid, input={"images": [image(b"GIF89a" + b"\x00" * 40)]}),
        "image not a JPEG": request(rid, input={"images": [image(png(2, 2), "image/jpeg")]}),
        "options not an object": request(rid, options=[1]),
        "max_output_tokens 0": request(rid, options={"max_output_tokens": 0}),
        "max_output_tokens 4097": request(rid, options={"max_output_tokens": 4097}),
        "max_output_tokens 512.0": request(rid, options={"max_output_tokens": 512.0}),
        "max_output_tokens true": request(rid, options={"max_output_tokens": True}),
        "max_output_tokens a string": request(rid, options={"max_output_tokens": "512"}),
        "speak a string": request(rid, options={"speak": "yes"}),
        "conversation with a space": request(rid, conversation="bed time"),
        "conversation a number": request(rid, conversation=7),
        "unknown type": {"type": "dance", "id": rid},
        "type missing": {"id": rid, "input": {"text": "hi"}},
        "listen without state": {"type": "listen", "id": rid},
        "listen state pause": {"type": "listen", "id": rid, "state": "pause"},
        "listen start speak null": {"type": "listen", "id": rid, "state": "start",
                                    "options": {"speak": None}},
        "abort with a bad type field": {"type": ["abort"], "id": rid},
    }


WITH_ID = list(_with_id("x" * 16))


@pytest.mark.parametrize("case", WITH_ID)
def test_bad_request_with_its_id(make_env: Callable[..., Env], run: Any, case: str) -> None:
    env = make_env(1)
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send_raw(dumps(_with_id(rid)[case]))

    run(done(reply))
    run(serves(env.device))

    check_error(one_terminal(reply), "bad_request", request_id=rid)
    assert len(reply.messages) == 1, reply.messages
    assert all(e["request_id"] != rid for e in env.usage())  # refused before admission


def test_audio_frame_with_a_bad_header(make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(3)
    short, version_2 = env.clients[0], env.clients[1]
    short.send_raw(b"\x01\x00\x00", "up/audio", qos=1)
    version_2.send_raw(b"\x02\x00\x00\x00\x00\x00\x00\x00" + b"\xf8\xff\xfe", f"{env.route}/audio",
                       qos=1)

    [error] = run(audio_errors(short))
    check_error(error, "bad_request", says="header")
    [error] = run(audio_errors(version_2))
    check_error(error, "bad_request", says="version")
    run(serves(short))
    run(serves(version_2))


def test_audio_errors_are_sent_once_a_second_and_the_rest_counted(
        make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1)
    before = dropped("bad_request")
    for _ in range(5):
        env.device.send_raw(b"\x01", "up/audio", qos=1)

    run(until(lambda: dropped("bad_request") - before >= 4, what="4 audio errors dropped"))
    errors = run(audio_errors(env.device))

    assert [e["code"] for e in errors] == ["bad_request"], errors
    assert dropped("bad_request") - before == 4
    run(serves(env.device))


def test_audio_without_an_open_voice_turn(make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1)
    packet = encode_pcm_to_frames(synth_tone(60, 16000), UPLINK)[0]
    env.device.send_raw(pack_frame(packet, seq=0), "up/audio", qos=1)

    [error] = run(audio_errors(env.device))

    check_error(error, "bad_request", says="no voice turn")
    run(serves(env.device))


def test_audio_on_a_route_after_its_turn_is_dropped_and_counted(
        make_env: Callable[..., Env], run: Any) -> None:
    """A route only carries a stream's follow-ups: frames there with no open turn are late
    (forwarded, or sent after the turn ended) and are not reported (docs/protocol.md)."""
    env = make_env(1)
    before = dropped("late_audio")
    packet = encode_pcm_to_frames(synth_tone(60, 16000), UPLINK)[0]
    env.device.send_raw(pack_frame(packet, seq=0), f"{env.route}/audio", qos=1)

    # The client's loop only writes while it runs: the barrier sends the frame, then a hello.
    assert run(hello_barrier(env.device)) == []  # nothing told to the device
    wait_until(lambda: dropped("late_audio") > before, 10, what="the frame counted")
    run(serves(env.device))


# --- too_large --------------------------------------------------------------------------------


def test_an_oversized_control_message_is_too_large(make_env: Callable[..., Env],
                                                   run: Any) -> None:
    env = make_env(1)
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send_raw(dumps({"type": "abort", "id": rid, "note": "x" * 4100}))
    env.device.send_raw(dumps({"type": "hello", "version": 1, "note": "x" * 4100}))

    [error] = run(hello_barrier(env.device))
    run(done(reply))
    run(serves(env.device))

    check_error(error, "too_large", says="4096")
    check_error(one_terminal(reply), "too_large", request_id=rid, says="4096")


def test_a_message_over_the_request_limit_is_too_large(make_env: Callable[..., Env],
                                                       run: Any) -> None:
    env = make_env(1)
    payload = dumps(request(text="hi") | {"note": "x" * protocol.MAX_REQUEST_BYTES})
    env.device.send_raw(payload)

    [error] = run(hello_barrier(env.device))

    check_error(error, "too_large", says=str(protocol.MAX_REQUEST_BYTES))
    run(serves(env.device))


def _too_large(rid: str) -> dict[str, tuple[dict[str, Any], str]]:
    tiny = image(png(2, 2))
    return {
        "too much text": (request(rid, text="a" * (protocol.MAX_TEXT_CHARS + 1)), "8000"),
        "too much text in code points": (request(rid, text="\u00e9" * 8001), "8000"),
        "too many images": (request(rid, input={"images": [tiny] * 3}), "2 images"),
        "an image longer than its base64 limit": (request(rid, input={"images": [
            {"mime": "image/png", "data": "A" * 700_000}]}), "524288"),
        "an image one byte over max_image_bytes": (request(rid, input={"images": [
            image(png(2, 2, size=protocol.MAX_IMAGE_BYTES + 1))]}), "524288"),
        "an image of 5000 x 5000 pixels": (request(rid, input={"images": [
            image(png_header(5000, 5000))]}), "pixels"),
    }


@pytest.mark.parametrize("case", list(_too_large("x" * 16)))
def test_too_large_with_its_id(make_env: Callable[..., Env], run: Any, case: str) -> None:
    env = make_env(1)
    rid = new_request_id()
    message, says = _too_large(rid)[case]
    reply = track(env.device, rid)
    env.device.send_raw(dumps(message))

    run(done(reply))
    run(serves(env.device))

    assert len(reply.messages) == 1, [
        {k: v for k, v in m.items() if k != "usage"} for m in reply.messages]
    check_error(one_terminal(reply), "too_large", request_id=rid, says=says)


def test_an_image_of_exactly_max_image_bytes_is_accepted(make_env: Callable[..., Env],
                                                         run: Any) -> None:
    env = make_env(1)
    reply = run(env.device.ask("What is this?", images=[
        ("image/png", png(3, 2, size=protocol.MAX_IMAGE_BYTES))]))

    end = one_terminal(reply)
    assert end["type"] == "end" and end["usage"]["images"] == 1
    assert reply.text.startswith("I see a 3x2 PNG image.")


def test_an_audio_frame_over_its_limit_is_too_large(make_env: Callable[..., Env],
                                                    run: Any) -> None:
    env = make_env(1)
    env.device.send_raw(pack_frame(b"\x00" * (MAX_FRAME_BYTES + 1), seq=0), "up/audio", qos=1)

    [error] = run(audio_errors(env.device))

    check_error(error, "too_large", says=str(MAX_FRAME_BYTES))
    run(serves(env.device))


# --- who may be served: unauthorized, device_suspended, internal -------------------------------


def test_a_provisioned_device_is_unauthorized_until_activated(make_env: Callable[..., Env],
                                                               run: Any) -> None:
    env = make_env(1, status="provisioned")
    reply = run(env.device.ask("May I?"))
    [error] = run(hello_answer(env.device))

    check_error(one_terminal(reply), "unauthorized", request_id=reply.request_id,
                says="active")
    assert len(reply.messages) == 1
    check_error(error, "unauthorized", says="active")
    assert env.usage() == []

    device = env.fleet.devices[0][0]
    services.activate(device)
    db.session.commit()  # after commit: re-projected, and the registry channel says so
    wait_until(lambda: not env.cached(), 10, what="the broker to drop the stale profile")
    run(serves(env.device))


async def hello_answer(client: DeviceClient) -> list[dict[str, Any]]:
    """The answer to a hello: ``hello``, or the error (no id) of a device not served."""
    client.send({"type": "hello", "version": 1})
    message = await asyncio.wait_for(client.unsolicited.get(), 10)
    return [message]


def test_a_suspended_device_is_refused_once_the_cache_is_invalidated(
        make_env: Callable[..., Env], run: Any, redis_client: Any) -> None:
    env = make_env(1)
    run(serves(env.device))
    assert env.cached(), "the broker keeps the profile it read"

    device = env.fleet.devices[0][0]
    services.change_status(device, "suspend")
    db.session.commit()
    stored = json.loads(redis_client.get(profile_key(env.prefix, env.tenant_id,
                                                     env.device_id())))
    assert stored["status"] == "suspended"
    wait_until(lambda: not env.cached(), 10, what="the registry message to reach the broker")

    reply = run(env.device.ask("Still there?"))
    [error] = run(hello_answer(env.device))

    check_error(one_terminal(reply), "device_suspended", request_id=reply.request_id)
    assert reply.messages == [reply.terminal]
    check_error(error, "device_suspended")
    assert len(env.usage()) == 1

    services.change_status(device, "resume")
    db.session.commit()
    wait_until(lambda: not env.cached(), 10, what="the broker to drop the suspended profile")
    run(serves(env.device))


def test_a_missing_profile_is_internal_with_retry_after_and_recorded(
        make_env: Callable[..., Env], run: Any, redis_client: Any) -> None:
    env = make_env(1)
    key = profile_key(env.prefix, env.tenant_id, env.device_id())
    assert not env.cached() and redis_client.delete(key) == 1

    reply = run(env.device.ask("Hello?"))
    [error] = run(hello_answer(env.device))

    check_error(one_terminal(reply), "internal", request_id=reply.request_id, retry_after=1.0)
    check_error(error, "internal", retry_after=1.0)
    misses = f"{env.prefix}:{MISSES_KEY}"
    assert redis_client.smembers(misses) == {f"{env.tenant_id}:{env.device_id()}".encode()}

    assert project_missing_profiles() == 1
    assert redis_client.exists(key) and not redis_client.smembers(misses)
    run(serves(env.device))


# --- limits: rate_limited, concurrency_limited, daily_cap_reached, duplicate_request -----------


def test_rate_limited_with_retry_after_then_a_flood_is_dropped_silently(
        make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(2, ENSOUL_INFERENCE_REQUESTS_PER_MINUTE=2)
    limited, other = env.clients
    outside_minute_edge()
    run(serves(limited))
    run(serves(limited))

    reply = run(limited.ask("One too many"))
    check_error(one_terminal(reply), "rate_limited", request_id=reply.request_id,
                retry_after=lambda value: 1 <= value <= 60)
    assert len(reply.messages) == 1

    before = dropped("rate_limited")
    flood = [limited.begin(f"again {n}") for n in range(5)]
    run(until(lambda: dropped("rate_limited") - before >= 5, what="the 5 refusals dropped"))
    assert run(hello_barrier(limited)) == []
    assert [f.messages for f in flood] == [[]] * 5
    assert dropped("rate_limited") - before == 5
    assert len(env.usage()) == 2
    run(serves(other))  # another device of the product is not limited by this one


def test_a_flood_of_json_gets_one_rate_limited_without_id_and_is_counted(
        make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1, ENSOUL_INFERENCE_DEVICE_MESSAGES_PER_SECOND=2)  # bursts of 4
    before = dropped("flood")
    flood = [env.device.begin(f"flood {n}", max_output_tokens=1) for n in range(10)]

    run(until(lambda: dropped("flood") - before >= 6, what="6 messages dropped"))
    run(until(lambda: sum(r.done.is_set() for r in flood) >= 4, what="4 requests answered"))
    # The barrier is an audio frame: flood control does not apply to it.
    env.device.send_raw(b"\x01", "up/audio", qos=1)
    unsolicited = []
    while not unsolicited or unsolicited[-1].get("message", "").find("header") < 0:
        unsolicited.append(run(asyncio.wait_for(env.device.unsolicited.get(), 10)))

    assert dropped("flood") - before == 6
    [error, audio_error] = unsolicited
    check_error(error, "rate_limited", retry_after=1.0, says="dropped")
    check_error(audio_error, "bad_request", says="header")
    assert [len(terminals(r)) for r in flood] == [1] * 4 + [0] * 6
    assert all(r.terminal["type"] == "end" for r in flood[:4])  # type: ignore[index]


def test_concurrency_limited_while_a_slow_stream_is_open(make_env: Callable[..., Env],
                                                          run: Any) -> None:
    env = make_env(1, ENSOUL_INFERENCE_CONCURRENT_STREAMS=1, **SLOW)
    slow = env.device.begin("Tell me a long story")
    run(next_of(slow, "start"))

    second = run(env.device.ask("And another?"))
    check_error(one_terminal(second), "concurrency_limited", request_id=second.request_id,
                retry_after=1.0)
    assert len(second.messages) == 1
    assert slow.terminal is None, "the slow stream was still open"

    env.device.abort(slow)
    end = run(done(slow))
    run(serves(env.device, finish="length", max_output_tokens=1))  # the slot is free again
    assert one_terminal(slow) is end and end["finish"] == "abort"
    check_recorded(env, end, "abort")


def test_daily_cap_reached(make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(2, ENSOUL_INFERENCE_DAILY_REQUEST_CAP=2)
    capped, other = env.clients
    run(serves(capped))
    run(serves(capped))

    for _ in range(2):  # every refusal is answered: the cap is not a flood
        reply = run(capped.ask("One more?"))
        # After the tenant's local midnight: docs/protocol.md section 9, no retry_after.
        check_error(one_terminal(reply), "daily_cap_reached", request_id=reply.request_id)
        assert len(reply.messages) == 1
    hello = run(hello_answer(capped))[0]
    assert hello["type"] == "hello" and hello["limits"]["daily_request_cap"] == 2
    assert len(env.usage()) == 2
    run(serves(other))


def test_a_duplicate_while_the_original_is_in_flight(make_env: Callable[..., Env],
                                                      run: Any) -> None:
    env = make_env(1, **SLOW)
    original = env.device.begin("Once upon a time")
    run(next_of(original, "start"))
    env.device.send(request(original.request_id, text="Once upon a time"))

    duplicate = run(next_of(original, "error"))
    check_error(duplicate, "duplicate_request", request_id=original.request_id)
    assert original.terminal is None or original.terminal is duplicate
    env.device.abort(original)
    run(done(original))
    run(serves(env.device, finish="length", max_output_tokens=1))

    end = one_terminal(original)
    assert end["type"] == "end" and end["finish"] == "abort"
    assert [m["type"] for m in original.messages].count("start") == 1
    assert [m for m in original.messages if m["type"] == "error"] == [duplicate]
    check_recorded(env, end, "abort")


def test_a_duplicate_after_the_original_finished(make_env: Callable[..., Env],
                                                 run: Any) -> None:
    env = make_env(1)
    first = run(serves(env.device))
    again = track(env.device, first.request_id)
    count = len(again.messages)
    env.device.send(request(first.request_id))
    run(serves(env.device))

    [duplicate] = again.messages[count:]
    check_error(duplicate, "duplicate_request", request_id=first.request_id)
    assert len(env.usage()) == 2


# --- follow-ups: unknown_request, abort, offline --------------------------------------------


def test_listen_stop_for_an_unknown_id_on_the_route(make_env: Callable[..., Env],
                                                    run: Any) -> None:
    env = make_env(1)
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send({"type": "listen", "state": "stop", "id": rid}, route=env.route)

    run(serves(env.device))

    assert len(reply.messages) == 1, reply.messages
    check_error(reply.messages[0], "unknown_request", request_id=rid)


def test_listen_stop_for_an_unknown_id_on_the_shared_topic(make_env: Callable[..., Env],
                                                           run: Any) -> None:
    env = make_env(1)
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send({"type": "listen", "state": "stop", "id": rid})

    # On the shared topic the broker first looks the owner up in Redis: the answer comes
    # from a task of its own, so a later request's end is no barrier for it.
    run(until(lambda: reply.messages, what="the answer to listen stop"))
    run(serves(env.device))

    assert len(reply.messages) == 1, reply.messages
    check_error(reply.messages[0], "unknown_request", request_id=rid)


@pytest.mark.parametrize(("use_route", "after"), [
    pytest.param(True, "delta", id="on-the-route-after-a-delta"),
    pytest.param(False, "start", id="on-the-shared-topic-after-the-start"),
])
def test_abort_ends_with_finish_abort_and_usage_recorded(
        make_env: Callable[..., Env], run: Any, use_route: bool, after: str) -> None:
    env = make_env(1, **SLOW)
    reply = env.device.begin("Tell me a long story")
    run(next_of(reply, after))
    env.device.abort(reply, use_route=use_route)

    end = run(done(reply))
    run(serves(env.device, finish="length", max_output_tokens=1))

    assert one_terminal(reply) is end and end["finish"] == "abort"
    schema_check(end)
    # Aborted mid-answer; once a delta arrived, its tokens are counted.
    assert (1 if after == "delta" else 0) <= end["usage"]["output_tokens"] < 12
    check_recorded(env, end, "abort")


class Spy:
    """The platform's service account listening on a device's routes."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.link: MqttLink | None = None

    async def start(self, app: Any, topic: str) -> None:
        self.link = MqttLink(platform_target(app.config), f"spy-{uuid.uuid4().hex[:8]}",
                             lambda t, p: self.seen.append((t, p)), subscriptions=[(topic, 1)])
        await self.link.start()
        await asyncio.wait_for(self.link.subscribed.wait(), 10)

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.stop()


def test_abort_on_the_shared_topic_is_forwarded_to_the_stream_owner(
        make_env: Callable[..., Env], start_broker: Callable[..., BrokerThread],
        run: Any) -> None:
    env = make_env(1, **SLOW)
    other = start_broker()
    wait_until(other.broker.link.subscribed.is_set, 10, what="the second broker")  # type: ignore[union-attr]
    spy = Spy()
    run(spy.start(env.app, f"{env.device.prefix}/up/r/+"))
    try:
        # Mosquitto hands the shared topic out in turn: an abort lands on the other broker
        # at the latest after a few tries, and that one must forward it to the owner.
        for _attempt in range(8):
            reply = env.device.begin("Tell me a long story")
            start = run(next_of(reply, "start"))
            spy.seen.clear()
            env.device.abort(reply, use_route=False)
            end = run(done(reply))
            assert one_terminal(reply) is end and end["finish"] == "abort", reply.messages
            check_recorded(env, end, "abort")
            if spy.seen:
                break
        else:
            pytest.fail("no abort reached the broker that does not own the stream")
        assert [topic for topic, _ in spy.seen] == [f"{env.device.prefix}/{start['route']}"]
        assert json.loads(spy.seen[0][1]) == {"type": "abort", "id": reply.request_id}
        run(serves(env.device, finish="length", max_output_tokens=1))
    finally:
        run(spy.stop())


def test_two_aborts_in_a_row_still_give_one_end(make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1, **SLOW)
    reply = env.device.begin("Tell me a long story")
    run(next_of(reply, "delta"))
    env.device.abort(reply)
    env.device.abort(reply)  # a user pressing the button twice

    end = run(done(reply, timeout=10))
    run(serves(env.device, finish="length", max_output_tokens=1))

    assert one_terminal(reply) is end and end["finish"] == "abort"
    check_recorded(env, end, "abort")


def test_an_abort_that_overtakes_start_aborts_the_request(make_env: Callable[..., Env],
                                                         run: Any) -> None:
    """The device knows no route yet: it aborts on ``up`` right after its request, so the
    abort reaches the broker while the request is still being admitted."""
    env = make_env(1, **SLOW)
    reply = env.device.begin("Never mind")
    env.device.abort(reply, use_route=False)

    end = run(done(reply, timeout=10))
    run(serves(env.device, finish="length", max_output_tokens=1))

    assert one_terminal(reply) is end and end["type"] == "end", reply.messages
    assert end["finish"] == "abort", reply.messages
    assert [m for m in reply.messages if m["type"] == "error"] == []
    check_recorded(env, end, "abort")


def test_a_voice_turn_whose_audio_and_stop_overtake_start_is_answered(
        make_env: Callable[..., Env], run: Any) -> None:
    """A device that streams its buffered audio right behind ``listen start`` (before
    ``start`` came back): the frames and the stop are kept for the turn."""
    env = make_env(1)
    packets = encode_pcm_to_frames(synth_tone(240, 16000), UPLINK)  # 4 frames of 60 ms
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send({"type": "listen", "state": "start", "id": rid, "options": {"speak": False}})
    for seq, packet in enumerate(packets):
        env.device.send_raw(pack_frame(packet, seq=seq), "up/audio", qos=1)
    env.device.send({"type": "listen", "state": "stop", "id": rid})

    end = run(done(reply))
    run(serves(env.device))

    assert one_terminal(reply) is end and end["type"] == "end", reply.messages
    assert [m["text"] for m in reply.of_type("transcript")] == ["240 milliseconds of audio"]
    assert end["usage"]["audio_in_ms"] == 240
    assert [m for m in reply.messages if m["type"] == "error"] == []


@pytest.mark.parametrize("where", ["shared topic", "route"])
def test_an_abort_for_an_unknown_id(make_env: Callable[..., Env], run: Any, where: str) -> None:
    env = make_env(1)
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send({"type": "abort", "id": rid}, route=env.route if where == "route" else None)

    if where != "route":  # the owner is looked up in Redis first (see the listen stop test)
        run(until(lambda: reply.messages, what="the answer to abort"))
    run(serves(env.device))

    if where == "route":
        assert reply.messages == []  # an abort on a route for an unknown id gets no answer
    else:
        [error] = reply.messages
        check_error(error, "unknown_request", request_id=rid)


def test_a_stopping_broker_ends_its_streams_with_internal_and_usage(
        make_env: Callable[..., Env], start_broker: Callable[..., BrokerThread],
        run: Any) -> None:
    env = make_env(1, **SLOW)
    reply = env.device.begin("Tell me a long story")
    run(next_of(reply, "delta"))

    env.thread.stop()
    env.thread._loop = None  # stopped for good: the fixture's stop() must not touch its loop
    error = run(done(reply))

    check_error(one_terminal(reply), "internal", request_id=reply.request_id, usage=True,
                retry_after=1.0, says="shutting down")
    check_recorded(env, error, "error", "internal")
    thread = start_broker()
    wait_until(thread.broker.link.subscribed.is_set, 10, what="the new broker")  # type: ignore[union-attr]
    run(serves(env.device, finish="length", max_output_tokens=1))


@pytest.mark.parametrize("status", [OFFLINE, b'{"state":"offline"}', b""],
                         ids=["offline", "offline compact", "cleared"])
def test_a_device_going_offline_cancels_its_stream(make_env: Callable[..., Env], run: Any,
                                                   status: bytes) -> None:
    env = make_env(1, **SLOW)
    reply = env.device.begin("Tell me a long story")
    run(next_of(reply, "delta"))
    assert env.device.link is not None
    env.device.link.client.publish(f"{env.device.prefix}/status", status, qos=1, retain=True)

    end = run(done(reply, timeout=10))
    env.device.link.client.publish(f"{env.device.prefix}/status", ONLINE, qos=1, retain=True)
    run(serves(env.device, finish="length", max_output_tokens=1))

    assert one_terminal(reply) is end and end["finish"] == "abort"
    check_recorded(env, end, "abort")


# --- audio and time: bad_audio, timeout ---------------------------------------------------


def test_a_garbage_opus_packet_ends_the_voice_turn_with_bad_audio(
        make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1)
    packets = encode_pcm_to_frames(synth_tone(240, 16000), UPLINK)  # 4 frames of 60 ms
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send({"type": "listen", "state": "start", "id": rid, "options": {"speak": False}})
    start = run(next_of(reply, "start"))
    assert start["listening"] is True
    audio = f"{start['route']}/audio"
    for seq, packet in enumerate(packets):
        env.device.send_raw(pack_frame(packet, seq=seq), audio, qos=1)
    env.device.send_raw(pack_frame(b"\x03", seq=len(packets)), audio, qos=1)  # not Opus

    error = run(done(reply))
    run(serves(env.device))

    check_error(one_terminal(reply), "bad_audio", request_id=rid, usage=True, says="opus")
    assert error["usage"]["audio_in_ms"] == 240
    check_recorded(env, error, "error", "bad_audio")
    good = run(env.device.voice_turn(packets, speak=False))
    assert one_terminal(good)["type"] == "end"


def test_a_slow_answer_times_out(fake_openai: FakeOpenAI, make_env: Callable[..., Env],
                                 run: Any) -> None:
    env = make_env(1, ENSOUL_INFERENCE_REQUEST_TIMEOUT_SECONDS=1.0)
    reply = run(env.device.ask("[fake:slow] Think hard"))
    run(serves(env.device))

    error = one_terminal(reply)
    check_error(error, "timeout", request_id=reply.request_id, usage=True)
    assert [m["type"] for m in reply.messages] == ["start", "error"]
    check_recorded(env, error, "error", "timeout")


def test_a_voice_turn_never_stopped_times_out(make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1, ENSOUL_INFERENCE_REQUEST_TIMEOUT_SECONDS=0.5)
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send({"type": "listen", "state": "start", "id": rid})

    error = run(done(reply))
    run(serves(env.device))

    check_error(one_terminal(reply), "timeout", request_id=rid, usage=True)
    check_recorded(env, error, "error", "timeout")


def test_a_voice_turn_that_goes_quiet_times_out(make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1, ENSOUL_INFERENCE_TURN_IDLE_SECONDS=0.3)
    packets = encode_pcm_to_frames(synth_tone(120, 16000), UPLINK)
    rid = new_request_id()
    reply = track(env.device, rid)
    env.device.send({"type": "listen", "state": "start", "id": rid})
    start = run(next_of(reply, "start"))
    for seq, packet in enumerate(packets):
        env.device.send_raw(pack_frame(packet, seq=seq), f"{start['route']}/audio", qos=1)

    error = run(done(reply))
    run(serves(env.device))

    check_error(one_terminal(reply), "timeout", request_id=rid, usage=True, says="no audio")
    assert error["usage"]["audio_in_ms"] == 120
    check_recorded(env, error, "error", "timeout")


# --- provider failures ------------------------------------------------------------------------


@pytest.mark.parametrize("scenario,code,retry_after,deltas", [
    ("429", "provider_unavailable", 7.0, 0),
    ("500", "provider_unavailable", ABSENT, 0),
    ("cut", "provider_error", ABSENT, 3),
    ("malformed", "provider_error", ABSENT, 3),
])
def test_provider_failures(fake_openai: FakeOpenAI, make_env: Callable[..., Env], run: Any,
                           scenario: str, code: str, retry_after: Any, deltas: int) -> None:
    env = make_env(1)
    reply = run(env.device.ask(f"[fake:{scenario}] Hello"))
    run(serves(env.device))

    error = one_terminal(reply)
    check_error(error, code, request_id=reply.request_id, usage=True, retry_after=retry_after)
    assert "".join(m["text"] for m in reply.of_type("delta")) == "".join(
        ["Hello", " there", "."][:deltas])
    check_recorded(env, error, "error", code)


def test_a_provider_answering_400_is_a_provider_error(fake_openai: FakeOpenAI,
                                                      make_env: Callable[..., Env],
                                                      run: Any) -> None:
    env = make_env(1)
    fake_openai.next_scenario("500", status=400)
    reply = run(env.device.ask("Hello"))
    run(serves(env.device))

    error = one_terminal(reply)
    check_error(error, "provider_error", request_id=reply.request_id, usage=True)
    check_recorded(env, error, "error", "provider_error")


def test_an_unreachable_provider_is_unavailable(make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1)
    config = env.use_provider(base_url=f"http://127.0.0.1:{free_port()}/v1")
    reply = run(env.device.ask("Hello?"))

    error = one_terminal(reply)
    check_error(error, "provider_unavailable", request_id=reply.request_id, usage=True)
    check_recorded(env, error, "error", "provider_unavailable")
    env.back_to_local(config)
    run(serves(env.device))


def test_a_duplicate_while_a_held_original_streams_then_it_ends_normally(
        fake_openai: FakeOpenAI, make_env: Callable[..., Env], run: Any) -> None:
    env = make_env(1)
    fake_openai.next_scenario("normal", hold_after=2)
    original = env.device.begin("Hello")
    run(next_of(original, "delta"))
    env.device.send(request(original.request_id, text="Hello"))

    duplicate = run(next_of(original, "error"))
    fake_openai.release()
    end = run(done(original))
    run(serves(env.device))

    check_error(duplicate, "duplicate_request", request_id=original.request_id)
    assert one_terminal(original) is end and end["finish"] == "stop"
    assert original.text == "Hello there. How can I help you today?"
    check_recorded(env, end, "stop")


def test_a_provider_that_cannot_be_built_does_not_leak_the_stream_slot(
        make_env: Callable[..., Env], run: Any, redis_client: Any) -> None:
    """A provider whose settings cannot be used (here an API key that does not decrypt, as
    after an encryption-key rotation) must still settle the admitted request: its terminal
    says so and the device's stream slot is free again once the settings are fixed."""
    env = make_env(1, ENSOUL_INFERENCE_CONCURRENT_STREAMS=1)
    config = env.use_provider(base_url="http://127.0.0.1:9/v1", api_key="sk-rotated-away-1234")
    config.api_key_encrypted = "not-a-token"  # what a rotated encryption key leaves behind
    db.session.commit()
    env.reproject()
    reply = run(env.device.ask("Hello?"))
    error = one_terminal(reply)
    assert error["type"] == "error" and error["id"] == reply.request_id, error

    env.back_to_local(config)
    run(serves(env.device))
    assert not redis_client.hgetall(keys(env.prefix, env.tenant_id)["inflight"])
