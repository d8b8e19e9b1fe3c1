"""The billing pages: licences (packs, devices without a seat, licences ending, ordering seats),
packages (balances, the burn-down, ordering one), purchases (money exact; platform
administrators mark one paid, once) and usage (per day, product and device; the CSV). Roles,
CSRF and tenancy as on the other portal pages."""

from __future__ import annotations

import datetime as dt
import html
import re
import uuid
import zoneinfo
from typing import Any

import pytest
from sqlalchemy import func, select

from accounts.models import AuditEntry, Role, User
from billing import ledger, licences, purchases, reports
from billing.models import (
    CreditPackage,
    EntryKind,
    LedgerEntry,
    LicencePack,
    PlanBilling,
    Purchase,
    PurchaseStatus,
)
from core.db import db, utcnow
from fleet import services as fleet
from fleet.models import Device, DeviceStatus, HardwareKind
from inference.models import UsageEventRecord
from tests.billing.helpers import buy_seats, make_offer, make_plan
from tests.factories import MembershipFactory, UserFactory
from tests.fleet.fixtures import Vendor
from tests.portal.fleet_helpers import log_in_as, make_device
from tests.portal.helpers import csrf, login, post, text

PAGES = ("/billing/licences", "/billing/packages", "/billing/purchases", "/billing/usage")
WRITERS = (Role.OWNER, Role.FINANCE)
READERS = (Role.DEVELOPER, Role.OPERATIONS, Role.VIEWER)


@pytest.fixture
def admin(app: Any) -> User:
    user: User = UserFactory.create(platform_admin=True)
    return user


def rows(page: str, testid: str) -> list[str]:
    return re.findall(rf'<tr data-testid="{testid}"(.*?)</tr>', page, re.S)


def cell(row: str, testid: str) -> str:
    match = re.search(rf'data-testid="{testid}"[^>]*>([^<]*)<', row)
    assert match, testid
    return html.unescape(match.group(1)).strip()


def purchases_of(vendor: Vendor) -> list[Purchase]:
    db.session.expire_all()
    return list(db.session.scalars(select(Purchase).where(
        Purchase.tenant_id == vendor.setup.tenant.id).order_by(Purchase.id)))


def order_package(client: Any, offer_id: Any, quantity: int = 1) -> Any:
    return post(client, "/billing/packages", {"offer_id": str(offer_id), "quantity": quantity},
                page="/billing/packages")


def mark_paid(client: Any, purchase: Purchase, page: str = "/admin/purchases") -> Any:
    return post(client, f"/admin/purchases/{purchase.id}/mark-paid", page=page)


# --- roles, CSRF, the nav ------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_every_role_reads_the_billing_pages_and_only_owner_and_finance_order(
        client: Any, vendor: Vendor, role: Role) -> None:
    plan, offer = make_plan(), make_offer()
    log_in_as(client, vendor, role)
    for url in PAGES:
        page = client.get(url)
        assert page.status_code == 200, url
        assert 'data-testid="nav-billing"' in text(page)
    writer = role in WRITERS
    assert ('data-testid="pack-form"' in text(client.get("/billing/licences"))) is writer
    assert ('data-testid="package-form"' in text(client.get("/billing/packages"))) is writer

    seats = post(client, "/billing/licences", {"plan_id": str(plan.id), "quantity": 3},
                 page="/billing/usage")  # any page's form carries the session's CSRF token
    package = order_package(client, offer.id)
    if writer:
        assert seats.status_code == package.status_code == 302
        assert seats.headers["Location"] == "/billing/purchases"
        assert [p.quantity for p in purchases_of(vendor)] == [3, 1]
    else:
        assert seats.status_code == package.status_code == 403
        assert purchases_of(vendor) == []


def test_anonymous_visitors_are_sent_to_log_in(client: Any) -> None:
    for url in (*PAGES, "/billing/usage.csv", "/admin/purchases"):
        response = client.get(url)
        assert response.status_code == 302 and response.headers["Location"].startswith(
            "/login"), url


def test_a_suspended_tenant_reads_but_cannot_order(client: Any, vendor: Vendor) -> None:
    from accounts import services as accounts
    from accounts.models import TenantStatus

    offer = make_offer()
    accounts.set_tenant_status(vendor.setup.tenant, TenantStatus.SUSPENDED, "unpaid")
    db.session.commit()
    log_in_as(client, vendor)
    page = text(client.get("/billing/packages"))
    assert 'data-testid="package-form"' not in page
    assert order_package(client, offer.id).status_code == 403
    assert purchases_of(vendor) == []


