"""rq jobs of the fleet domain. Jobs take ids, run in an app context, commit at their end."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from core.queue import app_job
from core.redis import get_redis, name

log = logging.getLogger(__name__)

RECONCILE_SECONDS = 600
RETRY_RELOAD_SECONDS = 30


@app_job
def sync_broker_access() -> dict[str, Any]:
    """Bring the MQTT broker's access data in line with the registry (debounced; see access).

    A failed Mosquitto reload raises (the job fails visibly); ``retry_broker_access_sync``
    queues it again until Mosquitto has been reloaded.
    """
    from fleet.access import SYNC_QUEUED_KEY
    from fleet.broker_access import get_broker_access

    # Cleared first: a change committed while this runs queues one more sync.
    get_redis().delete(name(SYNC_QUEUED_KEY))
    report = get_broker_access().sync()
    log.info("broker access synced: %s", report)
    return report


@app_job
def reconcile_broker_access() -> dict[str, Any]:
    """Rebuild the broker's access data from the registry after loss or tampering."""
    from fleet.broker_access import get_broker_access

    access: Any = get_broker_access()
    report: dict[str, Any] = access.reconcile()
    drift = any(report.get(k) for k in ("added", "updated", "removed", "acl_rewritten"))
    (log.warning if drift else log.info)("broker access reconciled: %s", report)
    return report


@app_job
def retry_broker_access_sync() -> bool:
    """Queue a sync while a Mosquitto reload is pending after a failure."""
    from fleet.access import schedule_sync
    from fleet.broker_access.mosquitto import reload_failure

    failure = reload_failure()
    if failure is None:
        return False
    log.warning("Mosquitto reload still pending since %s (%s); retrying", failure["at"],
                failure["error"])
    schedule_sync()
    return True


@app_job
def flush_presence() -> dict[str, int]:
    """Copy presence (last seen, reported versions) from Redis to the devices rows."""
    from fleet.presence import flush_to_database

    report = flush_to_database()
    log.info("presence flushed: %s", report)
    return report


def periodic_jobs(config: Mapping[str, Any]) -> list[tuple[int, Callable[[], Any]]]:
    """``(every seconds, job)`` pairs the ``scheduler`` process enqueues."""
    return [
        (int(config["ENSOUL_PRESENCE_FLUSH_SECONDS"]), flush_presence),
        (RECONCILE_SECONDS, reconcile_broker_access),
        (RETRY_RELOAD_SECONDS, retry_broker_access_sync),
    ]
