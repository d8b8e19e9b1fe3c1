"""The billing API as a vendor's finance team uses it: the catalogue, an order with an
Idempotency-Key, the purchase paid by a platform administrator (the CLI), seats in use."""

from __future__ import annotations

import uuid
from typing import Any

from billing import catalog
from core.db import db
from fleet import services as fleet
from tests.billing.helpers import make_offer, make_plan
from tests.fleet.fixtures import Vendor

API = "/api/v1/billing"


def test_ordering_seats_paying_and_seeing_them_used(app: Any, client: Any,
                                                    vendor: Vendor) -> None:
    plan = make_plan(prices={"EUR": (1250, "0.1"), "CNY": (9000, "0.7")})
    device = fleet.create_device(vendor.product, "SN-API-1")
    fleet.activate(device)  # no seat yet: unlicensed
    db.session.commit()
    headers = {**vendor.headers, "Idempotency-Key": f"order-{uuid.uuid4().hex}"}

    plans = client.get(f"{API}/plans", headers=vendor.headers).get_json()["items"]
    listed = next(p for p in plans if p["id"] == str(plan.id))
    assert listed["prices"][1] == {"currency": "EUR", "seat_price_minor": 1250,
                                   "credit_value_minor": "0.100000"}
    order = {"plan_id": str(plan.id), "quantity": 3}
    created = client.post(f"{API}/purchases/licence-packs", json=order, headers=headers)
    again = client.post(f"{API}/purchases/licence-packs", json=order, headers=headers)
    assert created.status_code == 201, created.get_json()
    assert again.get_json() == created.get_json()  # the same purchase, not a second one
    purchase = created.get_json()
    assert (purchase["status"], purchase["currency"], purchase["amount_minor"]) == (
        "pending", "EUR", 3750)
    assert client.get(f"{API}/licence-packs", headers=vendor.headers).get_json()["items"] == []
    licence = client.get(f"/api/v1/devices/{device.id}/licence", headers=vendor.headers)
    assert licence.get_json()["licensed"] is False

    runner = app.test_cli_runner()
    result = runner.invoke(args=["mark-purchase-paid", "--purchase", purchase["id"]])
    assert result.exit_code == 0, result.output
    assert "1 devices licensed" in result.output

    [pack] = client.get(f"{API}/licence-packs", headers=vendor.headers).get_json()["items"]
    assert (pack["seats"], pack["seats_used"], pack["seats_free"]) == (3, 1, 2)
    licence = client.get(f"/api/v1/devices/{device.id}/licence", headers=vendor.headers)
    assert licence.get_json()["licensed"] is True
    assert licence.get_json()["pack_id"] == pack["id"]
    paid = client.get(f"{API}/purchases/{purchase['id']}", headers=vendor.headers).get_json()
    assert paid["status"] == "paid" and paid["paid_at"] is not None
    cancel = client.post(f"{API}/purchases/{purchase['id']}/cancel", headers=vendor.headers)
    assert cancel.status_code == 409 and cancel.get_json()["error"]["code"] == "conflict"


def test_a_package_order_and_its_cancellation(client: Any, vendor: Vendor) -> None:
    offer = make_offer(credits=5000)
    offers = client.get(f"{API}/package-offers", headers=vendor.headers).get_json()["items"]
    assert next(o for o in offers if o["id"] == str(offer.id))["prices"] == {"CNY": 6500,
                                                                           "EUR": 900}
    created = client.post(f"{API}/purchases/packages", headers=vendor.headers, json={
        "offer_id": str(offer.id), "quantity": 2})
    assert created.status_code == 201 and created.get_json()["amount_minor"] == 1800
    purchase_id = created.get_json()["id"]
    cancelled = client.post(f"{API}/purchases/{purchase_id}/cancel", headers=vendor.headers)
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    listed = client.get(f"{API}/purchases", headers=vendor.headers).get_json()["items"]
    assert [p["id"] for p in listed] == [purchase_id]


def test_bad_orders_get_one_error_shape(client: Any, vendor: Vendor) -> None:
    plan = make_plan(prices={"CNY": (9000, "0.7")})  # not sold in the vendor's EUR
    retired = make_plan()
    retired.active = False
    db.session.commit()
    packs, packages = f"{API}/purchases/licence-packs", f"{API}/purchases/packages"
    cases = [
        (packs, {"plan_id": str(plan.id), "quantity": 0}, 422, "quantity"),
        (packs, {"plan_id": str(plan.id), "quantity": -5}, 422, "quantity"),
        (packs, {"plan_id": str(plan.id), "quantity": 1.5}, 422, "quantity"),
        (packs, {"quantity": 1}, 422, "plan_id"),
        (packages, {"plan_id": str(plan.id), "quantity": 1}, 422, "offer_id"),
        (packs, {"plan_id": str(plan.id), "quantity": 1}, 422, "currency"),
        (packs, {"plan_id": str(retired.id), "quantity": 1}, 422, "plan_id"),
        (packs, {"plan_id": str(uuid.uuid4()), "quantity": 1}, 404, None),
        (packages, {"offer_id": "not-a-uuid", "quantity": 1}, 422, "offer_id"),
    ]
    for url, body, status, field in cases:
        response = client.post(url, json=body, headers=vendor.headers)
        error = response.get_json()["error"]
        assert response.status_code == status, (body, response.get_json())
        if field is not None:
            assert field in str(error["details"]), (body, error)
    assert client.get(f"{API}/purchases", headers=vendor.headers).get_json()["items"] == []
    assert catalog.get_plan(plan.id).code == plan.code


def test_a_large_order_is_exact_past_32_bits(client: Any, vendor: Vendor) -> None:
    plan = make_plan(prices={"EUR": (9000, "0.7")})
    response = client.post(f"{API}/purchases/licence-packs", headers=vendor.headers,
                           json={"plan_id": str(plan.id), "quantity": 1_000_000})
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["amount_minor"] == 9_000_000_000
