"""Billing test helpers: a plan and a package offer as platform admins set them up, and seats
bought and marked paid through the real services."""

from __future__ import annotations

import uuid
from typing import Any

from billing import catalog, purchases
from billing.models import LicencePack, PackageOffer, Plan
from core.db import db


def make_plan(**options: Any) -> Plan:
    values: dict[str, Any] = {"term_months": 12, "grace_days": 14, "allowance_credits": 300,
                              "prices": {"EUR": (1200, "0.1"), "CNY": (9000, "0.7")}}
    values.update(options)
    plan = catalog.create_plan(f"plan-{uuid.uuid4().hex[:8]}", "Companion yearly", **values)
    db.session.commit()
    return plan


def make_offer(credits: int = 10_000, validity_days: int = 90) -> PackageOffer:
    offer = catalog.create_package_offer(f"pkg-{uuid.uuid4().hex[:8]}", "Starter credits",
                                         credits, validity_days, {"EUR": 900, "CNY": 6500})
    db.session.commit()
    return offer


def buy_seats(tenant_id: uuid.UUID, plan: Plan, seats: int, currency: str = "EUR"
              ) -> tuple[LicencePack, list[uuid.UUID]]:
    purchase = purchases.order_pack(tenant_id, currency, plan.id, seats)
    licensed = purchases.mark_paid(purchase)
    db.session.commit()
    [pack] = [p for p in purchases.packs(tenant_id) if p.purchase_id == purchase.id]
    return pack, licensed
