"""One simulated device: a paho client driven by an asyncio loop, with no thread of its own.

paho's threaded loop costs a thread per client, which caps a Python load generator near 50
clients (shared/MEASURED.md). Here the worker's event loop drives each socket (the broker's own
driver, :class:`core.mqtt_loop.LoopSocket`, with TCP_NODELAY) and one timer drives every
client's keepalive, so a worker process holds thousands of devices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bench.simulator.identity import DeviceIdentity
from core.mqtt_loop import LoopSocket

log = logging.getLogger(__name__)

ONLINE = json.dumps({"state": "online"})
OFFLINE = json.dumps({"state": "offline"})
SUBSCRIBED_SUFFIXES = ("down", "down/audio", "config")
# CONNACK codes that mean "your credentials are refused": stop, never retry (STYLE rule 12).
AUTH_REFUSALS = {"Not authorized", "Bad user name or password"}

MessageHandler = Callable[["AsyncDevice", str, bytes], None]


class AsyncDevice:
    """A device that connects, announces itself (retained online status with a last will,
    retained state with its firmware version), keeps presence and can publish on its topics."""

    def __init__(self, identity: DeviceIdentity, loop: asyncio.AbstractEventLoop, *,
                 keepalive: int = 60, on_message: MessageHandler | None = None) -> None:
        self.identity = identity
        self.loop = loop
        self.keepalive = keepalive
        self.on_message = on_message
        self.inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.connected = False
        self.stopping = False
        self.refused = False
        self.connect_seconds: float | None = None
        self.failure: str | None = None
        self.disconnects = 0
        self.received = 0
        self.published = 0
        self._connack: asyncio.Future[str | None] | None = None
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=identity.client_id)
        client.username_pw_set(identity.username, identity.password)
        client.will_set(identity.topic("status"), OFFLINE, qos=1, retain=True)
        self.socket = LoopSocket(client, loop)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    # --- MQTT events -------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason) in AUTH_REFUSALS
            self._resolve(str(reason))
            return
        self.connected = True
        for suffix in SUBSCRIBED_SUFFIXES:  # resubscribe on every connect
            client.subscribe(self.identity.topic(suffix), qos=1)
        self.publish("status", ONLINE, qos=1, retain=True)
        self.publish("state", json.dumps({"firmware_version": self.identity.firmware_version}),
                     qos=1, retain=True)
        self._resolve(None)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Any) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected:
            self.disconnects += 1
        self._resolve(f"disconnected: {reason}")
        if not self.stopping and was_connected and not self.refused:
            self.loop.call_later(1.0, self._reconnect)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.received += 1
        if self.on_message is not None:
            self.on_message(self, message.topic, message.payload)
        self.inbox.put_nowait((message.topic, message.payload))

    def _resolve(self, failure: str | None) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(failure)

    # --- what a worker or a behaviour calls --------------------------------------------

    async def connect(self, timeout: float = 30.0) -> bool:
        """Connect and wait for the CONNACK; record how long it took or why it failed."""
        self._connack = self.loop.create_future()
        started = time.monotonic()
        try:
            # A blocking TCP connect, but to loopback with a bounded number in flight.
            self.client.connect(self.identity.host, self.identity.port, self.keepalive)
            failure = await asyncio.wait_for(self._connack, timeout)
        except OSError as exc:
            failure = f"socket: {exc.strerror or exc}"
        except TimeoutError:
            failure = "timeout waiting for CONNACK"
        if failure is None:
            self.connect_seconds = time.monotonic() - started
            self.failure = None
            return True
        self.failure = failure
        if self.socket.sock is not None:
            self.client.disconnect()
        return False

    def _reconnect(self) -> None:
        if self.stopping or self.connected:
            return
        try:
            self.client.reconnect()
        except OSError:
            self.loop.call_later(2.0, self._reconnect)

    def publish(self, suffix: str, payload: str | bytes, *, qos: int = 0,
                retain: bool = False) -> None:
        self.client.publish(self.identity.topic(suffix), payload, qos=qos, retain=retain)
        self.published += 1

    def tick(self) -> None:
        """Keepalive pings and QoS retries; the worker calls this about once a second."""
        if self.socket.sock is not None:
            self.client.loop_misc()

    def disconnect(self, *, announce_offline: bool = True) -> None:
        """A clean disconnect sends no last will, so an orderly shutdown says offline first."""
        self.stopping = True
        if self.connected:
            if announce_offline:
                self.publish("status", OFFLINE, qos=0, retain=True)
            self.client.disconnect()
