"""A tenant's billing policy: whether credits may run into overage (billed in arrears), up to
which monthly cap, and whether licences renew automatically."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from accounts import services as accounts
from billing.models import BillingPolicy
from core.db import db
from fleet.access import devices_changed
from fleet.models import Device


def get_policy(tenant_id: uuid.UUID) -> BillingPolicy:
    """The tenant's policy (the defaults, unsaved, when it never set one)."""
    policy = db.session.scalar(select(BillingPolicy).where(BillingPolicy.tenant_id == tenant_id))
    return policy or BillingPolicy(tenant_id=tenant_id, overage_allowed=False,
                                   overage_cap_credits=None, auto_renew=False,
                                   postpaid_plan_id=None)


def set_policy(tenant_id: uuid.UUID, *, overage_allowed: bool, overage_cap_credits: int | None,
               auto_renew: bool, postpaid_plan_id: uuid.UUID | None = None) -> BillingPolicy:
    from billing.postpaid import check_postpaid_plan

    if postpaid_plan_id is not None:
        check_postpaid_plan(postpaid_plan_id, accounts.get_tenant(tenant_id).currency)
    policy = get_policy(tenant_id)
    before = {"overage_allowed": policy.overage_allowed,
              "overage_cap_credits": policy.overage_cap_credits,
              "postpaid_plan_id": str(policy.postpaid_plan_id or "") or None}
    policy.postpaid_plan_id = postpaid_plan_id
    policy.overage_allowed = overage_allowed
    policy.overage_cap_credits = overage_cap_credits
    policy.auto_renew = auto_renew
    db.session.add(policy)
    db.session.flush()
    accounts.record_audit("billing_policy.update", tenant_id=tenant_id, target=policy,
                          details={"before": before, "overage_allowed": overage_allowed,
                                   "overage_cap_credits": overage_cap_credits,
                                   "auto_renew": auto_renew,
                                   "postpaid_plan_id": str(postpaid_plan_id or "") or None})
    # Every device's profile carries the overage limit and licence the credit hook applies.
    devices_changed(tenant_id, db.session.scalars(
        select(Device.id).where(Device.tenant_id == tenant_id)))
    return policy
