"""Platform administrators run the catalogue from the portal: plans (created, taken off sale and
put back), rate card versions (published now or later, never in the past) and package offers.
Anyone else gets a 404; every form needs the CSRF token; every change is audited."""

from __future__ import annotations

import datetime as dt
import decimal
import html
import re
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from accounts.models import AuditEntry, User
from billing import catalog
from billing.models import PackageOffer, Plan, PlanBilling, RateCard
from core.db import db, utcnow
from tests.billing.helpers import make_offer, make_plan
from tests.factories import UserFactory
from tests.fleet.fixtures import Vendor
from tests.portal.fleet_helpers import log_in_as
from tests.portal.helpers import login, post, text

API = "/api/v1/billing"
PAGES = ("/admin/plans", "/admin/package-offers")


@pytest.fixture
def admin(app: Any) -> User:
    user: User = UserFactory.create(platform_admin=True)
    return user


def code(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def plan_form(plan_code: str, **changes: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "code": plan_code, "name": "Companion monthly", "billing": "prepaid",
        "term_months": "1", "grace_days": "7", "allowance_credits": "500",
        "requests_per_minute": "30", "concurrent_streams": "3", "daily_request_cap": "",
        "modalities": ["text", "voice"],
        "prices-0-currency": "eur", "prices-0-seat_price": "12.50",
        "prices-0-credit_value": "0.1",
        "prices-1-currency": "JPY", "prices-1-seat_price": "1900",
        "prices-1-credit_value": "0.15",
        "prices-2-currency": "", "prices-2-seat_price": "", "prices-2-credit_value": ""}
    form.update(changes)
    return form


def rate_card_form(**changes: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "rates-input_tokens-block_units": "1000", "rates-input_tokens-credits_per_block": "1",
        "rates-output_tokens-block_units": "1000", "rates-output_tokens-credits_per_block": "4",
        "rates-images-block_units": "1", "rates-images-credits_per_block": "2",
        "effective_from": "",
        "prices-0-currency": "EUR", "prices-0-credit_price": "0.15"}
    form.update(changes)
    return form


def offer_form(offer_code: str, **changes: Any) -> dict[str, Any]:
    form: dict[str, Any] = {"code": offer_code, "name": "Big pack", "credits": "50000",
                            "validity_days": "180", "prices-0-currency": "CNY",
                            "prices-0-price": "300", "prices-1-currency": "EUR",
                            "prices-1-price": "39.99"}
    form.update(changes)
    return form


def plan_by_code(plan_code: str) -> Plan | None:
    db.session.expire_all()
    return db.session.scalars(select(Plan).where(Plan.code == plan_code)).first()


def cards_of(plan: Plan) -> list[RateCard]:
    db.session.expire_all()
    return list(db.session.scalars(select(RateCard).where(RateCard.plan_id == plan.id)
                                   .order_by(RateCard.version)))


def audited(action: str, target_id: Any) -> bool:
    return db.session.scalar(select(AuditEntry.id).where(
        AuditEntry.action == action, AuditEntry.target_id == str(target_id))) is not None


def invalid_feedback(page: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'class="invalid-feedback[^"]*">([^<]*)<',
                                                  page)]


def on_sale(client: Any, vendor: Vendor, what: str) -> set[str]:
    response = client.get(f"{API}/{what}", headers=vendor.headers)
    assert response.status_code == 200
    return {item["code"] for item in response.get_json()["items"]}


# --- who may ----------------------------------------------------------------------------------


def test_the_pages_do_not_exist_for_tenant_members(client: Any, vendor: Vendor) -> None:
    plan, offer = make_plan(), make_offer()
    log_in_as(client, vendor)  # the tenant's owner, not a platform administrator
    for url in (*PAGES, f"/admin/plans/{plan.id}"):
        assert client.get(url).status_code == 404, url
    assert 'data-testid="admin-nav-plans"' not in text(client.get("/"))
    for url, data in (
            ("/admin/plans", plan_form(code("p"))),
            (f"/admin/plans/{plan.id}/deactivate", {}),
            (f"/admin/plans/{plan.id}/rate-cards", rate_card_form()),
            ("/admin/package-offers", offer_form(code("o"))),
            (f"/admin/package-offers/{offer.id}/deactivate", {})):
        assert post(client, url, data, page="/").status_code == 404, url
    assert cards_of(plan) == []
    db.session.refresh(plan)
    db.session.refresh(offer)
    assert plan.active and offer.active


def test_anonymous_visitors_are_sent_to_log_in(client: Any) -> None:
    for url in PAGES:
        response = client.get(url)
        assert response.status_code == 302 and response.headers["Location"].startswith(
            "/login"), url


