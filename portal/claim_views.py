"""Claiming the six-digit code a bootstrapping device shows: the device is activated for this
tenant and picks up its credentials on its next poll."""

from __future__ import annotations

from flask import render_template
from flask_babel import gettext as _

from accounts import permissions as perm
from accounts.auth import require
from core.db import db
from core.errors import EnsoulError, RateLimited
from core.tenancy import current_tenant_id
from fleet import activation
from fleet.models import Device
from portal.blueprint import bp
from portal.fleet_forms import ClaimForm
from portal.labels import error_text


def _render(form: ClaimForm, claimed: Device | None = None, status: int = 200) -> tuple[str, int]:
    return render_template("fleet/claim.html", form=form, claimed=claimed), status


@bp.route("/fleet/claim")
@require(perm.FLEET_WRITE)
def claim() -> tuple[str, int]:
    return _render(ClaimForm(formdata=None))


@bp.route("/fleet/claim", methods=["POST"])
@require(perm.FLEET_WRITE)
def claim_code() -> tuple[str, int]:
    form = ClaimForm()
    if not form.validate_on_submit():
        return _render(form, status=422)
    code = "".join((form.code.data or "").split())
    try:
        activation.check_claim_rate(current_tenant_id())
        # A savepoint: what a refusing activation hook may have written goes with it.
        with db.session.begin_nested():
            device = activation.claim(current_tenant_id(), code,
                                      end_user_ref=form.end_user_ref.data or None)
    # A refused code is a form error answered with 200, like a wrong password at login: the
    # request's transaction ends as usual (the counter against guessing lives in Redis).
    except RateLimited as exc:
        minutes = max(1, round((exc.retry_after or 60) / 60))
        form.code.errors = [_("Too many wrong codes. Try again in %(n)d minutes.", n=minutes)]
        return _render(form)
    except EnsoulError as exc:
        form.code.errors = [error_text(exc)]
        return _render(form)
    return _render(ClaimForm(formdata=None), claimed=device)
