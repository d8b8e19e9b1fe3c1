"""MQTT plumbing shared by every process: URL parsing, clients with TCP_NODELAY, readiness.

``MQTT_URL`` is ``mqtt://user:password@host:port`` (``mqtts://`` for TLS) in the services
profile, or ``embedded://host:port`` for the in-process broker of the embedded profile.
"""

from __future__ import annotations

import secrets
import socket
import threading
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    embedded: bool

    @property
    def safe_url(self) -> str:
        scheme = "embedded" if self.embedded else ("mqtts" if self.tls else "mqtt")
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "embedded"):
        raise ValueError(f"MQTT_URL must start with mqtt://, mqtts:// or embedded://: {url!r}")
    tls = parts.scheme == "mqtts"
    return MqttTarget(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
        embedded=parts.scheme == "embedded",
    )


EMBEDDED_SERVICE_USER = "ensoul-platform"
EMBEDDED_PASSWORD_KEY = "ENSOUL_EMBEDDED_MQTT_PASSWORD"  # noqa: S105 - a config key


def platform_target(config: MutableMapping[str, Any]) -> MqttTarget:
    """Where and as whom the platform's own clients connect.

    ``MQTT_URL`` carries the service account in the services profile. The embedded broker runs
    in the same process: its service password is random, made once and kept in the config.
    """
    target = parse_mqtt_url(config["MQTT_URL"])
    if not target.embedded:
        return target
    password = config.setdefault(EMBEDDED_PASSWORD_KEY, secrets.token_urlsafe(24))
    return replace(target, username=EMBEDDED_SERVICE_USER, password=password)


def new_client(client_id: str, target: MqttTarget) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if target.username:
        client.username_pw_set(target.username, target.password)
    if target.tls:
        client.tls_set()
    previous = client.on_socket_open

    def _on_socket_open(c: paho.Client, userdata: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if previous is not None:
            previous(c, userdata, sock)

    client.on_socket_open = _on_socket_open
    return client


def check_reachable(target: MqttTarget, timeout: float = 3.0) -> None:
    """Connect, wait for CONNACK, disconnect; raise ``ConnectionError`` with a reason."""
    done = threading.Event()
    result: dict[str, object] = {}

    def _on_connect(c: paho.Client, u: object, flags: object, reason: object, p: object) -> None:
        result["reason"] = reason
        done.set()

    client = new_client(f"ensoul-ready-{uuid.uuid4().hex[:12]}", target)
    client.on_connect = _on_connect
    try:
        client.connect(target.host, target.port, keepalive=10)
    except OSError as exc:
        raise ConnectionError(f"cannot reach {target.safe_url}: {exc}") from exc
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise ConnectionError(f"no CONNACK from {target.safe_url} within {timeout}s")
        reason = result["reason"]
        if getattr(reason, "is_failure", False):
            raise ConnectionError(f"{target.safe_url} refused the connection: {reason}")
    finally:
        client.disconnect()
        client.loop_stop()
