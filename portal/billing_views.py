"""The billing pages: licences (packs, devices without a seat, licences ending soon, ordering
seats), packages (balances and a burn-down per package, ordering one) and purchases; for
platform administrators, the pending purchases of every tenant and marking one paid."""

from __future__ import annotations

import uuid

from flask import flash, redirect, render_template, request, url_for
from flask_babel import format_number, ngettext
from flask_babel import gettext as _
from sqlalchemy import select
from werkzeug.wrappers import Response
from wtforms import SelectChoice

from accounts import permissions as perm
from accounts.auth import current_actor_user, current_tenant, require
from accounts.models import Tenant
from billing import purchases, reports
from billing.models import (
    PackageOffer,
    Plan,
    PlanBilling,
    PlanPrice,
    Purchase,
    PurchaseKind,
    PurchaseStatus,
)
from core.db import db, get_by_id, utcnow
from core.errors import Conflict, EnsoulError
from core.pagination import paginate
from core.tenancy import scoped
from portal.admin_views import platform_admin
from portal.billing_forms import PackageOrderForm, PackOrderForm
from portal.billing_labels import money
from portal.blueprint import bp
from portal.forms import apply_error
from portal.login_session import safe_next

PAGE_SIZE = 50
ADMIN_LISTED = 200
CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 240, 48, 3


def _user_id() -> uuid.UUID | None:
    user = current_actor_user()
    return user.id if user is not None else None


# --- licences ----------------------------------------------------------------------------------


def _plans_on_sale(currency: str) -> list[tuple[Plan, PlanPrice]]:
    """Prepaid plans sold in ``currency`` (seats are bought in packs only for those)."""
    plans = db.session.scalars(select(Plan).where(Plan.active.is_(True),
                                                  Plan.billing == PlanBilling.PREPAID)
                               .order_by(Plan.name, Plan.code))
    return [(plan, price) for plan in plans for price in plan.prices
            if price.currency == currency]


def _pack_form(on_sale: list[tuple[Plan, PlanPrice]], *, submitted: bool = True
               ) -> PackOrderForm:
    form = PackOrderForm() if submitted else PackOrderForm(formdata=None)
    form.plan_id.choices = [
        SelectChoice(str(plan.id), ngettext("%(plan)s: %(price)s per seat for %(num)d month",
                                            "%(plan)s: %(price)s per seat for %(num)d months",
                                            plan.term_months, plan=plan.name,
                                            price=money(price.seat_price_minor, price.currency)))
        for plan, price in on_sale]
    return form


def _render_licences(form: PackOrderForm | None = None, status: int = 200) -> tuple[str, int]:
    tenant = current_tenant()
    now = utcnow()
    on_sale = _plans_on_sale(tenant.currency)
    unlicensed, unlicensed_total = reports.unlicensed_devices(tenant.id, at=now)
    ending, ending_total = reports.licences_ending(tenant.id, at=now)
    return render_template(
        "billing/licences.html", tenant=tenant, now=now, packs=purchases.packs(tenant.id),
        unlicensed=unlicensed, unlicensed_total=unlicensed_total, ending=ending,
        ending_total=ending_total, ending_days=reports.ENDING_WITHIN.days,
        form=form or _pack_form(on_sale, submitted=False), on_sale=bool(on_sale)), status


@bp.route("/billing/licences")
@require(perm.BILLING_READ)
def billing_licences() -> tuple[str, int]:
    return _render_licences()


@bp.route("/billing/licences", methods=["POST"])
@require(perm.BILLING_WRITE)
def order_seats() -> Response | tuple[str, int]:
    tenant = current_tenant()
    on_sale = _plans_on_sale(tenant.currency)
    form = _pack_form(on_sale)
    if not form.validate_on_submit():
        return _render_licences(form, status=422)
    try:
        purchase = purchases.order_pack(tenant.id, tenant.currency, form.plan_id.data or "",
                                        form.quantity.data or 0, user_id=_user_id())
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render_licences(form, status=exc.http_status)
    plan = next(plan for plan, _price in on_sale if plan.id == purchase.plan_id)
    flash(ngettext("You ordered %(n)s seat of %(plan)s for %(amount)s. The order is pending "
                   "until it is paid.",
                   "You ordered %(n)s seats of %(plan)s for %(amount)s. The order is pending "
                   "until it is paid.", purchase.quantity, n=format_number(purchase.quantity),
                   plan=plan.name, amount=money(purchase.amount_minor, purchase.currency)),
          "success")
    return redirect(url_for("portal.billing_purchases"))


