"""rq jobs of the fleet domain. Jobs take ids, run in an app context, commit at their end."""

from __future__ import annotations

import logging
from typing import Any

from core.queue import app_job
from core.redis import get_redis, name

log = logging.getLogger(__name__)


@app_job
def sync_broker_access() -> dict[str, Any]:
    """Bring the MQTT broker's access data in line with the registry (debounced; see access)."""
    from fleet.access import SYNC_QUEUED_KEY
    from fleet.broker_access import get_broker_access

    # Cleared first: a change committed while this runs queues one more sync.
    get_redis().delete(name(SYNC_QUEUED_KEY))
    report = get_broker_access().sync()
    log.info("broker access synced: %s", report)
    return report