def test_orders_and_mark_paid_need_the_csrf_token(client: Any, vendor: Vendor,
                                                  admin: User) -> None:
    plan, offer = make_plan(), make_offer()
    log_in_as(client, vendor)
    for url, data in (("/billing/licences", {"plan_id": str(plan.id), "quantity": "1"}),
                      ("/billing/packages", {"offer_id": str(offer.id), "quantity": "1"})):
        refused = client.post(url, data=data)
        assert refused.status_code == 400 and "csrf_failed" in text(refused)
        forged = client.post(url, data={**data, "csrf_token": "forged"})
        assert forged.status_code == 400
    assert purchases_of(vendor) == []

    purchase = purchases.order_package(vendor.setup.tenant.id, "EUR", offer.id)
    db.session.commit()
    client.post("/logout", data={"csrf_token": csrf(client, "/")})
    login(client, admin.email)
    refused = client.post(f"/admin/purchases/{purchase.id}/mark-paid")
    assert refused.status_code == 400 and "csrf_failed" in text(refused)
    assert purchases_of(vendor)[0].status is PurchaseStatus.PENDING


# --- ordering ----------------------------------------------------------------------------------


def test_ordering_seats_creates_a_pending_purchase_in_the_tenants_currency(
        client: Any, vendor: Vendor) -> None:
    plan = make_plan(prices={"EUR": (1250, "0.1"), "CNY": (9000, "0.7")})
    make_plan(prices={"CNY": (9000, "0.7")})  # not sold in EUR: not offered
    make_plan(billing=PlanBilling.POSTPAID, prices={"EUR": (300, "0.1")})  # no packs
    user = log_in_as(client, vendor, Role.FINANCE)
    page = text(client.get("/billing/licences"))
    options = re.findall(r'<option[^>]*value="([^"]+)"', page)
    assert options == [str(plan.id)]
    assert "Companion yearly: €12.50 per seat for 12 months" in page

    response = post(client, "/billing/licences", {"plan_id": str(plan.id), "quantity": 40},
                    page="/billing/licences")
    assert response.status_code == 302
    [purchase] = purchases_of(vendor)
    assert (purchase.status, purchase.currency, purchase.quantity, purchase.amount_minor,
            purchase.created_by_id) == (PurchaseStatus.PENDING, "EUR", 40, 50_000, user.id)
    assert purchases.packs(vendor.setup.tenant.id) == []  # nothing until it is paid
    listed = text(client.get("/billing/purchases"))
    assert "You ordered 40 seats of Companion yearly for €500.00." in listed
    [row] = rows(listed, "purchase-row")
    assert cell(row, "purchase-amount") == "€500.00"
    assert 'data-status="pending"' in row
    assert 'data-testid="purchase-mark-paid"' not in listed  # not a platform admin
    entry = db.session.scalars(select(AuditEntry).where(
        AuditEntry.action == "purchase.create")).one()
    assert (entry.tenant_id, entry.actor_user_id, entry.target_id) == (
        vendor.setup.tenant.id, user.id, str(purchase.id))


@pytest.mark.parametrize("data", [
    {"quantity": "0"}, {"quantity": "1000001"}, {"quantity": "ten"}, {"quantity": ""},
    {"plan_id": "not-a-plan"}, {"plan_id": str(uuid.uuid4())}])
def test_a_bad_order_is_refused_on_the_form(client: Any, vendor: Vendor,
                                            data: dict[str, str]) -> None:
    plan = make_plan()
    log_in_as(client, vendor)
    response = post(client, "/billing/licences", {"plan_id": str(plan.id), "quantity": "2",
                                                  **data}, page="/billing/licences")
    assert response.status_code == 422
    assert 'is-invalid' in text(response)
    assert purchases_of(vendor) == []


def test_money_is_exact_and_in_the_currencys_own_decimals(client: Any, vendor: Vendor) -> None:
    # 2**53 + 1 minor units: a float would print ...992.
    plan = make_plan(prices={"EUR": (9_007_199_254_740_993, "0.1"), "JPY": (1250, "1")})
    purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, 1)
    jpy = make_vendor_in("JPY")
    purchases.order_pack(jpy.setup.tenant.id, "JPY", plan.id, 3)
    db.session.commit()
    log_in_as(client, vendor)
    [row] = rows(text(client.get("/billing/purchases")), "purchase-row")
    assert cell(row, "purchase-amount") == "€90,071,992,547,409.93"
    client.post("/logout", data={"csrf_token": csrf(client, "/")})
    log_in_as(client, jpy)
    [row] = rows(text(client.get("/billing/purchases")), "purchase-row")
    assert cell(row, "purchase-amount") == "¥3,750"