def test_every_form_needs_the_csrf_token(client: Any, admin: User) -> None:
    plan, offer = make_plan(), make_offer()
    login(client, admin.email)
    plan_code = code("p")
    for url, data in (
            ("/admin/plans", plan_form(plan_code)),
            (f"/admin/plans/{plan.id}/deactivate", {}),
            (f"/admin/plans/{plan.id}/rate-cards", rate_card_form()),
            ("/admin/package-offers", offer_form(code("o"))),
            (f"/admin/package-offers/{offer.id}/deactivate", {})):
        refused = client.post(url, data=data)
        assert refused.status_code == 400 and "csrf_failed" in text(refused), url
        forged = client.post(url, data={**data, "csrf_token": "forged"})
        assert forged.status_code == 400, url
    assert plan_by_code(plan_code) is None and cards_of(plan) == []
    db.session.refresh(plan)
    db.session.refresh(offer)
    assert plan.active and offer.active


# --- plans --------------------------------------------------------------------------------------


def test_an_admin_creates_a_plan_with_prices_in_two_currencies(client: Any,
                                                               admin: User) -> None:
    login(client, admin.email)
    page = text(client.get("/admin/plans"))
    assert 'data-testid="admin-nav-plans"' in page and 'data-testid="plan-form"' in page
    plan_code = code("monthly")

    response = post(client, "/admin/plans", plan_form(plan_code))
    plan = plan_by_code(plan_code)
    assert plan is not None
    assert response.status_code == 302
    assert response.headers["Location"] == f"/admin/plans/{plan.id}"
    assert (plan.name, plan.billing, plan.term_months, plan.grace_days,
            plan.allowance_credits, plan.requests_per_minute, plan.concurrent_streams,
            plan.daily_request_cap, plan.modalities, plan.active) == (
        "Companion monthly", PlanBilling.PREPAID, 1, 7, 500, 30, 3, None, ["text", "voice"],
        True)
    # 12.50 EUR is 1,250 cents; the yen has no minor unit: 1,900 yen is 1,900.
    assert [(p.currency, p.seat_price_minor, p.credit_value_minor) for p in plan.prices] == [
        ("EUR", 1250, decimal.Decimal("0.1")), ("JPY", 1900, decimal.Decimal("0.15"))]
    assert audited("plan.create", plan.id)

    listed = text(client.get("/admin/plans", headers={"Accept-Language": "en"}))
    row = re.search(rf'data-code="{plan_code}".*?</tr>', listed, re.S)
    assert row is not None
    assert "€12.50" in row.group(0) and "1250 minor units" in row.group(0)
    assert "¥1,900" in row.group(0) and "none yet" in row.group(0)


@pytest.mark.parametrize(("changes", "field_error"), [
    ({"grace_days": "-1"}, "Must not be negative."),
    ({"term_months": "0"}, "Must be at least 1."),
    ({"code": "Has Spaces"}, "Lower-case letters"),
    ({"modalities": []}, "Choose at least one."),
    ({"prices-0-currency": "XXQ"}, "Not an ISO 4217 currency code."),
    ({"prices-0-seat_price": "-1"}, "Must not be negative."),
    ({"prices-0-seat_price": "12.505"}, "EUR has 2 decimals."),
    ({"prices-1-seat_price": "1900.5"}, "JPY has 0 decimals."),
    ({"prices-0-credit_value": ""}, "Required with a currency."),
    ({"prices-0-credit_value": "0.0000001"}, "At most 6 decimals."),
])
def test_a_bad_plan_is_refused_on_the_form(client: Any, admin: User, changes: dict[str, Any],
                                           field_error: str) -> None:
    login(client, admin.email)
    plan_code = code("bad")
    response = post(client, "/admin/plans", plan_form(plan_code, **changes))
    assert response.status_code == 422
    assert any(e.startswith(field_error) for e in invalid_feedback(text(response))), (
        invalid_feedback(text(response)))
    assert plan_by_code(plan_code) is None


def test_a_plan_needs_a_price_in_one_currency_once(client: Any, admin: User) -> None:
    login(client, admin.email)
    plan_code = code("bad")
    no_price = plan_form(plan_code, **{"prices-0-currency": "", "prices-0-seat_price": "",
                                       "prices-0-credit_value": "", "prices-1-currency": "",
                                       "prices-1-seat_price": "", "prices-1-credit_value": ""})
    response = post(client, "/admin/plans", no_price)
    assert response.status_code == 422
    assert "Give a price in at least one currency." in text(response)
    twice = post(client, "/admin/plans", plan_form(plan_code, **{"prices-1-currency": "EUR"}))
    assert twice.status_code == 422 and "Give each currency once." in text(twice)
    assert plan_by_code(plan_code) is None


