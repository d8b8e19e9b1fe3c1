"""The API tokens page. A token's secret is shown once, on the page that created it."""

from __future__ import annotations

from flask import flash, make_response, redirect, render_template, url_for
from flask_babel import gettext as _
from sqlalchemy import select
from werkzeug.wrappers import Response

from accounts import permissions as perm
from accounts import services
from accounts.auth import current_actor_user, current_tenant, require
from accounts.models import ApiToken, TokenScope, User
from core.db import db
from core.errors import EnsoulError
from core.tenancy import get_owned, owned_resource, scoped
from portal.blueprint import bp
from portal.forms import TokenForm, apply_error


def _render(form: TokenForm | None = None, status: int = 200) -> tuple[str, int]:
    tokens = db.session.execute(scoped(ApiToken).order_by(ApiToken.id.desc())).scalars().all()
    creators = {
        u.id: u for u in db.session.execute(
            select(User).where(User.id.in_({t.created_by_id for t in tokens}))
        ).scalars()
    }
    return render_template("tokens.html", tokens=tokens, creators=creators,
                           form=form or TokenForm(formdata=None)), status


@bp.route("/tokens")
@require(perm.TOKENS_READ)
def tokens() -> tuple[str, int]:
    return _render()


@bp.route("/tokens", methods=["POST"])
@require(perm.TOKENS_WRITE)
def create_token() -> Response | tuple[str, int]:
    form = TokenForm()
    if not form.validate_on_submit():
        return _render(form, status=422)
    try:
        token, raw = services.create_token(current_tenant(), form.name.data or "",
                                           TokenScope(form.scope.data), current_actor_user())
    except EnsoulError as exc:
        apply_error(form, exc)
        return _render(form, status=exc.http_status)
    # Rendered, not redirected: the secret must never be stored, not even in the session.
    response = make_response(render_template("token_created.html", token=token, secret=raw))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/tokens/<token_id>/revoke", methods=["POST"])
@owned_resource(ApiToken)
@require(perm.TOKENS_WRITE)
def revoke_token(token_id: str) -> Response:
    token = get_owned(ApiToken, token_id)
    services.revoke_token(token)
    flash(_("The token “%(name)s” is revoked; requests using it are refused from now on.",
            name=token.name), "success")
    return redirect(url_for("portal.tokens"))