def make_vendor_in(currency: str) -> Vendor:
    from tests.factories import tenant_with_owner

    setup = tenant_with_owner(currency=currency, timezone="Asia/Tokyo")
    product, key = fleet.create_product(setup.tenant.id, "Glasses", HardwareKind.GLASSES)
    db.session.commit()
    return Vendor(setup, product, key)


# --- marking paid ------------------------------------------------------------------------------


def test_a_platform_admin_marks_seats_paid_once_and_waiting_devices_get_them(
        client: Any, vendor: Vendor, admin: User) -> None:
    plan = make_plan()
    waiting = make_device(vendor.product, "SN-WAIT", status=DeviceStatus.ACTIVE)
    purchase = purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, 2)
    db.session.commit()
    login(client, admin.email)
    listed = text(client.get("/admin/purchases"))
    [row] = rows(listed, "admin-purchase-row")
    assert str(purchase.id) in row and vendor.setup.tenant.slug in row
    assert cell(row, "purchase-amount") == "€24.00"

    first = mark_paid(client, purchase)
    assert first.status_code == 302 and first.headers["Location"] == "/admin/purchases"
    page = text(client.get("/admin/purchases"))
    assert "2 seats delivered. 1 waiting device received a seat." in page
    assert rows(page, "admin-purchase-row") == []
    again = mark_paid(client, purchase, page="/")
    assert again.status_code == 302
    assert "already paid; nothing was delivered twice" in text(client.get("/admin/purchases"))

    db.session.expire_all()
    [pack] = purchases.packs(vendor.setup.tenant.id)
    assert (pack.seats, pack.seats_used, pack.purchase_id) == (2, 1, purchase.id)
    assert licences.current_licence(waiting.id) is not None
    paid = db.session.get(Purchase, purchase.id)
    assert paid is not None and (paid.status, paid.paid_by_id) == (PurchaseStatus.PAID, admin.id)
    [entry] = db.session.scalars(select(AuditEntry).where(AuditEntry.action == "purchase.paid"))
    assert (entry.tenant_id, entry.actor_user_id, entry.actor_label) == (
        vendor.setup.tenant.id, admin.id, admin.email)


def test_a_package_marked_paid_twice_grants_its_credits_once(
        client: Any, vendor: Vendor, admin: User) -> None:
    offer = make_offer(credits=10_000)
    MembershipFactory(tenant=vendor.setup.tenant, user=admin, role=Role.VIEWER)
    log_in_as(client, vendor)
    assert order_package(client, offer.id, 2).status_code == 302
    [purchase] = purchases_of(vendor)
    client.post("/logout", data={"csrf_token": csrf(client, "/")})

    # A platform administrator who is a member sees the button on the tenant's own list.
    login(client, admin.email)
    listed = text(client.get("/billing/purchases"))
    assert listed.count('data-testid="purchase-mark-paid"') == 1
    back = f"/admin/purchases/{purchase.id}/mark-paid?next=/billing/purchases"
    for _ in range(2):
        response = post(client, back, page="/billing/purchases")
        assert response.status_code == 302 and response.headers["Location"] == \
            "/billing/purchases"

    db.session.expire_all()
    packages = reports.packages(vendor.setup.tenant.id)
    assert [p.credits for p in packages] == [10_000, 10_000]
    grants = db.session.scalar(select(func.count()).select_from(LedgerEntry).where(
        LedgerEntry.tenant_id == vendor.setup.tenant.id, LedgerEntry.kind == EntryKind.GRANT))
    assert grants == 2
    page = text(client.get("/billing/packages"))
    assert [cell(r, "package-balance") for r in rows(page, "package-row")] == ["10,000"] * 2
    assert re.search(r'data-testid="packages-live-credits">20,000<', page)
    assert 'data-testid="purchase-mark-paid"' not in text(client.get("/billing/purchases"))


