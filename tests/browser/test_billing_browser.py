"""The billing pages in a real browser: an owner orders a credit package, a platform
administrator marks it paid, and the owner finds its credits on the packages page. Data is
committed (the live server runs in other threads) and truncated afterwards."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
from playwright.sync_api import Page, expect

from accounts import services as accounts
from accounts.models import Role
from billing import catalog
from core.db import db

pytestmark = pytest.mark.browser

PASSWORD = "a long enough password"


class People(NamedTuple):
    owner: str
    admin: str


@pytest.fixture
def people(committed_app: Any) -> People:
    owner = accounts.create_user("finance@vendor.example", PASSWORD, "Fen Finance")
    tenant = accounts.create_tenant("Shenzhen Toys", "CNY", "Asia/Shanghai")
    accounts.add_member(tenant, owner, Role.OWNER)
    admin = accounts.create_user("ops@ensoul.example", PASSWORD, "Pat Platform",
                                 platform_admin=True)
    catalog.create_package_offer("credits-10k", "10,000 credits", 10_000, 90,
                                 {"CNY": 6500, "EUR": 900})
    db.session.commit()
    return People(owner.email, admin.email)


def log_in(page: Page, base: str, email: str) -> None:
    page.goto(f"{base}/login")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("logout")).to_be_visible()


def log_out(page: Page) -> None:
    page.get_by_test_id("logout").click()
    expect(page.get_by_test_id("login-submit")).to_be_visible()


def test_order_a_package_have_it_marked_paid_and_see_its_credits(
        page: Page, live_server: str, people: People) -> None:
    log_in(page, live_server, people.owner)
    page.get_by_test_id("nav-billing").click()
    page.get_by_test_id("billing-nav-packages").click()
    expect(page.get_by_test_id("packages-live-credits")).to_have_text("0")
    page.get_by_test_id("package-offer").select_option(
        label="10,000 credits: 10,000 credits for 90 days, CN¥65.00")
    page.get_by_test_id("package-quantity").fill("1")
    page.get_by_test_id("package-submit").click()

    expect(page).to_have_url(f"{live_server}/billing/purchases")
    row = page.get_by_test_id("purchase-row")
    expect(row).to_have_count(1)
    expect(row.get_by_test_id("purchase-amount")).to_have_text("CN¥65.00")
    expect(row.get_by_test_id("purchase-status")).to_have_attribute("data-status", "pending")
    expect(row.get_by_test_id("purchase-mark-paid")).to_have_count(0)
    log_out(page)

    log_in(page, live_server, people.admin)
    page.get_by_test_id("nav-admin").click()
    page.get_by_test_id("admin-nav-purchases").click()
    pending = page.get_by_test_id("admin-purchase-row")
    expect(pending).to_have_count(1)
    expect(pending).to_contain_text("Shenzhen Toys")
    pending.get_by_test_id("purchase-mark-paid").click()  # the confirm dialog is accepted
    expect(page.get_by_test_id("flash")).to_contain_text(
        "Shenzhen Toys: 1 package of 10,000 credits delivered.")
    expect(page.get_by_test_id("admin-purchase-row")).to_have_count(0)
    log_out(page)

    log_in(page, live_server, people.owner)
    page.get_by_test_id("nav-billing").click()
    page.get_by_test_id("billing-nav-packages").click()
    expect(page.get_by_test_id("packages-live-credits")).to_have_text("10,000")
    package = page.get_by_test_id("package-row")
    expect(package).to_have_count(1)
    expect(package.get_by_test_id("package-balance")).to_have_text("10,000")
    chart = package.get_by_test_id("package-burn-down")
    expect(chart).to_be_visible()
    assert (chart.get_attribute("data-balances") or "").split(",") == ["0"] * 29 + ["10000"]
    page.get_by_test_id("billing-nav-purchases").click()
    expect(page.get_by_test_id("purchase-status")).to_have_attribute("data-status", "paid")
