"""One request sent as a device from the portal, and the broker's answer to it as it streams.

The web process connects as the platform's service account (its ACL covers every ``t/`` topic),
subscribes the device's ``down`` topic, publishes a protocol v1 ``request`` on its ``up``
topic and yields what the broker sends for that request id until the terminal ``end`` or
``error``. The device's own connection is left alone: another client id, no status, will or
hello. A device that is online receives the answer too, as it would its own request's, and the
request counts against the device's limits and credit like any other.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
from flask import current_app
from paho.mqtt.reasoncodes import ReasonCode

from core.mqtt import MqttTarget, new_client, platform_target
from fleet.models import Device
from inference import protocol

log = logging.getLogger(__name__)

MAX_OUTPUT_TOKENS = 512  # a try is a look at the answer, not a long generation
CONNECT_SECONDS = 5.0
TERMINAL = ("end", "error")
_SUBSCRIBED = "subscribed"  # an internal event: the SUBACK of the down topic arrived


def try_request(device: Device, text: str, timeout: float, *, request_id: str | None = None,
                max_output_tokens: int = MAX_OUTPUT_TOKENS) -> Iterator[dict[str, Any]]:
    """The messages for one ``request`` sent on ``device``'s ``up`` topic, in arrival order.

    Ends with the broker's ``end`` or ``error``, or with a local ``error`` (code ``timeout``
    when nothing terminal came within ``timeout`` seconds, ``unavailable`` when MQTT cannot be
    reached). Everything is read from ``device`` and the app now: the messages may be consumed
    after the request's app context is gone (a streamed response).
    """
    request_id = request_id or uuid.uuid4().hex
    message = {"type": "request", "id": request_id, "input": {"text": text},
               "options": {"max_output_tokens": max(1, min(max_output_tokens,
                                                           protocol.MAX_OUTPUT_TOKENS))}}
    return _follow(platform_target(current_app.config), device.topic_prefix, request_id,
                   protocol.dumps(message), timeout)


def local_error(request_id: str, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "id": request_id, "code": code, "message": message}


def _follow(target: MqttTarget, prefix: str, request_id: str, payload: bytes,
            timeout: float) -> Iterator[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    client = new_client(f"ensoul-try-{uuid.uuid4().hex[:16]}", target)
    down = f"{prefix}/{protocol.DOWN}"

    def on_connect(c: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                   properties: Any) -> None:
        if reason.is_failure:
            log.error("try: %s refused the login: %s", target.safe_url, reason)
            events.put(local_error(request_id, "unavailable", f"MQTT refused the login: {reason}"))
            c.disconnect()  # stop: retrying a refused login only hammers the broker
            return
        c.subscribe(down, qos=1)  # again on every connect: the session is not kept

    def on_subscribe(c: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                     properties: Any) -> None:
        if any(r.is_failure for r in reasons):
            events.put(local_error(request_id, "unavailable", f"MQTT refused {down}"))
        else:
            events.put({"type": _SUBSCRIBED})

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            found = json.loads(msg.payload)
        except ValueError:
            log.warning("try: %s sent something not JSON: %r", down, msg.payload[:200])
            return
        if isinstance(found, dict) and found.get("id") == request_id:
            events.put(found)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    route: str | None = None
    finished = False
    sent = False
    try:
        try:
            client.connect(target.host, target.port, keepalive=30)
        except OSError as exc:
            log.error("try: cannot reach %s: %s", target.safe_url, exc)
            yield local_error(request_id, "unavailable", f"cannot reach MQTT: {exc}")
            return
        client.loop_start()
        connect_by = min(deadline, time.monotonic() + CONNECT_SECONDS)
        while True:
            remaining = (connect_by if not sent else deadline) - time.monotonic()
            try:
                event = events.get(timeout=max(remaining, 0))
            except queue.Empty:
                if sent:
                    yield local_error(request_id, "timeout", f"no answer within {timeout:g} s")
                else:
                    yield local_error(request_id, "unavailable", "MQTT did not answer in time")
                return
            if event["type"] == _SUBSCRIBED:
                if not sent:  # a reconnect subscribes again; the request goes out once
                    client.publish(f"{prefix}/{protocol.UP}", payload, qos=1)
                    sent = True
                continue
            if event["type"] == "start":
                route = event.get("route")
            finished = event["type"] in TERMINAL
            yield event
            if finished:
                return
    finally:
        if route and not finished:
            # The reader went away (or gave up): stop the stream rather than pay for the rest.
            info = client.publish(f"{prefix}/{route}",
                                  protocol.dumps({"type": "abort", "id": request_id}), qos=1)
            try:
                info.wait_for_publish(1.0)
            except (RuntimeError, ValueError):
                pass
        client.disconnect()
        client.loop_stop()
