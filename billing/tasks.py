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
def repair_embedded_balances() -> int:
    """The embedded profile's Redis lives in the ``serve`` process, so a purchase marked paid
    from the command line (another process) reaches it only through this repair, every
    minute, of tenants with no stream in flight."""
    from accounts.models import Tenant

    repaired = 0
    for tenant_id in list(db.session.scalars(select(Tenant.id))):
        differences, done = balances.reconcile(tenant_id, repair=True)
        repaired += len(differences) if done else 0
    return repaired


EMBEDDED_REPAIR_SECONDS = 60


@app_job
def auto_renew_licences() -> int:
    return licences.auto_renew()


AUTO_RENEW_SECONDS = 3600


def periodic_jobs(config: Mapping[str, Any]) -> list[tuple[int, Callable[[], Any]]]:
    from billing import notification_tasks as notices

    jobs = [(EXPIRE_SECONDS, expire_packages), (RECONCILE_SECONDS, reconcile_balances),
            (notices.CHECK_SECONDS, notices.check_notifications),
            (notices.LICENCES_SECONDS, notices.check_licences_ending),
            (notices.DISPATCH_SECONDS, notices.dispatch_webhooks),
            (AUTO_RENEW_SECONDS, auto_renew_licences)]
    if config.get("EMBEDDED"):
        jobs.append((EMBEDDED_REPAIR_SECONDS, repair_embedded_balances))
    return jobs
