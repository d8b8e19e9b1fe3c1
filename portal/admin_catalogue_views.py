"""Platform administration of the catalogue: licence plans (created, taken off sale, put back),
their rate card versions (published for now or later) and package offers. The services in
``billing.catalog`` validate and audit; these pages only collect and show. Others get a 404."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import flash, redirect, render_template, url_for
from flask_babel import gettext as _
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from werkzeug.wrappers import Response

from billing import catalog
from billing.models import METRICS, PackageOffer, Plan, PlanBilling, RateCard
from core.db import db, utcnow
from core.errors import Conflict, EnsoulError
from portal.admin_views import platform_admin
from portal.blueprint import bp
from portal.catalogue_forms import PackageOfferForm, PlanForm, RateCardForm
from portal.forms import apply_error


def _code_taken(form: PlanForm | PackageOfferForm) -> None:
    form.code.errors = [*form.code.errors, _("This code is taken.")]


# --- plans -------------------------------------------------------------------------------------


def _render_plans(form: PlanForm | None = None, status: int = 200) -> tuple[str, int]:
    plans = db.session.scalars(select(Plan).options(selectinload(Plan.prices))
                               .order_by(Plan.active.desc(), Plan.name, Plan.code)).all()
    versions = dict(db.session.execute(select(RateCard.plan_id, func.max(RateCard.version))
                                       .group_by(RateCard.plan_id)).all())
    return render_template("admin_plans.html", plans=plans, versions=versions,
                           form=form or PlanForm(formdata=None)), status


@bp.route("/admin/plans")
@platform_admin
def admin_plans() -> tuple[str, int]:
    return _render_plans()


@bp.route("/admin/plans", methods=["POST"])
@platform_admin
def admin_create_plan() -> Response | tuple[str, int]:
    form = PlanForm()
    if not form.validate_on_submit():
        return _render_plans(form, status=422)
    try:
        plan = catalog.create_plan(
            form.code.data or "", form.name.data or "", billing=PlanBilling(form.billing.data),
            term_months=form.term_months.data or 0, grace_days=form.grace_days.data or 0,
            allowance_credits=form.allowance_credits.data or 0,
            requests_per_minute=form.requests_per_minute.data or 0,
            concurrent_streams=form.concurrent_streams.data or 0,
            daily_request_cap=form.daily_request_cap.data, modalities=form.modalities.data,
            prices=form.price_map())
    except Conflict as exc:
        _code_taken(form)
        return _render_plans(form, status=exc.http_status)
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render_plans(form, status=exc.http_status)
    flash(_("The plan %(plan)s is created. Publish its rate card next.", plan=plan.name),
          "success")
    return redirect(url_for("portal.admin_plan", plan_id=plan.id))


@bp.route("/admin/plans/<plan_id>/deactivate", methods=["POST"])
@platform_admin
def admin_deactivate_plan(plan_id: str) -> Response:
    plan = catalog.get_plan(plan_id)
    catalog.set_plan_active(plan, False)
    flash(_("%(plan)s is no longer sold. Seats already bought keep working.", plan=plan.name),
          "success")
    return redirect(url_for("portal.admin_plans"))


@bp.route("/admin/plans/<plan_id>/reactivate", methods=["POST"])
@platform_admin
def admin_reactivate_plan(plan_id: str) -> Response:
    plan = catalog.get_plan(plan_id)
    catalog.set_plan_active(plan, True)
    flash(_("%(plan)s is on sale again.", plan=plan.name), "success")
    return redirect(url_for("portal.admin_plans"))


# --- a plan's rate card ------------------------------------------------------------------------


def _rate_card_defaults(plan: Plan, newest: RateCard | None, now: dt.datetime
                        ) -> dict[str, Any]:
    """The newest version's rates and overage prices (or the plan's currencies), to edit."""
    rates = {r.metric: {"block_units": r.block_units, "credits_per_block": r.credits_per_block}
             for r in (newest.rates if newest else [])}
    prices = ([{"currency": p.currency, "credit_price": p.credit_price_minor}
               for p in newest.overage_prices] if newest and newest.overage_prices
              else [{"currency": p.currency} for p in plan.prices])
    return {"rates": rates, "prices": prices[:3],
            "effective_from": now.replace(second=0, microsecond=0, tzinfo=None)}


def _render_plan(plan: Plan, form: RateCardForm | None = None,
                 status: int = 200) -> tuple[str, int]:
    now = utcnow()
    cards = db.session.scalars(
        select(RateCard).where(RateCard.plan_id == plan.id)
        .options(selectinload(RateCard.rates), selectinload(RateCard.overage_prices))
        .order_by(RateCard.version.desc())).all()
    current = catalog.rate_card_at(plan.id, now)
    if form is None:
        form = RateCardForm(formdata=None,
                            data=_rate_card_defaults(plan, cards[0] if cards else None, now))
    return render_template("admin_plan.html", plan=plan, cards=cards, now=now,
                           current_id=current.id if current else None, form=form,
                           metrics=METRICS), status


@bp.route("/admin/plans/<plan_id>")
@platform_admin
def admin_plan(plan_id: str) -> tuple[str, int]:
    return _render_plan(catalog.get_plan(plan_id))


@bp.route("/admin/plans/<plan_id>/rate-cards", methods=["POST"])
@platform_admin
def admin_publish_rate_card(plan_id: str) -> Response | tuple[str, int]:
    plan = catalog.get_plan(plan_id)
    form = RateCardForm()
    if not form.validate_on_submit():
        return _render_plan(plan, form, status=422)
    try:
        card = catalog.publish_rate_card(plan, form.rate_map(),
                                         overage_prices=form.overage_map(),
                                         effective_from=form.starts(utcnow()))
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render_plan(plan, form, status=exc.http_status)
    flash(_("Version %(version)s of the rate card of %(plan)s is published.",
            version=card.version, plan=plan.name), "success")
    return redirect(url_for("portal.admin_plan", plan_id=plan.id))


# --- package offers ----------------------------------------------------------------------------


def _render_offers(form: PackageOfferForm | None = None, status: int = 200) -> tuple[str, int]:
    offers = db.session.scalars(
        select(PackageOffer).options(selectinload(PackageOffer.prices))
        .order_by(PackageOffer.active.desc(), PackageOffer.credits, PackageOffer.code)).all()
    return render_template("admin_package_offers.html", offers=offers,
                           form=form or PackageOfferForm(formdata=None)), status


@bp.route("/admin/package-offers")
@platform_admin
def admin_package_offers() -> tuple[str, int]:
    return _render_offers()


@bp.route("/admin/package-offers", methods=["POST"])
@platform_admin
def admin_create_package_offer() -> Response | tuple[str, int]:
    form = PackageOfferForm()
    if not form.validate_on_submit():
        return _render_offers(form, status=422)
    try:
        offer = catalog.create_package_offer(form.code.data or "", form.name.data or "",
                                             form.credits.data or 0,
                                             form.validity_days.data or 0, form.price_map())
    except Conflict as exc:
        _code_taken(form)
        return _render_offers(form, status=exc.http_status)
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render_offers(form, status=exc.http_status)
    flash(_("The package offer %(offer)s is on sale.", offer=offer.name), "success")
    return redirect(url_for("portal.admin_package_offers"))


@bp.route("/admin/package-offers/<offer_id>/deactivate", methods=["POST"])
@platform_admin
def admin_deactivate_package_offer(offer_id: str) -> Response:
    offer = catalog.get_offer(offer_id)
    catalog.set_offer_active(offer, False)
    flash(_("%(offer)s is no longer sold. Packages already bought keep their credits.",
            offer=offer.name), "success")
    return redirect(url_for("portal.admin_package_offers"))


@bp.route("/admin/package-offers/<offer_id>/reactivate", methods=["POST"])
@platform_admin
def admin_reactivate_package_offer(offer_id: str) -> Response:
    offer = catalog.get_offer(offer_id)
    catalog.set_offer_active(offer, True)
    flash(_("%(offer)s is on sale again.", offer=offer.name), "success")
    return redirect(url_for("portal.admin_package_offers"))