def test_a_taken_code_is_refused_on_the_form(client: Any, admin: User) -> None:
    existing = make_plan()
    login(client, admin.email)
    response = post(client, "/admin/plans", plan_form(existing.code))
    assert response.status_code == 409
    assert "This code is taken." in invalid_feedback(text(response))


def test_a_plan_taken_off_sale_disappears_from_the_api_until_put_back(
        client: Any, admin: User, vendor: Vendor) -> None:
    plan = make_plan()
    assert plan.code in on_sale(client, vendor, "plans")
    login(client, admin.email)

    response = post(client, f"/admin/plans/{plan.id}/deactivate", page="/admin/plans")
    assert response.status_code == 302 and response.headers["Location"] == "/admin/plans"
    assert plan.code not in on_sale(client, vendor, "plans")
    assert audited("plan.deactivate", plan.id)
    page = text(client.get("/admin/plans"))
    assert re.search(rf'data-code="{plan.code}" data-active="false"', page)

    post(client, f"/admin/plans/{plan.id}/reactivate", page="/admin/plans")
    assert plan.code in on_sale(client, vendor, "plans")
    assert audited("plan.reactivate", plan.id)


# --- rate cards ---------------------------------------------------------------------------------


def test_an_admin_publishes_rate_card_versions(client: Any, admin: User) -> None:
    plan = make_plan(prices={"EUR": (1200, "0.1"), "CNY": (9000, "0.7")})
    login(client, admin.email)
    form = text(client.get(f"/admin/plans/{plan.id}"))
    assert "No rate card yet" in form
    # The overage rows start with the plan's currencies.
    assert re.search(r'name="prices-0-currency"[^>]*value="CNY"', form)

    response = post(client, f"/admin/plans/{plan.id}/rate-cards", rate_card_form(),
                    page="/admin/plans")
    assert response.status_code == 302
    assert response.headers["Location"] == f"/admin/plans/{plan.id}"
    [card] = cards_of(plan)
    assert card.version == 1
    assert {r.metric: (r.block_units, r.credits_per_block) for r in card.rates} == {
        "input_tokens": (1000, 1), "output_tokens": (1000, 4), "images": (1, 2)}
    assert [(o.currency, o.credit_price_minor) for o in card.overage_prices] == [
        ("EUR", decimal.Decimal("0.15"))]
    assert abs(card.effective_from - utcnow()) < dt.timedelta(minutes=1)
    assert audited("rate_card.publish", card.id)

    later = (utcnow() + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M")
    post(client, f"/admin/plans/{plan.id}/rate-cards", rate_card_form(**{
        "rates-output_tokens-credits_per_block": "5", "effective_from": later}),
        page="/admin/plans")
    assert [c.version for c in cards_of(plan)] == [1, 2]
    page = text(client.get(f"/admin/plans/{plan.id}", headers={"Accept-Language": "en"}))
    states = dict(re.findall(r'data-testid="rate-card-version" data-version="(\d+)">.*?'
                             r'data-testid="rate-card-state">([^<]+)<', page, re.S))
    assert states == {"1": "In effect", "2": "Scheduled"}
    assert f"effective from {later.replace('T', ' ')} UTC" in page
    # The form starts from the newest version.
    assert re.search(r'name="rates-output_tokens-credits_per_block"[^>]*value="5"', page)
    listed = text(client.get("/admin/plans"))
    assert re.search(rf'data-code="{plan.code}".*?version 2', listed, re.S)


def test_the_current_minute_means_now(client: Any, admin: User) -> None:
    login(client, admin.email)
    for _ in range(3):  # a minute that turns during the request proves nothing: again
        plan = make_plan()
        minute = utcnow().replace(second=0, microsecond=0)
        response = post(client, f"/admin/plans/{plan.id}/rate-cards", rate_card_form(
            effective_from=minute.strftime("%Y-%m-%dT%H:%M")), page="/admin/plans")
        if utcnow().replace(second=0, microsecond=0) == minute:
            break
    else:
        pytest.fail("the minute turned during every attempt")
    assert response.status_code == 302
    [card] = cards_of(plan)
    assert card.effective_from >= minute


def test_a_past_effective_date_is_refused_on_the_form(client: Any, admin: User) -> None:
    plan = make_plan()
    login(client, admin.email)
    past = (utcnow() - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    response = post(client, f"/admin/plans/{plan.id}/rate-cards",
                    rate_card_form(effective_from=past), page="/admin/plans")
    assert response.status_code == 422
    assert "Must not be in the past." in invalid_feedback(text(response))
    assert f'value="{past}"' in text(response)  # what was typed stays on the form
    assert cards_of(plan) == []


@pytest.mark.parametrize(("changes", "field_error"), [
    ({"rates-images-credits_per_block": "-2"}, "Must not be negative."),
    ({"rates-images-block_units": "0"}, "Must be at least 1."),
    ({"rates-tool_calls-block_units": "1"}, "Give both, or neither for a free metric."),
    ({"prices-0-credit_price": "-0.1"}, "Must not be negative."),
    ({"prices-0-credit_price": ""}, "Required with a currency."),
    ({"effective_from": "tomorrow"}, "Not a valid datetime value."),
])
def test_a_bad_rate_card_is_refused_on_the_form(client: Any, admin: User,
                                                changes: dict[str, Any],
                                                field_error: str) -> None:
    plan = make_plan()
    login(client, admin.email)
    response = post(client, f"/admin/plans/{plan.id}/rate-cards", rate_card_form(**changes),
                    page=f"/admin/plans/{plan.id}")
    assert response.status_code == 422
    assert field_error in invalid_feedback(text(response)), invalid_feedback(text(response))
    assert cards_of(plan) == []


def test_an_unknown_plan_is_not_found(client: Any, admin: User) -> None:
    login(client, admin.email)
    assert client.get(f"/admin/plans/{uuid.uuid4()}").status_code == 404
    assert client.get("/admin/plans/not-a-uuid").status_code == 404


# --- package offers -----------------------------------------------------------------------------


def test_an_admin_creates_an_offer_and_takes_it_off_sale(client: Any, admin: User,
                                                        vendor: Vendor) -> None:
    login(client, admin.email)
    offer_code = code("big")
    response = post(client, "/admin/package-offers", offer_form(offer_code))
    assert response.status_code == 302
    assert response.headers["Location"] == "/admin/package-offers"
    db.session.expire_all()
    offer = db.session.scalars(select(PackageOffer).where(PackageOffer.code == offer_code)
                               ).one()
    assert (offer.name, offer.credits, offer.validity_days) == ("Big pack", 50000, 180)
    assert {p.currency: p.price_minor for p in offer.prices} == {"CNY": 30000, "EUR": 3999}
    assert audited("package_offer.create", offer.id)
    assert offer_code in on_sale(client, vendor, "package-offers")
    page = text(client.get("/admin/package-offers", headers={"Accept-Language": "en"}))
    assert "€39.99" in page and "CN¥300.00" in page

    post(client, f"/admin/package-offers/{offer.id}/deactivate", page="/admin/package-offers")
    assert offer_code not in on_sale(client, vendor, "package-offers")
    assert audited("package_offer.deactivate", offer.id)
    post(client, f"/admin/package-offers/{offer.id}/reactivate", page="/admin/package-offers")
    assert offer_code in on_sale(client, vendor, "package-offers")


def test_a_bad_offer_is_refused_on_the_form(client: Any, admin: User) -> None:
    taken = make_offer()
    login(client, admin.email)
    for changes, status, error in (({"credits": "0"}, 422, "Must be at least 1."),
                                   ({"prices-0-price": "-3"}, 422, "Must not be negative."),
                                   ({"code": taken.code}, 409, "This code is taken.")):
        offer_code = changes.get("code", code("bad"))
        response = post(client, "/admin/package-offers", offer_form(offer_code, **changes))
        assert response.status_code == status, changes
        assert error in invalid_feedback(text(response)), changes
    assert len(db.session.scalars(select(PackageOffer).where(
        PackageOffer.code.like("bad-%"))).all()) == 0


# --- language -----------------------------------------------------------------------------------


def test_the_pages_render_in_simplified_chinese(client: Any, admin: User) -> None:
    plan = make_plan()
    catalog.publish_rate_card(plan, {"input_tokens": (1000, 1)},
                              overage_prices={"EUR": "0.15"})
    make_offer()
    db.session.commit()
    post(client, "/language", {"locale": "zh_Hans"}, page="/login")
    login(client, admin.email)
    plans = text(client.get("/admin/plans"))
    assert '<html lang="zh-Hans">' in plans
    for phrase in ("方案", "新建方案", "停止销售", "预付费"):
        assert phrase in plans, phrase
    card = text(client.get(f"/admin/plans/{plan.id}"))
    for phrase in ("费率表版本", "发布新版本", "生效中", "输入 token"):
        assert phrase in card, phrase
    offers = text(client.get("/admin/package-offers"))
    assert "点数包商品" in offers and "新建点数包商品" in offers
    past = (utcnow() - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    refused = post(client, f"/admin/plans/{plan.id}/rate-cards",
                   rate_card_form(effective_from=past), page="/admin/plans")
    assert "不能早于现在。" in invalid_feedback(text(refused))