# --- packages ----------------------------------------------------------------------------------


def _offers_on_sale(currency: str) -> list[tuple[PackageOffer, int]]:
    offers = db.session.scalars(select(PackageOffer).where(PackageOffer.active.is_(True))
                                .order_by(PackageOffer.credits, PackageOffer.code))
    return [(offer, price.price_minor) for offer in offers for price in offer.prices
            if price.currency == currency]


def _package_form(on_sale: list[tuple[PackageOffer, int]], currency: str, *,
                  submitted: bool = True) -> PackageOrderForm:
    form = PackageOrderForm() if submitted else PackageOrderForm(formdata=None)
    form.offer_id.choices = [
        SelectChoice(str(offer.id), ngettext(
            "%(offer)s: %(credits)s credits for %(num)d day, %(price)s",
            "%(offer)s: %(credits)s credits for %(num)d days, %(price)s", offer.validity_days,
            offer=offer.name, credits=format_number(offer.credits), price=money(price, currency)))
        for offer, price in on_sale]
    return form


def chart_points(balances: list[int], top: int) -> str:
    """A burn-down's polyline: one point per day, from the left; ``top`` credits at the top,
    zero (or the lowest balance, when it is below zero) at the bottom."""
    high = max(top, *balances, 1)
    low = min(0, *balances)
    step = (CHART_WIDTH - 2 * CHART_PAD) / max(len(balances) - 1, 1)
    scale = (CHART_HEIGHT - 2 * CHART_PAD) / (high - low)
    return " ".join(f"{CHART_PAD + i * step:.1f},{CHART_PAD + (high - value) * scale:.1f}"
                    for i, value in enumerate(balances))


def _render_packages(form: PackageOrderForm | None = None,
                     status: int = 200) -> tuple[str, int]:
    tenant = current_tenant()
    now = utcnow()
    window = reports.DayWindow.ending_today(tenant.timezone, now=now)
    packages = reports.packages(tenant.id)
    balances = reports.package_balances(tenant.id)
    series = reports.burn_down(tenant.id, [p for p in packages if p.expires_at > window.start],
                               window)
    charts = {p.id: {"points": chart_points(series[p.id], p.credits), "balances": series[p.id]}
              for p in packages if p.id in series}
    live = sum(balances.get(p.id, 0) for p in packages if p.starts_at <= now < p.expires_at)
    on_sale = _offers_on_sale(tenant.currency)
    return render_template(
        "billing/packages.html", tenant=tenant, now=now, packages=packages, balances=balances,
        live_credits=live, charts=charts, window=window, chart_size=(CHART_WIDTH, CHART_HEIGHT),
        form=form or _package_form(on_sale, tenant.currency, submitted=False),
        on_sale=bool(on_sale)), status


@bp.route("/billing/packages")
@require(perm.BILLING_READ)
def billing_packages() -> tuple[str, int]:
    return _render_packages()


@bp.route("/billing/packages", methods=["POST"])
@require(perm.BILLING_WRITE)
def order_package() -> Response | tuple[str, int]:
    tenant = current_tenant()
    on_sale = _offers_on_sale(tenant.currency)
    form = _package_form(on_sale, tenant.currency)
    if not form.validate_on_submit():
        return _render_packages(form, status=422)
    try:
        purchase = purchases.order_package(tenant.id, tenant.currency, form.offer_id.data or "",
                                           form.quantity.data or 0, user_id=_user_id())
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render_packages(form, status=exc.http_status)
    offer = next(offer for offer, _price in on_sale if offer.id == purchase.offer_id)
    flash(ngettext("You ordered %(n)s package of %(offer)s for %(amount)s. The order is "
                   "pending until it is paid.",
                   "You ordered %(n)s packages of %(offer)s for %(amount)s. The order is "
                   "pending until it is paid.", purchase.quantity,
                   n=format_number(purchase.quantity), offer=offer.name,
                   amount=money(purchase.amount_minor, purchase.currency)), "success")
    return redirect(url_for("portal.billing_purchases"))


