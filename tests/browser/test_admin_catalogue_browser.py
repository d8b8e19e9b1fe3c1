"""The catalogue administration in a real browser: a platform administrator creates a plan
from the admin pages and publishes its first rate card, then sees the version in effect. Data
is committed (the live server runs in another thread) and truncated afterwards."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from accounts import services as accounts
from billing.models import Plan, RateCard
from core.db import db

pytestmark = pytest.mark.browser

PASSWORD = "a long enough password"


@pytest.fixture
def admin_email(committed_app: Any) -> str:
    admin = accounts.create_user("ops@ensoul.example", PASSWORD, "Pat Platform",
                                 platform_admin=True)
    db.session.commit()
    return admin.email


def test_an_admin_creates_a_plan_and_publishes_its_rate_card(
        page: Page, live_server: str, admin_email: str) -> None:
    page.goto(f"{live_server}/login")
    page.fill("#email", admin_email)
    page.fill("#password", PASSWORD)
    page.get_by_test_id("login-submit").click()
    page.get_by_test_id("nav-admin").click()
    page.get_by_test_id("admin-nav-plans").click()

    page.get_by_test_id("plan-code").fill("companion-1m")
    page.get_by_test_id("plan-name").fill("Companion, monthly")
    page.get_by_test_id("plan-term").fill("1")
    page.get_by_test_id("plan-modality-vision").uncheck()
    page.get_by_test_id("plan-0-currency").fill("EUR")
    page.get_by_test_id("plan-0-seat_price").fill("1.50")
    page.get_by_test_id("plan-0-credit_value").fill("0.1")
    page.get_by_test_id("plan-submit").click()

    expect(page.get_by_test_id("flash")).to_contain_text("The plan Companion, monthly is "
                                                         "created.")
    expect(page.get_by_test_id("overage-0-currency")).to_have_value("EUR")
    page.get_by_test_id("rate-input_tokens-block").fill("1000")
    page.get_by_test_id("rate-input_tokens-credits").fill("1")
    page.get_by_test_id("rate-output_tokens-block").fill("1000")
    page.get_by_test_id("rate-output_tokens-credits").fill("-4")
    page.get_by_test_id("overage-0-credit_price").fill("0.15")
    page.get_by_test_id("rate-card-submit").click()
    expect(page.get_by_text("Must not be negative.")).to_be_visible()  # refused on the form

    page.get_by_test_id("rate-output_tokens-credits").fill("4")
    page.get_by_test_id("rate-card-submit").click()
    expect(page.get_by_test_id("flash")).to_contain_text("Version 1 of the rate card")
    version = page.get_by_test_id("rate-card-version")
    expect(version).to_have_count(1)
    expect(version.get_by_test_id("rate-card-state")).to_have_text("In effect")
    expect(version.locator('[data-metric="output_tokens"] [data-testid="rate-credits"]')
           ).to_have_text("4")

    page.get_by_test_id("admin-nav-plans").click()
    row = page.locator('[data-testid="plan-row"][data-code="companion-1m"]')
    expect(row.get_by_test_id("plan-prices")).to_contain_text("€1.50")
    expect(row.get_by_test_id("plan-rate-card-version")).to_have_text("version 1")

    db.session.expire_all()
    plan = db.session.scalars(select(Plan).where(Plan.code == "companion-1m")).one()
    assert plan.modalities == ["text", "voice"]
    card = db.session.scalars(select(RateCard).where(RateCard.plan_id == plan.id)).one()
    assert {r.metric: (r.block_units, r.credits_per_block) for r in card.rates} == {
        "input_tokens": (1000, 1), "output_tokens": (1000, 4)}
