"""Accepting an invitation: as the logged-in invitee, or by creating an account."""

from __future__ import annotations

from flask import flash, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_login import current_user
from werkzeug.wrappers import Response

from accounts import services
from accounts.models import Invitation, Membership, Tenant
from core.db import db
from core.errors import EnsoulError, Gone
from portal.blueprint import bp, public
from portal.forms import AcceptInvitationForm, apply_error
from portal.labels import error_text
from portal.login_session import log_in


def _render(raw: str, invitation: Invitation, form: AcceptInvitationForm | None = None,
            error: EnsoulError | None = None, status: int = 200) -> tuple[str, int]:
    if current_user.is_authenticated:
        state = "accept" if current_user.user.email == invitation.email else "other_user"
    elif services.get_user_by_email(invitation.email) is not None:
        state = "log_in"
    else:
        state = "sign_up"
    return render_template(
        "invitation.html", raw=raw, invitation=invitation, state=state,
        tenant=db.session.get(Tenant, invitation.tenant_id),
        form=form or AcceptInvitationForm(formdata=None),
        page_error=error_text(error) if error else None,
    ), status


def _welcome(member: Membership) -> Response:
    flash(_("Welcome to %(tenant)s.", tenant=member.tenant.name), "success")
    return redirect(url_for("portal.dashboard"))


@bp.route("/invitations/<token>", methods=["GET", "POST"])
@public
def invitation(token: str) -> Response | tuple[str, int]:
    try:
        found = services.invitation_by_token(token)
    except Gone as exc:
        return render_template("link_gone.html", error=exc, message=error_text(exc)), 410
    if request.method == "GET":
        return _render(token, found)
    if current_user.is_authenticated:
        try:
            member = services.accept_invitation(token, current_user.user)
        except EnsoulError as exc:
            return _render(token, found, error=exc, status=exc.http_status)
        session["tenant_id"] = str(member.tenant_id)
        return _welcome(member)
    form = AcceptInvitationForm()
    if not form.validate():
        return _render(token, found, form, status=422)
    try:
        member = services.accept_invitation(token, None, name=form.name.data or "",
                                            password=form.password.data or "")
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render(token, found, form, status=exc.http_status)
    log_in(member.user, member.tenant_id)
    return _welcome(member)
