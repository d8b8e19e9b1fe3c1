"""Logging in (with the TOTP second step), logging out and resetting a forgotten password."""

from __future__ import annotations

import time
import uuid

from flask import current_app, flash, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_login import current_user, logout_user
from werkzeug.wrappers import Response

from accounts import services, two_factor
from accounts.models import User
from accounts.services import AccountLocked
from core.db import db
from core.errors import Gone, Unauthorized
from core.ratelimit import client_ip, limiter
from portal.blueprint import before_two_factor, bp, public
from portal.forms import ForgotPasswordForm, LoginForm, ResetPasswordForm, TwoFactorLoginForm
from portal.labels import error_text
from portal.login_session import log_in, reset_session, safe_next

PENDING = "2fa_pending"
PENDING_SINCE = "2fa_pending_since"
PENDING_NEXT = "2fa_next"
PENDING_SECONDS = 300


def _login_limit() -> str:
    return str(current_app.config["ENSOUL_LOGIN_RATE_LIMIT"])


def _login_key() -> str:
    return "portal-login:" + client_ip()


def _finish(user: User, wanted: str | None) -> Response:
    log_in(user)
    return redirect(safe_next(wanted, url_for("portal.dashboard")))


@bp.route("/login", methods=["GET", "POST"])
@public
@limiter.limit(_login_limit, key_func=_login_key, methods=["POST"])
def login() -> Response | tuple[str, int]:
    if current_user.is_authenticated:
        return redirect(safe_next(request.args.get("next"), url_for("portal.dashboard")))
    form = LoginForm()
    if not form.is_submitted():
        form.next.data = request.args.get("next", "")
    if not form.validate_on_submit():
        return render_template("auth/login.html", form=form), 422 if form.errors else 200
    try:
        user = services.authenticate(form.email.data or "", form.password.data or "")
    except AccountLocked as exc:
        minutes = max(1, round((exc.retry_after or 60) / 60))
        form.form_errors.append(_("Too many failed logins. Try again in %(n)d minutes.",
                                  n=minutes))
        return render_template("auth/login.html", form=form), 200
    except Unauthorized as exc:
        # 200, not 401: the failure counter the service just raised must be committed.
        form.form_errors.append(error_text(exc))
        return render_template("auth/login.html", form=form), 200
    if user.totp_enabled:
        reset_session()
        session[PENDING] = str(user.id)
        session[PENDING_SINCE] = int(time.time())
        session[PENDING_NEXT] = form.next.data or ""
        return redirect(url_for("portal.login_two_factor"))
    return _finish(user, form.next.data)


def _pending_user() -> User | None:
    raw_id, since = session.get(PENDING), session.get(PENDING_SINCE, 0)
    if not raw_id or time.time() - since > PENDING_SECONDS:
        return None
    try:
        return db.session.get(User, uuid.UUID(raw_id))
    except ValueError:
        return None


@bp.route("/login/2fa", methods=["GET", "POST"])
@public
@limiter.limit(_login_limit, key_func=_login_key, methods=["POST"])
def login_two_factor() -> Response | tuple[str, int]:
    user = _pending_user()
    if user is None:
        if session.pop(PENDING, None):
            flash(_("The login took too long. Please log in again."), "warning")
        return redirect(url_for("portal.login"))
    form = TwoFactorLoginForm()
    if not form.validate_on_submit():
        return render_template("auth/login_2fa.html", form=form), 422 if form.errors else 200
    try:
        two_factor.verify(user, form.code.data or "")
    except Unauthorized as exc:
        form.code.errors = [error_text(exc)]
        return render_template("auth/login_2fa.html", form=form), 200
    return _finish(user, session.get(PENDING_NEXT))


@bp.route("/logout", methods=["POST"])
@public
@before_two_factor
def logout() -> Response:
    logout_user()
    reset_session()
    flash(_("You are logged out."), "info")
    return redirect(url_for("portal.login"))


@bp.route("/password/forgot", methods=["GET", "POST"])
@public
@limiter.limit(_login_limit, key_func=_login_key, methods=["POST"])
def forgot_password() -> Response | tuple[str, int]:
    form = ForgotPasswordForm()
    if not form.validate_on_submit():
        return render_template("auth/forgot.html", form=form), 422 if form.errors else 200
    services.request_password_reset(form.email.data or "")
    # The same answer whether or not the address is known: it must not reveal accounts.
    flash(_("If the address belongs to an account, we have sent a link to reset the password. "
            "It works once and expires soon."), "info")
    return redirect(url_for("portal.login"))


@bp.route("/password/reset/<token>", methods=["GET", "POST"])
@public
def reset_password(token: str) -> Response | tuple[str, int]:
    try:
        services.password_reset_by_token(token)
    except Gone as exc:
        return render_template("link_gone.html", error=exc, message=error_text(exc)), 410
    form = ResetPasswordForm()
    if not form.validate_on_submit():
        return render_template("auth/reset.html", form=form), 422 if form.errors else 200
    services.reset_password(token, form.password.data or "")
    if current_user.is_authenticated:
        logout_user()
        reset_session()
    flash(_("Your password is changed. Log in with the new one."), "success")
    return redirect(url_for("portal.login"))
