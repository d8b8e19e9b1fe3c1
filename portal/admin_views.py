"""Platform administration: every tenant, suspended or reactivated. Others get a 404."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import flash, g, redirect, render_template, url_for
from flask_babel import gettext as _
from sqlalchemy import func, select
from werkzeug.wrappers import Response

from accounts import services
from accounts.models import Membership, Tenant, TenantStatus
from core.db import db, get_by_id
from core.errors import NotFound
from portal.blueprint import bp
from portal.forms import SuspendTenantForm


def platform_admin(view: Callable[..., Any]) -> Callable[..., Any]:
    """Only for platform administrators; to anyone else the page does not exist."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user = g.get("actor_user")
        if user is None or not user.is_platform_admin:
            raise NotFound()
        return view(*args, **kwargs)

    return wrapper


def _tenant(tenant_id: str) -> Tenant:
    tenant: Tenant = get_by_id(Tenant, tenant_id, "tenant")
    return tenant


@bp.route("/admin/tenants")
@platform_admin
def admin_tenants() -> str:
    counts = dict(db.session.execute(
        select(Membership.tenant_id, func.count()).group_by(Membership.tenant_id)
    ).all())
    tenants = db.session.execute(select(Tenant).order_by(Tenant.name)).scalars().all()
    return render_template("admin_tenants.html", tenants=tenants, counts=counts,
                           form=SuspendTenantForm(formdata=None))


@bp.route("/admin/tenants/<tenant_id>/suspend", methods=["POST"])
@platform_admin
def admin_suspend_tenant(tenant_id: str) -> Response:
    tenant = _tenant(tenant_id)
    form = SuspendTenantForm()
    if not form.validate_on_submit():
        flash(_("Give a reason for the suspension."), "danger")
        return redirect(url_for("portal.admin_tenants"))
    services.set_tenant_status(tenant, TenantStatus.SUSPENDED, form.reason.data)
    flash(_("%(tenant)s is suspended.", tenant=tenant.name), "success")
    return redirect(url_for("portal.admin_tenants"))


@bp.route("/admin/tenants/<tenant_id>/reactivate", methods=["POST"])
@platform_admin
def admin_reactivate_tenant(tenant_id: str) -> Response:
    tenant = _tenant(tenant_id)
    services.set_tenant_status(tenant, TenantStatus.ACTIVE)
    flash(_("%(tenant)s is active again.", tenant=tenant.name), "success")
    return redirect(url_for("portal.admin_tenants"))