def test_only_platform_admins_mark_paid_and_a_cancelled_purchase_stays_cancelled(
        client: Any, vendor: Vendor, admin: User) -> None:
    offer = make_offer()
    purchase = purchases.order_package(vendor.setup.tenant.id, "EUR", offer.id)
    db.session.commit()
    log_in_as(client, vendor)  # the tenant's owner is no platform administrator
    assert client.get("/admin/purchases").status_code == 404
    assert mark_paid(client, purchase, page="/").status_code == 404
    assert purchases_of(vendor)[0].status is PurchaseStatus.PENDING

    purchases.cancel(purchases_of(vendor)[0])
    db.session.commit()
    client.post("/logout", data={"csrf_token": csrf(client, "/")})
    login(client, admin.email)
    assert mark_paid(client, purchase).status_code == 302
    assert "Only a pending purchase can be marked paid." in text(client.get("/admin/purchases"))
    assert purchases_of(vendor)[0].status is PurchaseStatus.CANCELLED
    assert reports.packages(vendor.setup.tenant.id) == []
    assert post(client, f"/admin/purchases/{uuid.uuid4()}/mark-paid",
                page="/admin/purchases").status_code == 404


# --- licences ----------------------------------------------------------------------------------


def test_licences_page_shows_packs_devices_without_a_seat_and_licences_ending(
        client: Any, vendor: Vendor) -> None:
    tenant_id = vendor.setup.tenant.id
    monthly = make_plan(term_months=1, grace_days=14)
    yearly = make_plan(term_months=12)
    buy_seats(tenant_id, monthly, 1)
    ending = fleet.create_device(vendor.product, "SN-ENDING")
    db.session.flush()
    licences.assign(tenant_id, ending.id, at=utcnow() - dt.timedelta(days=20))
    fleet.activate(ending)  # keeps its live licence
    db.session.commit()
    buy_seats(tenant_id, yearly, 3)
    make_device(vendor.product, "SN-YEARLY", status=DeviceStatus.ACTIVE)
    make_device(vendor.product, "SN-PROVISIONED")
    log_in_as(client, vendor)
    page = text(client.get("/billing/licences"))
    packs = rows(page, "pack-row")
    assert [(cell(r, "pack-seats"), cell(r, "pack-used"), cell(r, "pack-free"))
            for r in packs] == [("1", "1", "0"), ("3", "1", "2")]
    assert rows(page, "unlicensed-row") == [] and 'data-testid="unlicensed-count">0<' in page
    assert [re.search(r'data-serial="([^"]+)"', r).group(1)  # type: ignore[union-attr]
            for r in rows(page, "ending-row")] == ["SN-ENDING"]

    # The yearly pack's last two seats go; the next two activations find none.
    for serial in ("SN-A", "SN-B", "SN-C", "SN-D"):
        make_device(vendor.product, serial, status=DeviceStatus.ACTIVE)
    make_device(vendor.product, "SN-RETIRED", status=DeviceStatus.RETIRED)
    page = text(client.get("/billing/licences"))
    assert [re.search(r'data-serial="([^"]+)"', r).group(1)  # type: ignore[union-attr]
            for r in rows(page, "unlicensed-row")] == ["SN-C", "SN-D"]
    assert 'data-testid="unlicensed-count">2<' in page
    assert [cell(r, "pack-free") for r in rows(page, "pack-row")] == ["0", "0"]


# --- packages and the burn-down ----------------------------------------------------------------


def test_the_burn_down_is_the_balance_at_the_end_of_each_local_day(
        client: Any, vendor: Vendor) -> None:
    tenant = vendor.setup.tenant
    zone = zoneinfo.ZoneInfo(tenant.timezone)
    today = utcnow().astimezone(zone).date()

    def noon(days_ago: int) -> dt.datetime:
        return dt.datetime.combine(today - dt.timedelta(days=days_ago), dt.time(12), zone)

    package = CreditPackage(tenant_id=tenant.id, name="Starter credits", credits=1000,
                            starts_at=noon(40), expires_at=noon(40) + dt.timedelta(days=90))
    db.session.add(package)
    db.session.flush()
    account = ledger.package_account(package.id)
    for days_ago, kind, credits in ((40, EntryKind.GRANT, 1000), (35, EntryKind.CONSUMPTION, -100),
                                    (10, EntryKind.CONSUMPTION, -200),
                                    (3, EntryKind.CONSUMPTION, -50),
                                    (3, EntryKind.CONSUMPTION, -25),
                                    (0, EntryKind.CONSUMPTION, -5)):
        db.session.add(LedgerEntry(tenant_id=tenant.id, account=account, kind=kind,
                                   credits=credits, cause_type="usage_event",
                                   cause_id=uuid.uuid4().hex, created_at=noon(days_ago)))
    db.session.commit()
    expected = [900] * 19 + [700] * 7 + [625] * 3 + [620]  # day 0 is 29 days ago

    log_in_as(client, vendor)
    page = text(client.get("/billing/packages"))
    [row] = rows(page, "package-row")
    assert cell(row, "package-balance") == "620" and cell(row, "package-credits") == "1,000"
    shown = re.search(r'data-balances="([^"]+)"', row)
    assert shown and [int(v) for v in shown.group(1).split(",")] == expected
    points = re.search(r'<polyline points="([^"]+)"', row)
    assert points and len(points.group(1).split()) == 30


