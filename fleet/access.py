"""Tell the MQTT broker's access control and every cache that a device's access changed.

Called by the fleet services inside the transaction; the work happens after commit: one
debounced resync of the broker's access data (a bulk import is one Mosquitto reload) and a
Redis pub/sub message so in-process caches (broker admission, auth answers) drop the device.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable

from core.db import on_commit, transaction_state
from core.redis import get_redis, name

log = logging.getLogger(__name__)
REGISTRY_CHANNEL = "registry"
SYNC_QUEUED_KEY = "mqtt-access:sync-queued"


def registry_channel() -> str:
    return name(REGISTRY_CHANNEL)


def devices_changed(tenant_id: uuid.UUID, device_ids: Iterable[uuid.UUID]) -> None:
    """Schedule, for after commit, a broker access resync and a registry invalidation."""
    pending, new = transaction_state("fleet_changed")
    pending.setdefault(str(tenant_id), set()).update(str(d) for d in device_ids)
    if new:
        on_commit(lambda: _after_commit(pending))


def _after_commit(pending: dict[str, set[str]]) -> None:
    from fleet.hooks import run_registry_hooks

    try:
        client = get_redis()
        for tenant_id, ids in pending.items():
            run_registry_hooks(uuid.UUID(tenant_id), [uuid.UUID(i) for i in sorted(ids)])
            client.publish(registry_channel(),
                           json.dumps({"tenant_id": tenant_id, "device_ids": sorted(ids)}))
        schedule_sync()
    except Exception:  # the reconciler converges later; a commit is never undone by this
        log.exception("could not signal a registry change")


def schedule_sync() -> None:
    """Queue one access resync unless one is already queued (debounce)."""
    from core.queue import enqueue
    from fleet.tasks import sync_broker_access

    if get_redis().set(name(SYNC_QUEUED_KEY), "1", nx=True, ex=300):
        enqueue(sync_broker_access)
