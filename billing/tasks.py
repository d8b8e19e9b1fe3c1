"""Billing's periodic jobs: close expired packages, check Redis against the ledger."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import select

from billing import balances, licences
from core.db import db
from core.queue import app_job

log = logging.getLogger(__name__)

EXPIRE_SECONDS = 300
RECONCILE_SECONDS = 3600


@app_job
def expire_packages() -> int:
    return balances.expire_packages()


@app_job
def reconcile_balances() -> int:
    """Report (in the log) every account whose Redis balance differs from the ledger (repair
    only with ``flask billing-reconcile --repair``); forget allowances of past months."""
    from accounts.models import Tenant

    differing = 0
    for tenant_id in list(db.session.scalars(select(Tenant.id))):
        balances.prune_allowances(tenant_id)
        differences, _ = balances.reconcile(tenant_id)
        differing += len(differences)
    return differing


@app_job
def auto_renew_licences() -> int:
    return licences.auto_renew()


AUTO_RENEW_SECONDS = 3600


def periodic_jobs(config: Mapping[str, Any]) -> list[tuple[int, Callable[[], Any]]]:
    from billing import notification_tasks as notices

    return [(EXPIRE_SECONDS, expire_packages), (RECONCILE_SECONDS, reconcile_balances),
            (notices.CHECK_SECONDS, notices.check_notifications),
            (notices.LICENCES_SECONDS, notices.check_licences_ending),
            (notices.DISPATCH_SECONDS, notices.dispatch_webhooks),
            (AUTO_RENEW_SECONDS, auto_renew_licences)]
