"""The reference device client for protocol v1 (tests, the fleet simulator, the demo).

A small asyncio client on the same paho plumbing as the broker (TCP_NODELAY on). It says
hello, sends requests and voice turns, follows the stream's route for follow-ups, and collects
each request's messages until its terminal one::

    client = DeviceClient.from_mqtt_info(info, password)
    await client.connect()
    reply = await client.ask("What is the weather like?")
    print(reply.text, reply.terminal)
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from core.mqtt import MqttTarget
from inference.audio import Frame, pack_frame, unpack_frame
from inference.link import MqttLink

ONLINE = json.dumps({"state": "online"}).encode()
OFFLINE = json.dumps({"state": "offline"}).encode()
TERMINAL = ("end", "error")


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Reply:
    """Everything the platform sent for one request, with arrival times (perf_counter)."""

    request_id: str
    sent_at: float = 0.0
    messages: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    @property
    def start(self) -> dict[str, Any] | None:
        found = self.of_type("start")
        return found[0] if found else None

    @property
    def text(self) -> str:
        return "".join(m["text"] for m in self.of_type("delta"))

    @property
    def terminal(self) -> dict[str, Any] | None:
        found = [m for m in self.messages if m.get("type") in TERMINAL]
        return found[0] if found else None

    @property
    def first_delta_ms(self) -> float | None:
        for message, at in zip(self.messages, self.arrivals, strict=True):
            if message.get("type") == "delta":
                return (at - self.sent_at) * 1000
        return None

    def delta_gaps_ms(self) -> list[float]:
        stamps = [at for m, at in zip(self.messages, self.arrivals, strict=True)
                  if m.get("type") == "delta"]
        return [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]


class DeviceClient:
    def __init__(self, target: MqttTarget, client_id: str, topic_prefix: str) -> None:
        self.target = target
        self.client_id = client_id
        self.prefix = topic_prefix
        self.replies: dict[str, Reply] = {}
        self.by_tag: dict[int, Reply] = {}
        self.unsolicited: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.link: MqttLink | None = None

    @classmethod
    def from_mqtt_info(cls, info: dict[str, Any], password: str | None = None) -> DeviceClient:
        host, _, port = info["endpoint"].rpartition(":")
        target = MqttTarget(host=host, port=int(port), username=info["username"],
                            password=password or info.get("password"),
                            tls=bool(info.get("tls")), embedded=False)
        return cls(target, info["client_id"], info["topic_prefix"])

    async def connect(self, timeout: float = 10.0) -> None:
        self.link = MqttLink(self.target, self.client_id, self._on_message,
                             subscriptions=[(f"{self.prefix}/down", 1),
                                            (f"{self.prefix}/down/audio", 0)],
                             keepalive=60, will=(f"{self.prefix}/status", OFFLINE))
        self.link.on_connected = self._announce
        await self.link.start()
        waiter = asyncio.ensure_future(self.link.connected.wait())
        refused = asyncio.ensure_future(self.link.refused.wait())
        await asyncio.wait([waiter, refused], timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        refused.cancel()
        if not self.link.connected.is_set():
            raise ConnectionError(f"{self.target.safe_url} did not accept {self.client_id}")
        await self._subscribed()

    async def _subscribed(self, timeout: float = 10.0) -> None:
        assert self.link is not None
        await asyncio.wait_for(self.link.subscribed.wait(), timeout)

    def _announce(self) -> None:
        assert self.link is not None
        self.link.publish(f"{self.prefix}/status", ONLINE, qos=1)

    async def close(self, *, announce_offline: bool = True) -> None:
        if self.link is None:
            return
        if announce_offline and self.link.connected.is_set():
            self.link.client.publish(f"{self.prefix}/status", OFFLINE, qos=0, retain=True)
        await self.link.stop()

    # --- receiving --------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        now = time.perf_counter()
        if topic.endswith("/down/audio"):
            frame = unpack_frame(payload)
            reply = self.by_tag.get(frame.tag)
            if reply is not None:
                reply.frames.append(frame)
            return
        message = json.loads(payload)
        reply = self.replies.get(message.get("id", ""))
        if reply is None:
            self.unsolicited.put_nowait(message)
            return
        reply.messages.append(message)
        reply.arrivals.append(now)
        if message.get("type") == "start" and "tag" in message:
            self.by_tag[message["tag"]] = reply
        reply.queue.put_nowait(message)
        if message.get("type") in TERMINAL and not (
                message.get("type") == "error" and message.get("code") == "duplicate_request"):
            reply.done.set()

    # --- sending ------------------------------------------------------------------------------

    def send(self, message: dict[str, Any], *, route: str | None = None) -> None:
        assert self.link is not None
        suffix = route or "up"
        self.link.publish(f"{self.prefix}/{suffix}", json.dumps(message).encode(), qos=1)

    def send_raw(self, payload: bytes, suffix: str = "up", qos: int = 1) -> None:
        assert self.link is not None
        self.link.publish(f"{self.prefix}/{suffix}", payload, qos)

    async def hello(self, audio: dict[str, Any] | None = None,
                    audio_down: dict[str, Any] | None = None, timeout: float = 5.0
                    ) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "hello", "version": 1, "features": {}}
        if audio is not None:
            message["audio"] = audio
        if audio_down is not None:
            message["features"]["audio_down"] = audio_down
        self.send(message)
        while True:
            answer = await asyncio.wait_for(self.unsolicited.get(), timeout)
            if answer.get("type") in ("hello", "error"):
                return answer

    def begin(self, text: str | None = None, *, images: list[tuple[str, bytes]] | None = None,
              request_id: str | None = None, conversation: str | None = None,
              max_output_tokens: int | None = None, speak: bool = False) -> Reply:
        """Send a request and return its (filling) :class:`Reply` at once."""
        request_id = request_id or new_request_id()
        body: dict[str, Any] = {}
        if text is not None:
            body["text"] = text
        if images:
            body["images"] = [{"mime": mime, "data": base64.b64encode(data).decode()}
                              for mime, data in images]
        message: dict[str, Any] = {"type": "request", "id": request_id, "input": body,
                                   "options": {"speak": speak}}
        if max_output_tokens is not None:
            message["options"]["max_output_tokens"] = max_output_tokens
        if conversation is not None:
            message["conversation"] = conversation
        reply = self.replies.setdefault(request_id, Reply(request_id))
        reply.sent_at = time.perf_counter()
        self.send(message)
        return reply

    async def ask(self, text: str | None = None, *, timeout: float = 30.0, **options: Any
                  ) -> Reply:
        reply = self.begin(text, **options)
        await asyncio.wait_for(reply.done.wait(), timeout)
        return reply

    async def started(self, reply: Reply, timeout: float = 10.0) -> dict[str, Any]:
        while reply.start is None and reply.terminal is None:
            await asyncio.wait_for(reply.queue.get(), timeout)
        return reply.start or reply.terminal or {}

    def abort(self, reply: Reply, *, use_route: bool = True) -> None:
        route = reply.start.get("route") if use_route and reply.start else None
        self.send({"type": "abort", "id": reply.request_id}, route=route)

    async def voice_turn(self, packets: list[bytes], *, request_id: str | None = None,
                         conversation: str | None = None, speak: bool = True,
                         use_route: bool = True, timeout: float = 30.0) -> Reply:
        """listen start -> Opus frames -> listen stop; returns the finished reply."""
        request_id = request_id or new_request_id()
        reply = self.replies.setdefault(request_id, Reply(request_id))
        start: dict[str, Any] = {"type": "listen", "state": "start", "id": request_id,
                                 "options": {"speak": speak}}
        if conversation is not None:
            start["conversation"] = conversation
        reply.sent_at = time.perf_counter()
        self.send(start)
        started = await self.started(reply)
        if started.get("type") != "start":
            return reply
        route = started["route"] if use_route else None
        audio_suffix = f"{route}/audio" if route else "up/audio"
        for seq, packet in enumerate(packets):
            self.send_raw(pack_frame(packet, seq=seq), audio_suffix, qos=0)
        self.send({"type": "listen", "state": "stop", "id": request_id}, route=route)
        await asyncio.wait_for(reply.done.wait(), timeout)
        return reply
