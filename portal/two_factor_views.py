"""Enrolling in and leaving TOTP two-factor authentication."""

from __future__ import annotations

from typing import Any

import pyotp
import segno
from flask import flash, g, redirect, render_template, url_for
from flask_babel import gettext as _
from markupsafe import Markup
from werkzeug.wrappers import Response

from accounts import two_factor
from core.errors import EnsoulError
from portal.blueprint import before_two_factor, bp
from portal.forms import DisableTwoFactorForm, EnrolTwoFactorForm
from portal.labels import error_text


def _render(status: int = 200, form: Any = None) -> tuple[str, int]:
    user = g.actor_user
    secret = None if user.totp_enabled else two_factor.pending_secret(user)
    qr = None
    if secret is not None:
        uri = pyotp.TOTP(secret).provisioning_uri(name=user.email,
                                                  issuer_name=two_factor.ISSUER)
        qr = Markup(segno.make(uri, error="m").svg_inline(scale=5, border=2))  # noqa: S704
    if form is None:
        form = (DisableTwoFactorForm if user.totp_enabled else EnrolTwoFactorForm)(formdata=None)
    return render_template("two_factor.html", user=user, secret=secret, qr=qr, form=form), status


@bp.route("/settings/two-factor", endpoint="two_factor")
@before_two_factor
def two_factor_page() -> tuple[str, int]:
    return _render()


@bp.route("/settings/two-factor/begin", methods=["POST"])
@before_two_factor
def two_factor_begin() -> Response:
    two_factor.begin_enrolment(g.actor_user)
    return redirect(url_for("portal.two_factor"))


@bp.route("/settings/two-factor/confirm", methods=["POST"])
@before_two_factor
def two_factor_confirm() -> Response | tuple[str, int]:
    form = EnrolTwoFactorForm()
    if not form.validate_on_submit():
        return _render(422, form)
    try:
        two_factor.confirm_enrolment(g.actor_user, form.code.data or "")
    except EnsoulError as exc:
        form.code.errors = [error_text(exc)]
        return _render(422, form)
    flash(_("Two-factor authentication is on. You will be asked for a code when you log in."),
          "success")
    return redirect(url_for("portal.two_factor"))


@bp.route("/settings/two-factor/disable", methods=["POST"])
@before_two_factor
def two_factor_disable() -> Response | tuple[str, int]:
    form = DisableTwoFactorForm()
    if not form.validate_on_submit():
        return _render(422, form)
    try:
        two_factor.verify(g.actor_user, form.code.data or "")
    except EnsoulError as exc:
        form.code.errors = [error_text(exc)]
        return _render(422, form)
    two_factor.disable(g.actor_user)
    flash(_("Two-factor authentication is off."), "info")
    return redirect(url_for("portal.two_factor"))
