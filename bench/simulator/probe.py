"""Wait until the broker accepts a device: the end of provisioning as the device sees it."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.simulator.identity import DeviceIdentity


def try_connect(identity: DeviceIdentity, timeout: float = 2.0) -> str | None:
    """One connection attempt: ``None`` when accepted, else the reason."""
    done = threading.Event()
    result: dict[str, str | None] = {"reason": "timeout waiting for CONNACK"}

    def on_connect(client: paho.Client, userdata: object, flags: object, reason: object,
                   properties: object) -> None:
        result["reason"] = str(reason) if getattr(reason, "is_failure", False) else None
        done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"{identity.client_id}-probe-{uuid.uuid4().hex[:6]}")
    client.username_pw_set(identity.username, identity.password)
    client.on_connect = on_connect
    client.on_socket_open = lambda c, u, sock: sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client.connect(identity.host, identity.port, keepalive=10)
    except OSError as exc:
        return f"socket: {exc}"
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        client.loop(timeout=0.01)
    client.disconnect()
    return result["reason"]


def wait_until_accepted(identity: DeviceIdentity, timeout: float = 30.0) -> float:
    """Seconds until the broker accepts ``identity``; raise ``TimeoutError`` past ``timeout``."""
    started = time.monotonic()
    reason: str | None = "never tried"
    while time.monotonic() - started < timeout:
        reason = try_connect(identity)
        if reason is None:
            return time.monotonic() - started
        time.sleep(0.005)  # polling interval between attempts, not synchronisation
    raise TimeoutError(f"{identity.username} not accepted within {timeout}s: {reason}")
