"""Settings: the user's own profile (language, password) and, for owners, the organisation's."""

from __future__ import annotations

from typing import Any

from flask import flash, g, redirect, render_template, session, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from accounts import permissions as perm
from accounts import services
from accounts.auth import current_tenant, require
from core.errors import EnsoulError, Unauthorized
from portal.blueprint import bp
from portal.forms import (
    ChangePasswordForm,
    LanguagePreferenceForm,
    TenantSettingsForm,
    apply_error,
)
from portal.login_session import log_in


def _user() -> Any:
    return g.actor_user


def _render(status: int = 200, **bound: Any) -> tuple[str, int]:
    """The settings page; ``bound`` holds the one form that was just posted, with its errors."""
    user, tenant = _user(), g.get("tenant")
    forms = {
        "locale_form": bound.get("locale_form")
        or LanguagePreferenceForm(formdata=None, locale=user.locale or ""),
        "password_form": bound.get("password_form") or ChangePasswordForm(formdata=None),
        "tenant_form": bound.get("tenant_form")
        or (TenantSettingsForm(formdata=None, obj=tenant) if tenant is not None else None),
    }
    return render_template("settings.html", user=user, tenant=tenant, **forms), status


@bp.route("/settings")
def settings() -> tuple[str, int]:
    return _render()


@bp.route("/settings/language", methods=["POST"])
def save_language() -> Response | tuple[str, int]:
    form = LanguagePreferenceForm()
    if not form.validate_on_submit():
        return _render(422, locale_form=form)
    locale = form.locale.data or None
    services.set_locale(_user(), locale)
    # The session's choice outranks the profile's, so it follows the new preference.
    if locale is None:
        session.pop("locale", None)
    else:
        session["locale"] = locale
    flash(_("Your language preference is saved."), "success")
    return redirect(url_for("portal.settings"))


@bp.route("/settings/password", methods=["POST"])
def change_password() -> Response | tuple[str, int]:
    form = ChangePasswordForm()
    if not form.validate_on_submit():
        return _render(422, password_form=form)
    user = _user()
    try:
        services.change_own_password(user, form.current.data or "", form.password.data or "")
    except Unauthorized:
        form.current.errors = [_("That is not your current password.")]
        return _render(200, password_form=form)  # 200: the failure count is committed
    # Changing the password ends every session; this one continues under the new version.
    tenant = g.get("tenant")
    log_in(user, tenant.id if tenant is not None else None)
    flash(_("Your password is changed. Other sessions are logged out."), "success")
    return redirect(url_for("portal.settings"))


@bp.route("/settings/tenant", methods=["POST"])
@require(perm.TENANT_WRITE)
def save_tenant() -> Response | tuple[str, int]:
    form = TenantSettingsForm()
    if not form.validate_on_submit():
        return _render(422, tenant_form=form)
    try:
        services.update_tenant(current_tenant(), name=form.name.data,
                               timezone=form.timezone.data,
                               require_two_factor=form.require_two_factor.data)
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render(exc.http_status, tenant_form=form)
    flash(_("The organisation settings are saved."), "success")
    return redirect(url_for("portal.settings"))
