"""A device's MQTT identity: username, client id and topics, and the ACL that guards them.

A device's username encodes its topic prefix: user ``{tenant}/d/{device}`` owns
``t/{tenant}/d/{device}/...``. Every rule below is one Mosquitto ACL pattern with the least
access (``%u`` is the username); the EMQX endpoint and the embedded broker apply the same table.
"""

from __future__ import annotations

import re
from typing import Any

from flask import current_app

from core.mqtt import parse_mqtt_url
from fleet.models import Device

# suffix -> access the device has ("write" = publish only, "read" = subscribe/receive only)
DEVICE_TOPICS: dict[str, str] = {
    "up": "write",  # device -> platform JSON
    "up/audio": "write",  # device -> platform binary audio frames
    "up/r/+": "write",  # a stream's follow-ups, straight to the broker process holding it
    "up/r/+/audio": "write",
    "state": "write",  # device-reported state (retained)
    "status": "write",  # presence (retained; also the last will)
    "down": "read",  # platform -> device JSON
    "down/audio": "read",  # platform -> device binary speech frames
    "config": "read",  # OTA configuration (retained)
}


ROUTE_SUFFIX = re.compile(r"up/r/[0-9A-Za-z_-]{1,32}(/audio)?")


def acl_patterns() -> list[str]:
    """The Mosquitto ACL pattern lines every device gets."""
    return [f"pattern {access} t/%u/{suffix}" for suffix, access in DEVICE_TOPICS.items()]


def device_may(username: str, topic: str, action: str) -> bool:
    """Whether ``username`` may ``publish`` or ``subscribe`` on ``topic``: exact topics only."""
    prefix = f"t/{username}/"
    if not topic.startswith(prefix) or "+" in topic or "#" in topic:
        return False
    suffix = topic[len(prefix):]
    route = ROUTE_SUFFIX.fullmatch(suffix)
    if route is not None:
        suffix = "up/r/+" + (route.group(1) or "")
    access = DEVICE_TOPICS.get(suffix)
    if access is None:
        return False
    return access == ("write" if action == "publish" else "read")


def public_endpoint() -> tuple[str, int, bool]:
    config = current_app.config
    configured = config.get("ENSOUL_MQTT_PUBLIC_ENDPOINT")
    if configured:
        host, _, port = configured.rpartition(":")
        return host, int(port), bool(config.get("ENSOUL_MQTT_PUBLIC_TLS"))
    target = parse_mqtt_url(config["MQTT_URL"])
    return target.host, target.port, target.tls


def connection_info(device: Device, password: str | None = None) -> dict[str, Any]:
    """The ``mqtt`` section of the bootstrap answer (xiaozhi-esp32 keys)."""
    host, port, tls = public_endpoint()
    info: dict[str, Any] = {
        "endpoint": f"{host}:{port}",
        "tls": tls,
        "client_id": str(device.id),
        "username": device.mqtt_username,
        "publish_topic": f"{device.topic_prefix}/up",
        "subscribe_topic": f"{device.topic_prefix}/down",
        "topic_prefix": device.topic_prefix,
        "keepalive": 240,
    }
    if password is not None:
        info["password"] = password
    return info