# --- purchases ---------------------------------------------------------------------------------


def _items(rows: list[Purchase]) -> dict[uuid.UUID, str]:
    """What each purchase bought: its plan's or its offer's name (the catalogue is public)."""
    plan_ids = {p.plan_id for p in rows if p.plan_id is not None}
    offer_ids = {p.offer_id for p in rows if p.offer_id is not None}
    names: dict[uuid.UUID | None, str] = {}
    if plan_ids:
        names.update((row.id, row.name) for row in db.session.execute(
            select(Plan.id, Plan.name).where(Plan.id.in_(plan_ids))))
    if offer_ids:
        names.update((row.id, row.name) for row in db.session.execute(
            select(PackageOffer.id, PackageOffer.name).where(PackageOffer.id.in_(offer_ids))))
    return {p.id: names.get(p.plan_id or p.offer_id, "") for p in rows}


def _is_platform_admin() -> bool:
    user = current_actor_user()
    return user is not None and user.is_platform_admin


@bp.route("/billing/purchases")
@require(perm.BILLING_READ)
def billing_purchases() -> str:
    cursor = request.args.get("cursor") or None
    page = paginate(scoped(Purchase), Purchase.id, {"cursor": cursor, "limit": PAGE_SIZE},
                    newest_first=True)
    return render_template("billing/purchases.html", purchases=page["items"],
                           items=_items(page["items"]), next_cursor=page["next_cursor"],
                           first_page=cursor is None, can_mark_paid=_is_platform_admin())


@bp.route("/admin/purchases")
@platform_admin
def admin_purchases() -> str:
    """Every tenant's pending purchases: platform administrators act across tenants."""
    pending = list(db.session.scalars(select(Purchase).where(
        Purchase.status == PurchaseStatus.PENDING).order_by(Purchase.id).limit(ADMIN_LISTED)))
    tenants = {t.id: t for t in db.session.scalars(select(Tenant).where(
        Tenant.id.in_({p.tenant_id for p in pending})))} if pending else {}
    return render_template("admin_purchases.html", purchases=pending, items=_items(pending),
                           tenants=tenants, listed=ADMIN_LISTED)


@bp.route("/admin/purchases/<purchase_id>/mark-paid", methods=["POST"])
@platform_admin
def admin_mark_purchase_paid(purchase_id: str) -> Response:
    """Deliver a pending purchase, as ``flask mark-purchase-paid`` does (payment comes with the
    finance issue). ``mark_paid`` locks the purchase's row: two administrators at once deliver
    it once; the request commits it."""
    purchase: Purchase = get_by_id(Purchase, purchase_id, "purchase")
    back = safe_next(request.args.get("next"), url_for("portal.admin_purchases"))
    tenant: Tenant = get_by_id(Tenant, purchase.tenant_id, "tenant")
    moment = utcnow()
    try:
        licensed = purchases.mark_paid(purchase, user_id=_user_id(), at=moment)
    except Conflict:
        flash(_("Only a pending purchase can be marked paid."), "danger")
        return redirect(back)
    if purchase.paid_at != moment:
        flash(_("This purchase was already paid; nothing was delivered twice."), "info")
    elif purchase.kind is PurchaseKind.LICENCE_PACK:
        delivered = ngettext("%(tenant)s: %(n)s seat delivered.",
                             "%(tenant)s: %(n)s seats delivered.", purchase.quantity,
                             tenant=tenant.name, n=format_number(purchase.quantity))
        if licensed:
            delivered += " " + ngettext("%(n)s waiting device received a seat.",
                                        "%(n)s waiting devices received a seat.", len(licensed),
                                        n=format_number(len(licensed)))
        flash(delivered, "success")
    else:
        flash(ngettext("%(tenant)s: %(n)s package of %(item)s delivered.",
                       "%(tenant)s: %(n)s packages of %(item)s delivered.", purchase.quantity,
                       tenant=tenant.name, n=format_number(purchase.quantity),
                       item=_items([purchase])[purchase.id]), "success")
    return redirect(back)

