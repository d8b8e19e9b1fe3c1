"""Renewing a device's licence (by hand and automatically) and its cost this month."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pytest

from billing import licences
from billing.models import BillingPolicy, DeviceLicence
from core.db import db, utcnow
from core.redis import get_redis
from inference.units import Units
from inference.usage import UsageWriter, append_event
from tests.billing.credit import billed_tenant, buy_package, event_for, run

pytestmark = pytest.mark.usefixtures("committed_app")


def test_renewal_takes_a_seat_and_starts_where_the_licence_ends(client: Any) -> None:
    billed = billed_tenant(seats=2)
    device = billed.devices[0]
    [current] = db.session.query(DeviceLicence).filter_by(device_id=device.id).all()
    response = client.post(f"/api/v1/devices/{device.id}/licence/renew", headers=billed.headers)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert dt.datetime.fromisoformat(body["starts_at"]) == current.ends_at
    again = client.post(f"/api/v1/devices/{device.id}/licence/renew", headers=billed.headers)
    assert again.status_code == 409
    assert billed.profile().licence["grace_ends"] == \
        dt.datetime.fromisoformat(body["grace_ends_at"]).timestamp()  # one window


def test_renewal_without_a_free_seat_is_a_conflict(client: Any) -> None:
    billed = billed_tenant(seats=1)
    response = client.post(f"/api/v1/devices/{billed.devices[0].id}/licence/renew",
                           headers=billed.headers)
    assert response.status_code == 409
    assert "seat" in response.get_json()["error"]["message"]


def test_automatic_renewal_renews_licences_ending_within_a_week_once() -> None:
    billed = billed_tenant(devices=2, seats=3)
    db.session.add(BillingPolicy(tenant_id=billed.tenant_id, auto_renew=True))
    db.session.commit()
    soon = utcnow() + dt.timedelta(days=365 - 3)  # 3 days before the 12-month terms end
    assert licences.auto_renew(at=soon) == 1  # one seat left for two devices
    db.session.commit()
    assert licences.auto_renew(at=soon) == 0
    renewed = db.session.query(DeviceLicence).filter(DeviceLicence.renews_id.isnot(None)).all()
    assert len(renewed) == 1 and renewed[0].tenant_id == billed.tenant_id


def test_the_device_cost_this_month_in_credits_money_and_forecast(committed_app: Any,
                                                                  client: Any) -> None:
    billed = billed_tenant()
    buy_package(billed.tenant_id, 1000)

    async def scenario(hook: Any) -> Any:
        admission = await hook.admit(billed.profile(), "r" * 16, "text", Units(),
                                     stream_id="s-cost", owner="test")
        return event_for(admission, Units(output_tokens=1000))
    event = run(scenario)
    event.credits = 10  # as the settle script prices it (1 credit per 100 output tokens)
    append_event(get_redis(), event)
    UsageWriter(committed_app, "cost-writer").drain_once()
    body = client.get(f"/api/v1/devices/{billed.devices[0].id}/cost",
                      headers=billed.headers).get_json()
    assert body["credits"] == 10
    assert body["currency"] == "EUR"
    assert decimal.Decimal(body["money_minor"]) == decimal.Decimal("1.00")  # 0.1 per credit
    assert body["forecast_credits"] >= 10
    assert decimal.Decimal(body["forecast_money_minor"]) == \
        (decimal.Decimal("0.1") * body["forecast_credits"]).quantize(decimal.Decimal("0.01"))
