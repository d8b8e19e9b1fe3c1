"""The embedded profile's in-process MQTT broker (amqtt), run on its own thread and loop.

amqtt has no ``$share`` subscriptions and no ``%u`` ACL patterns; the embedded profile runs a
single broker process and applies device rules through amqtt's auth and topic plugins
(``fleet.broker_access.embedded.broker_plugins``), handed in by whoever starts it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from amqtt.broker import Action, Broker

from core.mqtt import MqttTarget

log = logging.getLogger(__name__)


class _SnapshotSubscriptions(dict[str, list[Any]]):
    """amqtt 0.12 iterates its subscription table across an ``await`` (the topic plugin) while
    broadcasting; a client subscribing meanwhile raised "dictionary changed size during
    iteration" and the message was dropped for every subscriber. Iterating a snapshot fixes
    that without copying amqtt's broadcast loop."""

    def items(self) -> list[tuple[str, list[Any]]]:  # type: ignore[override]
        return [(key, list(value)) for key, value in super().items()]


class _Broker(Broker):
    """amqtt 0.12 with retained messages sent only where they belong.

    On every CONNECT amqtt replays the retained messages matching *every* subscription in the
    broker (meant for a resumed session's own ones) to the new client: any device received
    every other device's retained ``status`` and ``state``, other tenants' too, because the
    platform's presence tracker subscribes ``t/+/d/+/status``. Here a retained message goes
    to a session only for a subscription it holds itself, and only if the topic plugin lets it
    receive that topic."""

    async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any) -> None:
        topic_filter = subscription[0]
        held = [qos for holder, qos in self._subscriptions.get(topic_filter, [])
                if holder is session]
        handler = self._get_handler(session)
        if not held or handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter) or not await self._topic_filtering(
                    session, topic=topic, action=Action.RECEIVE):
                continue
            sends.append(asyncio.ensure_future(handler.mqtt_publish(
                retained.topic, retained.data, min(held[0], retained.qos or held[0]),
                retain=True)))
        if sends:
            await asyncio.wait(sends)


class EmbeddedBroker:
    def __init__(self, target: MqttTarget, plugins: dict[str, Any]) -> None:
        self.target = target
        self.plugins = plugins
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mqtt-broker",
                                        daemon=True)
        self._broker: Broker | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout)
        log.info("embedded MQTT broker listening on %s:%s", self.target.host, self.target.port)

    async def _start(self) -> None:
        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.target.host}:{self.target.port}"}
            },
            "plugins": self.plugins,
        }
        self._broker = _Broker(config, loop=self._loop)
        self._broker._subscriptions = _SnapshotSubscriptions()
        await self._broker.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
