"""The team page: members and their roles, invitations."""

from __future__ import annotations

from flask import flash, redirect, render_template, url_for
from flask_babel import gettext as _
from sqlalchemy import select
from werkzeug.wrappers import Response

from accounts import permissions as perm
from accounts import services
from accounts.auth import current_actor_user, current_tenant, require
from accounts.models import Invitation, Membership, Role, User
from core.db import db, utcnow
from core.errors import EnsoulError
from core.tenancy import get_owned, owned_resource, scoped
from portal.blueprint import bp
from portal.forms import InviteForm, RoleForm, apply_error
from portal.labels import ROLE_LABELS, error_text


def _render(invite_form: InviteForm | None = None, error: EnsoulError | None = None,
            status: int = 200) -> tuple[str, int]:
    members = db.session.execute(
        scoped(Membership).join(User, User.id == Membership.user_id).order_by(User.email)
    ).scalars().all()
    invitations = db.session.execute(
        scoped(Invitation)
        .where(Invitation.accepted_at.is_(None), Invitation.revoked_at.is_(None),
               Invitation.expires_at > utcnow())
        .order_by(Invitation.id.desc())
    ).scalars().all()
    invited_by = {
        u.id: u for u in db.session.execute(
            select(User).where(User.id.in_({i.invited_by_id for i in invitations}))
        ).scalars()
    }
    return render_template(
        "team.html", members=members, invitations=invitations, invited_by=invited_by,
        invite_form=invite_form or InviteForm(formdata=None), role_form=RoleForm(formdata=None),
        page_error=error_text(error) if error else None,
    ), status


@bp.route("/team")
@require(perm.TEAM_READ)
def team() -> tuple[str, int]:
    return _render()


@bp.route("/team/invite", methods=["POST"])
@require(perm.TEAM_WRITE)
def invite() -> Response | tuple[str, int]:
    form = InviteForm()
    if not form.validate_on_submit():
        return _render(form, status=422)
    try:
        invitation = services.invite(current_tenant(), form.email.data or "",
                                     Role(form.role.data), invited_by=current_actor_user())
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render(form, status=exc.http_status)
    flash(_("Invitation sent to %(email)s.", email=invitation.email), "success")
    return redirect(url_for("portal.team"))


@bp.route("/team/members/<member_id>/role", methods=["POST"])
@owned_resource(Membership)
@require(perm.TEAM_WRITE)
def change_role(member_id: str) -> Response | tuple[str, int]:
    member = get_owned(Membership, member_id)
    form = RoleForm()
    if not form.validate_on_submit():
        return _render(status=422)
    try:
        services.change_role(member, Role(form.role.data))
    except EnsoulError as exc:
        return _render(error=exc, status=exc.http_status)
    flash(_("%(email)s is now %(role)s.", email=member.user.email,
            role=ROLE_LABELS[member.role]), "success")
    return redirect(url_for("portal.team"))


@bp.route("/team/members/<member_id>/remove", methods=["POST"])
@owned_resource(Membership)
@require(perm.TEAM_WRITE)
def remove_member(member_id: str) -> Response | tuple[str, int]:
    member = get_owned(Membership, member_id)
    email = member.user.email
    try:
        services.remove_member(member)
    except EnsoulError as exc:
        return _render(error=exc, status=exc.http_status)
    flash(_("%(email)s was removed from the team.", email=email), "success")
    actor = current_actor_user()
    left = actor is not None and member.user_id == actor.id
    return redirect(url_for("portal.dashboard" if left else "portal.team"))


@bp.route("/team/invitations/<invitation_id>/revoke", methods=["POST"])
@owned_resource(Invitation)
@require(perm.TEAM_WRITE)
def revoke_invitation(invitation_id: str) -> Response:
    invitation = get_owned(Invitation, invitation_id)
    services.revoke_invitation(invitation)
    flash(_("The invitation to %(email)s was revoked.", email=invitation.email), "success")
    return redirect(url_for("portal.team"))