def test_a_day_window_follows_the_tenants_calendar_across_daylight_saving() -> None:
    window = reports.DayWindow.ending_today(
        "Europe/Berlin", days=3, now=dt.datetime(2026, 3, 30, 10, tzinfo=dt.UTC))
    assert window.days == (dt.date(2026, 3, 28), dt.date(2026, 3, 29), dt.date(2026, 3, 30))
    assert window.bounds[0] == dt.datetime(2026, 3, 27, 23, tzinfo=dt.UTC)
    assert [b - a for a, b in zip(window.bounds, window.bounds[1:], strict=False)] == [
        dt.timedelta(hours=24), dt.timedelta(hours=23), dt.timedelta(hours=24)]


# --- usage -------------------------------------------------------------------------------------


def usage(vendor: Vendor, device: Device, at: dt.datetime, credits: int,
          **units: int) -> UsageEventRecord:
    record = UsageEventRecord(
        tenant_id=vendor.setup.tenant.id, device_id=device.id, product_id=device.product_id,
        request_id=uuid.uuid4().hex, admitted_at=at, settled_at=at + dt.timedelta(seconds=2),
        stream_id="s", kind="text", provider="local", model="local", credits=credits,
        credit_split={}, duration_ms=2000.0, finish="stop", broker="b", settled_by="broker",
        **units)
    db.session.add(record)
    return record


def test_usage_per_day_product_and_device_and_the_csv_exactly(client: Any,
                                                              vendor: Vendor) -> None:
    tenant = vendor.setup.tenant
    zone = zoneinfo.ZoneInfo(tenant.timezone)
    today = utcnow().astimezone(zone).date()
    earlier = today - dt.timedelta(days=2)

    def at(day: dt.date, hour: int) -> dt.datetime:
        return dt.datetime.combine(day, dt.time(hour), zone)

    glasses, _ = fleet.create_product(tenant.id, "=Glasses", HardwareKind.GLASSES)
    bear = make_device(vendor.product, "SN-BEAR", status=DeviceStatus.ACTIVE)
    owl = make_device(vendor.product, "SN-OWL", status=DeviceStatus.ACTIVE)
    specs = make_device(glasses, "SN-SPECS", status=DeviceStatus.ACTIVE)
    usage(vendor, bear, at(earlier, 9), 5, input_tokens=120, output_tokens=80)
    usage(vendor, bear, at(earlier, 23), 11, input_tokens=2500, output_tokens=1001)
    usage(vendor, owl, at(earlier, 10), 25, input_tokens=300, output_tokens=150,
          audio_in_ms=61_000)
    usage(vendor, specs, at(today, 0), 9, input_tokens=900, output_tokens=200, images=2)
    usage(vendor, bear, at(today - dt.timedelta(days=30), 12), 1000)  # before the window
    other = make_vendor_in("EUR")
    theirs = make_device(other.product, "SN-THEIRS", status=DeviceStatus.ACTIVE)
    usage(other, theirs, at(today, 1), 77, input_tokens=1)
    db.session.commit()

    log_in_as(client, vendor, Role.VIEWER)
    page = text(client.get("/billing/usage"))
    days = rows(page, "usage-day-row")
    assert len(days) == 30 and f'data-day="{today.isoformat()}"' in days[0]
    assert (cell(days[0], "usage-requests"), cell(days[0], "usage-credits")) == ("1", "9")
    assert (cell(days[2], "usage-requests"), cell(days[2], "usage-credits")) == ("3", "41")
    assert re.search(r'data-metric="audio_in_ms">61,000<', days[2])
    [total] = rows(page, "usage-total-row")
    assert (cell(total, "usage-requests"), cell(total, "usage-credits")) == ("4", "50")
    products = rows(page, "usage-product-row")
    assert [cell(r, "usage-credits") for r in products] == ["41", "9"]
    this_month: dict[str, int] = {}
    for device, day, credits in ((bear, earlier, 16), (owl, earlier, 25), (specs, today, 9),
                                 (bear, today - dt.timedelta(days=30), 1000)):
        if (day.year, day.month) == (today.year, today.month):
            this_month[device.serial] = this_month.get(device.serial, 0) + credits
    by_device = {d.serial: cell(r, "usage-device-credits")
                 for r in rows(page, "usage-device-row")
                 for d in (bear, owl, specs) if str(d.id) in r}
    assert by_device == {serial: str(c) for serial, c in this_month.items()}

    response = client.get("/billing/usage.csv")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.is_streamed
    first, last = today - dt.timedelta(days=29), today
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="usage-{tenant.slug}-{first:%Y%m%d}-{last:%Y%m%d}.csv"')
    p, g = vendor.product.id, glasses.id
    assert text(response) == (
        "day,product_id,product,device_id,serial,requests,credits,input_tokens,output_tokens,"
        "audio_in_ms,audio_out_ms,images,tool_calls\n"
        f"{earlier},{p},Companion Bear,{bear.id},SN-BEAR,2,16,2620,1081,0,0,0,0\n"
        f"{earlier},{p},Companion Bear,{owl.id},SN-OWL,1,25,300,150,61000,0,0,0\n"
        f"{today},{g},'=Glasses,{specs.id},SN-SPECS,1,9,900,200,0,0,2,0\n")

    only_bear = text(client.get(f"/billing/usage.csv?device_id={bear.id}"))
    assert only_bear.splitlines()[1:] == [
        f"{earlier},{p},Companion Bear,{bear.id},SN-BEAR,2,16,2620,1081,0,0,0,0"]
    only_glasses = text(client.get(f"/billing/usage?product_id={g}"))
    [total] = rows(only_glasses, "usage-total-row")
    assert cell(total, "usage-credits") == "9"


