"""The billing pages in a real browser: an owner orders a credit package, a platform
administrator marks it paid, and the owner finds its credits on the packages page; then a
device streams through the real inference broker with billing's credit hook, and the page shows
the package's balance fall by what the settled requests cost. Data is committed (the live
server and the broker run in other threads) and truncated afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import pytest
from playwright.sync_api import Page, expect

from accounts import services as accounts
from accounts.models import Role, Tenant
from billing import balances, catalog, ledger, reports
from core.db import db
from inference.client import DeviceClient, Reply
from inference.service import BrokerThread
from tests.billing.credit import (
    CREDIT_HOOK,
    Billed,
    billed_tenant,
    drain,
    mqtt_info,
    running_credit_broker,
)
from tests.inference.conftest import (  # noqa: F401 - fixtures
    connect_with_retry,
    inference_mosquitto,
    platform,
)

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


# --- the balance falls while a device streams ---------------------------------------------------

QUESTIONS = ("Tell me a story about a bear", "And one about a fox", "Now one about an owl")


@pytest.fixture
def credit_platform(platform: Any, monkeypatch: pytest.MonkeyPatch) -> Any:  # noqa: F811
    """The inference platform with billing's credit hook (the default) and a local provider
    answering at once with 400 tokens: a few credits a request at tests/billing/credit.py's
    rate card (1 credit per 100 output tokens, per 1,000 input tokens)."""
    for key, value in {"ENSOUL_BILLING_HOOK": CREDIT_HOOK,
                       "ENSOUL_LOCAL_ANSWER_TOKENS": 400}.items():
        monkeypatch.setitem(platform.config, key, value)
    return platform


@pytest.fixture
def credit_broker(credit_platform: Any) -> Iterator[BrokerThread]:
    with running_credit_broker(credit_platform) as thread:
        yield thread


class Streaming(NamedTuple):
    billed: Billed
    tenant_name: str
    owner: str
    admin: str
    device_info: dict[str, Any]


@pytest.fixture
def streaming(credit_platform: Any) -> Streaming:
    """A tenant on a plan without an allowance (its credits come from packages only) and one
    device, licensed (a pack of seats bought and marked paid) and active; its owner and a
    platform administrator can log in, and a package offer is on sale in its currency."""
    billed = billed_tenant()  # raises the inference limits: restored with the platform's
    assert billed.plan.allowance_credits == 0
    tenant = db.session.get(Tenant, billed.tenant_id)
    assert tenant is not None
    owner = accounts.create_user("owner@bears.example", PASSWORD, "Olga Owner")
    accounts.add_member(tenant, owner, Role.OWNER)
    admin = accounts.create_user("ops@ensoul.example", PASSWORD, "Pat Platform",
                                 platform_admin=True)
    catalog.create_package_offer("credits-1k", "1,000 credits", 1000, 90, {"EUR": 150})
    db.session.commit()
    return Streaming(billed, tenant.name, owner.email, admin.email,
                     mqtt_info(billed.devices[0]))


def stream(info: dict[str, Any], questions: tuple[str, ...]) -> list[Reply]:
    """The device asks ``questions`` one after the other through the broker. On a thread of
    its own: Playwright's sync API counts this one as running an event loop."""
    async def scenario() -> list[Reply]:
        device = DeviceClient.from_mqtt_info(info)
        await connect_with_retry(device)
        try:
            return [await device.ask(question, timeout=15) for question in questions]
        finally:
            await device.close()

    with ThreadPoolExecutor(1, thread_name_prefix="device") as pool:
        return pool.submit(asyncio.run, scenario()).result(60)


def settled_credits(app: Any, billed: Billed, request_ids: list[str]) -> int:
    """The credits of ``request_ids`` as the device's requests list shows them (after the
    usage writer)."""
    listed = app.test_client().get(f"/api/v1/devices/{billed.devices[0].id}/requests?limit=50",
                                   headers=billed.headers)
    assert listed.status_code == 200, listed.json
    credits = {r["request_id"]: r["credits"] for r in listed.json["items"]}
    assert set(credits) == set(request_ids), credits
    return sum(credits.values())


def test_the_package_balance_falls_while_a_device_streams(
        page: Page, live_server: str, credit_platform: Any, credit_broker: BrokerThread,
        streaming: Streaming) -> None:
    log_in(page, live_server, streaming.owner)
    page.goto(f"{live_server}/billing/packages")
    expect(page.get_by_test_id("packages-live-credits")).to_have_text("0")
    page.get_by_test_id("package-offer").select_option(
        label="1,000 credits: 1,000 credits for 90 days, €1.50")
    page.get_by_test_id("package-quantity").fill("1")
    page.get_by_test_id("package-submit").click()
    expect(page).to_have_url(f"{live_server}/billing/purchases")
    log_out(page)

    log_in(page, live_server, streaming.admin)
    page.goto(f"{live_server}/admin/purchases")
    page.get_by_test_id("admin-purchase-row").get_by_test_id("purchase-mark-paid").click()
    expect(page.get_by_test_id("flash")).to_contain_text(
        f"{streaming.tenant_name}: 1 package of 1,000 credits delivered.")
    log_out(page)

    log_in(page, live_server, streaming.owner)
    page.goto(f"{live_server}/billing/packages")
    balance = page.get_by_test_id("package-row").get_by_test_id("package-balance")
    expect(balance).to_have_text("1,000")
    expect(page.get_by_test_id("packages-live-credits")).to_have_text("1,000")
    db.session.expire_all()
    [package] = reports.packages(streaming.billed.tenant_id)
    account = ledger.package_account(package.id)

    # Two rounds of requests; after each, once the usage writer has posted them to the
    # ledger, the page shows the package down by exactly what the settled requests cost.
    request_ids: list[str] = []
    charged = 0
    for questions in (QUESTIONS[:2], QUESTIONS[2:]):
        for reply in stream(streaming.device_info, questions):
            end = reply.terminal
            assert end is not None and (end["type"], end.get("finish")) == ("end", "stop"), \
                reply.messages
            credits = end["usage"]["credits"]
            assert credits >= 5, end  # 400 output tokens and some input
            assert end["usage"]["credit_split"] == {account: credits}, end
            request_ids.append(reply.request_id)
            charged += credits
        drain(credit_platform)
        spent = settled_credits(credit_platform, streaming.billed, request_ids)
        assert spent == charged
        page.reload()
        expect(balance).to_have_text(f"{1000 - spent:,}")
        expect(page.get_by_test_id("packages-live-credits")).to_have_text(f"{1000 - spent:,}")

    chart = page.get_by_test_id("package-row").get_by_test_id("package-burn-down")
    assert (chart.get_attribute("data-balances") or "").split(",")[-1] == str(1000 - spent)
    db.session.expire_all()
    assert ledger.balance(streaming.billed.tenant_id, account) == 1000 - spent
    assert balances.reconcile(streaming.billed.tenant_id) == ([], False)  # Redis agrees
