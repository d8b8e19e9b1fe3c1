"""The dashboard, the tenant switcher and the language switcher."""

from __future__ import annotations

import datetime as dt
import decimal

from flask import abort, flash, g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from sqlalchemy import func, select
from werkzeug.wrappers import Response

from accounts.models import Membership
from core.db import db
from core.tenancy import scoped
from fleet import presence
from fleet import services as fleet_services
from portal.blueprint import before_two_factor, bp, public
from portal.labels import LANGUAGE_NAMES
from portal.login_session import safe_next

# Shown on the empty dashboard so a vendor sees how money and time will look.
EXAMPLE_AMOUNT = decimal.Decimal("12800.50")


@bp.route("/")
def dashboard() -> str:
    tenant = g.get("tenant")
    members = 0
    fleet = None
    if tenant is not None:
        members = db.session.execute(
            select(func.count()).select_from(scoped(Membership).subquery())
        ).scalar_one()
        by_status = fleet_services.count_by_status(tenant.id)
        fleet = {"total": sum(by_status.values()), "by_status": by_status,
                 "online": presence.online_count(tenant.id)}
    return render_template("dashboard.html", tenant=tenant, members=members, fleet=fleet,
                           example_amount=EXAMPLE_AMOUNT, now=dt.datetime.now(dt.UTC))


@bp.route("/tenant/switch", methods=["POST"])
@before_two_factor
def switch_tenant() -> Response:
    wanted = request.form.get("tenant_id", "")
    member = next((m for m in g.get("memberships", []) if str(m.tenant_id) == wanted), None)
    if member is None:
        abort(404)
    session["tenant_id"] = str(member.tenant_id)
    flash(_("You are now working in %(tenant)s.", tenant=member.tenant.name), "info")
    return redirect(safe_next(request.form.get("next"), url_for("portal.dashboard")))


@bp.route("/language", methods=["POST"])
@public
def switch_language() -> Response:
    locale = request.form.get("locale", "")
    if locale not in LANGUAGE_NAMES:
        abort(400)
    session["locale"] = locale
    return redirect(safe_next(request.form.get("next"), url_for("portal.dashboard")))