def test_another_tenants_ids_answer_404_and_its_rows_never_show(
        client: Any, vendor: Vendor, other_vendor: Vendor) -> None:
    offer, plan = make_offer(), make_plan()
    theirs = make_device(other_vendor.product, "SN-THEIRS", status=DeviceStatus.ACTIVE)
    their_purchase = purchases.order_package(other_vendor.setup.tenant.id, "EUR", offer.id)
    purchases.mark_paid(purchases.order_package(other_vendor.setup.tenant.id, "EUR", offer.id))
    buy_seats(other_vendor.setup.tenant.id, plan, 1)
    usage(other_vendor, theirs, utcnow(), 7)
    db.session.commit()

    log_in_as(client, vendor)
    for url in ("/billing/usage", "/billing/usage.csv"):
        for query in (f"device_id={theirs.id}", f"product_id={other_vendor.product.id}",
                      "device_id=not-an-id"):
            assert client.get(f"{url}?{query}").status_code == 404, (url, query)
    secrets = {str(theirs.id), theirs.serial, str(their_purchase.id),
               str(other_vendor.product.id)}
    for url in (*PAGES, "/billing/usage.csv"):
        shown = text(client.get(url))
        assert not {s for s in secrets if s in shown}, url
    # Marking paid is the platform's, never a tenant member's: their purchase stays pending.
    assert mark_paid(client, their_purchase, page="/").status_code == 404
    db.session.refresh(their_purchase)
    assert their_purchase.status is PurchaseStatus.PENDING
    assert db.session.scalar(select(func.count()).select_from(LicencePack).where(
        LicencePack.tenant_id == vendor.setup.tenant.id)) == 0


def test_the_pages_speak_simplified_chinese(client: Any, vendor: Vendor) -> None:
    plan = make_plan()
    purchases.order_pack(vendor.setup.tenant.id, "EUR", plan.id, 1)
    db.session.commit()
    post(client, "/language", {"locale": "zh_Hans"}, page="/login")
    log_in_as(client, vendor)
    assert "计费" in text(client.get("/billing/licences"))
    listed = text(client.get("/billing/purchases"))
    assert "1 个席位" in listed and "待付款" in listed and "€12.00" in listed
    assert "本月" in text(client.get("/billing/usage"))
