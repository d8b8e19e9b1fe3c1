"""Marshmallow schemas for the accounts API: separate input and output schemas."""

from __future__ import annotations

import zoneinfo

import marshmallow as ma

from accounts.models import Role, TokenScope
from core.fields import Name, Text
from core.pagination import PageArgsSchema, page_schema

ROLE_VALUES = [r.value for r in Role]
TIMEZONES = sorted(zoneinfo.available_timezones())


class TenantOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    name = ma.fields.String(required=True)
    slug = ma.fields.String(required=True)
    currency = ma.fields.String(required=True)
    timezone = ma.fields.String(required=True)
    status = ma.fields.Function(lambda t: t.status.value, required=True,
                                metadata={"enum": ["active", "suspended"]})
    require_two_factor = ma.fields.Boolean(required=True)
    created_at = ma.fields.AwareDateTime(required=True)


class TenantUpdateIn(ma.Schema):
    name = Name(validate=ma.validate.Length(min=1, max=200))
    timezone = ma.fields.String(validate=ma.validate.OneOf(TIMEZONES),
                                metadata={"description": "An IANA time zone name."})
    require_two_factor = ma.fields.Boolean()


class MemberOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    user_id = ma.fields.UUID(required=True)
    email = ma.fields.Function(lambda m: m.user.email, required=True)
    name = ma.fields.Function(lambda m: m.user.name, required=True)
    role = ma.fields.Function(lambda m: m.role.value, required=True,
                              metadata={"enum": ROLE_VALUES})
    two_factor_enabled = ma.fields.Function(lambda m: m.user.totp_enabled, required=True)
    created_at = ma.fields.AwareDateTime(required=True)


class MemberUpdateIn(ma.Schema):
    role = ma.fields.Enum(Role, by_value=True, required=True)


EMAIL_PLAIN_PATTERN = r"^[^\s\x00-\x1f\x7f\x85\u2028\u2029]+$"


class InvitationIn(ma.Schema):
    email = ma.fields.Email(required=True, validate=[
        ma.validate.Length(max=320),
        # No whitespace or control characters, which the e-mail's To header cannot carry
        # (RFC 5321 allows some in a quoted local part; nobody's real address has them).
        ma.validate.Regexp(EMAIL_PLAIN_PATTERN, error="Not a valid e-mail address.")])
    role = ma.fields.Enum(Role, by_value=True, required=True)


class InvitationOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    email = ma.fields.String(required=True)
    role = ma.fields.Function(lambda i: i.role.value, required=True,
                              metadata={"enum": ROLE_VALUES})
    status = ma.fields.Method("_status", required=True,
                              metadata={"enum": ["pending", "accepted", "revoked", "expired"]})
    expires_at = ma.fields.AwareDateTime(required=True)
    created_at = ma.fields.AwareDateTime(required=True)

    def _status(self, invitation: object) -> str:
        from core.db import utcnow

        if invitation.revoked_at is not None:  # type: ignore[attr-defined]
            return "revoked"
        if invitation.accepted_at is not None:  # type: ignore[attr-defined]
            return "accepted"
        if invitation.expires_at <= utcnow():  # type: ignore[attr-defined]
            return "expired"
        return "pending"


class TokenIn(ma.Schema):
    name = Name(required=True, validate=ma.validate.Length(min=1, max=200))
    scope = ma.fields.Enum(TokenScope, by_value=True, required=True)


class TokenOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    name = ma.fields.String(required=True)
    prefix = ma.fields.String(required=True)
    scope = ma.fields.Function(lambda t: t.scope.value, required=True,
                               metadata={"enum": ["read", "write"]})
    created_at = ma.fields.AwareDateTime(required=True)
    last_used_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    revoked_at = ma.fields.AwareDateTime(required=True, allow_none=True)


class TokenCreatedOut(TokenOut):
    token = ma.fields.String(
        attribute="secret", required=True, allow_none=True,
        metadata={"description": "The secret, shown only in this answer (null on a replay)."},
    )


class AuditEntryOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    actor = ma.fields.String(attribute="actor_label", required=True)
    actor_user_id = ma.fields.UUID(required=True, allow_none=True)
    actor_token_id = ma.fields.UUID(required=True, allow_none=True)
    action = ma.fields.String(required=True)
    target_type = ma.fields.String(required=True, allow_none=True)
    target_id = ma.fields.String(required=True, allow_none=True)
    details = ma.fields.Dict(required=True)
    source_ip = ma.fields.String(required=True, allow_none=True)
    created_at = ma.fields.AwareDateTime(required=True)


class AuditArgs(PageArgsSchema):
    action = Text(validate=ma.validate.Length(max=100))


MemberPage = page_schema(MemberOut, "MemberPage")
InvitationPage = page_schema(InvitationOut, "InvitationPage")
TokenPage = page_schema(TokenOut, "TokenPage")
AuditPage = page_schema(AuditEntryOut, "AuditPage")
