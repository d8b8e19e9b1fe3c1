"""Postpaid plans: devices licensed without seats, billed in arrears by device-days."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from billing import catalog, postpaid
from billing.models import PlanBilling
from core.db import db
from fleet import services
from fleet.models import DeviceEvent
from inference.units import Units
from tests.billing.credit import RATES, billed_tenant, buy_package, run
from tests.billing.helpers import make_plan

pytestmark = pytest.mark.usefixtures("committed_app")


def postpaid_plan(**options: Any) -> Any:
    plan = make_plan(billing=PlanBilling.POSTPAID, term_months=1,
                     prices={"EUR": (310, "0.1")}, **options)
    catalog.publish_rate_card(plan, RATES)
    db.session.commit()
    return plan


def use_postpaid(client: Any, billed: Any, plan: Any) -> Any:
    return client.put("/api/v1/billing/policy", headers=billed.headers,
                      json={"overage_allowed": False, "postpaid_plan_id": str(plan.id)})


def test_a_postpaid_tenants_devices_are_served_without_seats(client: Any) -> None:
    billed = billed_tenant(seats=0)
    buy_package(billed.tenant_id, 100)
    assert billed.profile().licence["state"] == "none"
    plan = postpaid_plan(allowance_credits=50)
    assert use_postpaid(client, billed, plan).status_code == 200
    licence = billed.profile().licence
    assert licence["state"] == "licensed" and licence["billing"] == "postpaid"

    async def scenario(hook: Any) -> Any:
        return await hook.admit(billed.profile(), uuid.uuid4().hex, "text", Units(),
                                stream_id="s-postpaid", owner="test")
    admission = run(scenario)
    assert admission.state["reserved"] == 1  # from the allowance: 50 credits a month
    assert admission.budget.output_tokens == 100


def test_only_a_postpaid_plan_sold_in_the_tenants_currency_can_be_chosen(client: Any) -> None:
    billed = billed_tenant(seats=0)
    response = use_postpaid(client, billed, billed.plan)  # a prepaid plan
    assert response.status_code == 422
    assert "postpaid_plan_id" in response.get_json()["error"]["details"]
    dollars = make_plan(billing=PlanBilling.POSTPAID, prices={"USD": (100, "0.1")})
    assert use_postpaid(client, billed, dollars).status_code == 422


def test_device_days_count_each_local_day_a_device_was_active() -> None:
    billed = billed_tenant(devices=2, seats=0)
    plan = postpaid_plan()
    from billing import policy
    policy.set_policy(billed.tenant_id, overage_allowed=False, overage_cap_credits=None,
                      auto_renew=False, postpaid_plan_id=plan.id)
    first, second = billed.devices
    services.change_status(first, "suspend")
    services.change_status(first, "resume")
    services.change_status(second, "retire")
    db.session.commit()
    at = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    times = {  # the history, moved into November (UTC, the test tenant's zone)
        (first.id, "activated"): at + dt.timedelta(days=2, hours=23),  # 3rd
        (first.id, "suspend"): at + dt.timedelta(days=4, hours=1),  # 5th
        (first.id, "resume"): at + dt.timedelta(days=9, hours=12),  # 10th
        (second.id, "activated"): at + dt.timedelta(days=28),  # 29th
        (second.id, "retire"): at + dt.timedelta(days=28, hours=5),  # the same day
    }
    for event in db.session.query(DeviceEvent).filter(
            DeviceEvent.device_id.in_([first.id, second.id])):
        if (event.device_id, event.kind) in times:
            event.created_at = times[(event.device_id, event.kind)]
    db.session.commit()
    days = postpaid.device_days(billed.tenant_id, "2026-11", "UTC",
                                at=dt.datetime(2026, 12, 5, tzinfo=dt.UTC))
    # first: 3rd-5th (3 days), then 10th-30th (21 days); second: the 29th.
    assert days == {first.id: 24, second.id: 1}
    statement = postpaid.statement(billed.tenant_id, "2026-11", "UTC", "EUR",
                                   at=dt.datetime(2026, 12, 5, tzinfo=dt.UTC))
    assert statement.device_days == 25 and statement.devices == 2
    assert statement.device_days_amount_minor == 25 * 310 // 30  # 258.33 -> 258


def test_the_statement_endpoint_refuses_a_malformed_month(client: Any) -> None:
    billed = billed_tenant(seats=0)
    response = client.get("/api/v1/billing/statement?month=2026-13", headers=billed.headers)
    assert response.status_code == 422
    body = client.get("/api/v1/billing/statement", headers=billed.headers).get_json()
    assert body["device_days"] == 0 and body["total_minor"] == 0
