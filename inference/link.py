"""The broker's MQTT connection: one paho client driven by the asyncio loop (no thread).

The socket is driven by :class:`core.mqtt_loop.LoopSocket` (a publish from a coroutine is
written later in the same loop turn, ``TCP_NODELAY`` on) and a timer drives keepalive.
Subscriptions are replayed on every connect; a refused login stops the link; any other loss
reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from core.mqtt import MqttTarget, new_client
from core.mqtt_loop import LoopSocket

log = logging.getLogger(__name__)

AUTH_REFUSALS = {"Not authorized", "Bad user name or password"}
MessageHandler = Callable[[str, bytes], None]


class MqttLink:
    def __init__(self, target: MqttTarget, client_id: str, on_message: MessageHandler, *,
                 subscriptions: list[tuple[str, int]], keepalive: int = 30,
                 will: tuple[str, bytes] | None = None) -> None:
        self.target = target
        self.subscriptions = subscriptions
        self.keepalive = keepalive
        self.on_message = on_message
        self.on_connected: Callable[[], None] | None = None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()  # the SUBACK of this connection's subscriptions
        self.refused = asyncio.Event()
        self.connects = 0
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._misc: asyncio.TimerHandle | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        client = new_client(client_id, target)
        self.socket = LoopSocket(client, self._loop, on_open=lambda _sock: self._schedule_misc())
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(1000)
        self.client = client

    # --- keepalive ------------------------------------------------------------------

    def _schedule_misc(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
        self._misc = self._loop.call_later(1.0, self._run_misc)

    def _run_misc(self) -> None:
        self._misc = None
        if self.client.loop_misc() == paho.MQTT_ERR_SUCCESS or self.connected.is_set():
            self._schedule_misc()

    # --- MQTT events ------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            if str(reason) in AUTH_REFUSALS:
                log.error("%s refused the broker's login: %s", self.target.safe_url, reason)
                self._stopping = True
                self.refused.set()
            return
        self.connects += 1
        self.subscribed.clear()
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        else:
            self.subscribed.set()
        self.connected.set()
        log.info("connected to %s", self.target.safe_url)
        if self.on_connected is not None:
            self.on_connected()

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self.subscribed.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        self.connected.clear()
        if self._stopping:
            return
        log.warning("lost %s (%s); reconnecting", self.target.safe_url, reason)
        self._start_reconnect()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self.on_message(message.topic, bytes(message.payload))
        except Exception:
            log.exception("message handler failed on %s", message.topic[:200])

    # --- control ----------------------------------------------------------------------

    async def start(self) -> None:
        self._start_reconnect(first=True)

    def _start_reconnect(self, first: bool = False) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = self._loop.create_task(self._reconnect(first))

    async def _reconnect(self, first: bool) -> None:
        delay = 0.1
        while not self._stopping and not self.connected.is_set():
            try:
                if first:
                    self.client.connect(self.target.host, self.target.port, self.keepalive)
                    first = False
                else:
                    self.client.reconnect()
                return  # the CONNACK arrives through the reader
            except OSError as exc:
                log.warning("cannot reach %s: %s", self.target.safe_url, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.client.publish(topic, payload, qos=qos)

    async def stop(self) -> None:
        self._stopping = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._misc is not None:
            self._misc.cancel()
        if self.connected.is_set():
            self.client.disconnect()
