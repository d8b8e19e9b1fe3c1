"""MQTT broker access control: one interface, an adapter per broker.

- ``mosquitto``: the platform owns Mosquitto's password and ACL files, rewrites them
  atomically from the registry and reloads Mosquitto (SIGHUP), debounced.
- ``emqx``: EMQX 5 calls the platform's HTTP authn/authz endpoints (``fleet.broker_access.http``);
  ``sync`` only drops cached answers.
- ``embedded``: the in-process amqtt broker asks the same rules through its plugin hooks.

All of them apply :mod:`fleet.topics` and verify passwords against the stored ``$7$`` hashes.
"""

from __future__ import annotations

from typing import Any, Protocol

from flask import current_app


class BrokerAccess(Protocol):
    def sync(self) -> dict[str, Any]:
        """Make the broker enforce the registry as it is now; report what changed."""
        ...

    def reconcile(self) -> dict[str, Any]:
        """Rebuild the broker's access data from the registry after loss or drift; report
        every difference found."""
        ...


def get_broker_access() -> BrokerAccess:
    kind = current_app.config["ENSOUL_MQTT_ACCESS"]
    if kind == "mosquitto":
        from fleet.broker_access.mosquitto import MosquittoFiles

        return MosquittoFiles.from_config(current_app.config)
    if kind == "emqx":
        from fleet.broker_access.http import HttpAuthCache

        return HttpAuthCache()
    from fleet.broker_access.embedded import EmbeddedAccess

    return EmbeddedAccess()
