"""Settled usage into the ledger: the usage writer's settled hook.

Every priced usage event becomes one ``consumption`` entry per account its credits came from
(its ``credit_split``), and the first event of a device's month also records that month's
allowance ``grant``. Entries are keyed by their cause (the event's device, request id and
admission time; the allowance account), so a batch written again after a crash posts nothing
twice.
"""

from __future__ import annotations

import uuid

from billing import ledger
from billing.models import EntryKind
from inference.usage import UsageEvent


def usage_cause(event: UsageEvent) -> str:
    return f"{event.device_id}:{event.request_id}:{event.admitted_at_ms}"


def post_usage(events: list[UsageEvent]) -> None:
    by_tenant: dict[str, dict[tuple[str, EntryKind, str], ledger.Movement]] = {}
    for event in events:
        movements = by_tenant.setdefault(event.tenant_id, {})
        cause = usage_cause(event)
        for account, credits in event.credit_split.items():
            if credits > 0:
                movements[(account, EntryKind.CONSUMPTION, cause)] = ledger.Movement(
                    account, EntryKind.CONSUMPTION, -credits, "usage_event", cause,
                    details={"request_id": event.request_id, "device_id": event.device_id})
        for account, grant in event.grants.items():
            if grant > 0:
                movements[(account, EntryKind.GRANT, account)] = ledger.Movement(
                    account, EntryKind.GRANT, grant, "allowance", account,
                    details={"device_id": event.device_id})
    for tenant_id, movements in by_tenant.items():
        ledger.post(uuid.UUID(tenant_id), movements.values(), count_new=False)
