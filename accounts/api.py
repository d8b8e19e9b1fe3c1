"""REST endpoints for the caller's tenant: settings, members, invitations, tokens, audit log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from accounts import permissions as perm
from accounts import schemas, services
from accounts.auth import current_actor_user, current_tenant, require
from accounts.models import ApiToken, AuditEntry, Invitation, Membership
from core.api import api_blueprint
from core.idempotency import idempotent
from core.pagination import PageArgsSchema, paginate
from core.tenancy import current_tenant_id, get_owned, owned_resource, scoped

blp = api_blueprint("accounts_api", __name__, "", description="Tenant, team, tokens, audit log")


@blp.route("/tenant", methods=["GET"])
@require(perm.TENANT_READ)
@blp.response(200, schemas.TenantOut)
def get_tenant() -> Any:
    """The tenant this token belongs to."""
    return current_tenant()


@blp.route("/tenant", methods=["PATCH"])
@require(perm.TENANT_WRITE)
@blp.arguments(schemas.TenantUpdateIn)
@blp.response(200, schemas.TenantOut)
def update_tenant(data: dict[str, Any]) -> Any:
    """Change the tenant's name, time zone or two-factor requirement."""
    return services.update_tenant(current_tenant(), **data)


@blp.route("/members", methods=["GET"])
@require(perm.TEAM_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.MemberPage)
def list_members(args: dict[str, Any]) -> Any:
    return paginate(scoped(Membership), Membership.id, args)


@blp.route("/members/<member_id>", methods=["GET"])
@owned_resource(Membership)
@require(perm.TEAM_READ)
@blp.response(200, schemas.MemberOut)
def get_member(member_id: str) -> Any:
    return get_owned(Membership, member_id)


@blp.route("/members/<member_id>", methods=["PATCH"])
@owned_resource(Membership)
@require(perm.TEAM_WRITE)
@blp.arguments(schemas.MemberUpdateIn)
@blp.response(200, schemas.MemberOut)
def update_member(data: dict[str, Any], member_id: str) -> Any:
    """Change a member's role. The last owner cannot be demoted (`last_owner`)."""
    return services.change_role(get_owned(Membership, member_id), data["role"])


@blp.route("/members/<member_id>", methods=["DELETE"])
@owned_resource(Membership)
@require(perm.TEAM_WRITE)
@blp.response(204)
def remove_member(member_id: str) -> None:
    """Remove a member. The last owner cannot be removed (`last_owner`)."""
    services.remove_member(get_owned(Membership, member_id))


@blp.route("/invitations", methods=["GET"])
@require(perm.TEAM_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.InvitationPage)
def list_invitations(args: dict[str, Any]) -> Any:
    return paginate(scoped(Invitation), Invitation.id, args, newest_first=True)


@blp.route("/invitations", methods=["POST"])
@require(perm.TEAM_WRITE)
@idempotent()
@blp.arguments(schemas.InvitationIn)
@blp.response(201, schemas.InvitationOut)
def create_invitation(data: dict[str, Any]) -> Any:
    """Invite someone by e-mail; the link in the mail is valid for 72 hours by default."""
    return services.invite(current_tenant(), data["email"], data["role"], current_actor_user())


@blp.route("/invitations/<invitation_id>", methods=["GET"])
@owned_resource(Invitation)
@require(perm.TEAM_READ)
@blp.response(200, schemas.InvitationOut)
def get_invitation(invitation_id: str) -> Any:
    return get_owned(Invitation, invitation_id)


@blp.route("/invitations/<invitation_id>", methods=["DELETE"])
@owned_resource(Invitation)
@require(perm.TEAM_WRITE)
@blp.response(204)
def revoke_invitation(invitation_id: str) -> None:
    services.revoke_invitation(get_owned(Invitation, invitation_id))


@blp.route("/tokens", methods=["GET"])
@require(perm.TOKENS_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.TokenPage)
def list_tokens(args: dict[str, Any]) -> Any:
    return paginate(scoped(ApiToken), ApiToken.id, args)


@blp.route("/tokens", methods=["POST"])
@require(perm.TOKENS_WRITE)
@idempotent(redact=("token",))
@blp.arguments(schemas.TokenIn)
@blp.response(201, schemas.TokenCreatedOut)
def create_token(data: dict[str, Any]) -> Any:
    """Create a token. Its secret is in this answer only; it is stored as SHA-256."""
    token, raw = services.create_token(current_tenant(), data["name"], data["scope"],
                                       current_actor_user())
    token.secret = raw  # type: ignore[attr-defined]  # transient: shown once, never stored
    return token


@blp.route("/tokens/<token_id>", methods=["GET"])
@owned_resource(ApiToken)
@require(perm.TOKENS_READ)
@blp.response(200, schemas.TokenOut)
def get_token(token_id: str) -> Any:
    return get_owned(ApiToken, token_id)


@blp.route("/tokens/<token_id>", methods=["DELETE"])
@owned_resource(ApiToken)
@require(perm.TOKENS_WRITE)
@blp.response(204)
def revoke_token(token_id: str) -> None:
    """Revoke a token; it is refused at once (`invalid_token`)."""
    services.revoke_token(get_owned(ApiToken, token_id))


@blp.route("/audit-log", methods=["GET"])
@require(perm.AUDIT_READ)
@blp.arguments(schemas.AuditArgs, location="query")
@blp.response(200, schemas.AuditPage)
def list_audit_log(args: dict[str, Any]) -> Any:
    """Every mutation in this tenant, newest first; `action` filters by action name."""
    stmt = select(AuditEntry).where(AuditEntry.tenant_id == current_tenant_id())
    if args.get("action"):
        stmt = stmt.where(AuditEntry.action == args["action"])
    return paginate(stmt, AuditEntry.id, args, newest_first=True)


