"""The accounts endpoints for the API-walking tests (see tests/core/endpoints.py)."""

from __future__ import annotations

from typing import Any

from accounts.models import ApiToken, Invitation, Membership, Role, TokenScope
from tests.core.endpoints import ALL_ROLES, Endpoint
from tests.factories import MembershipFactory, make_invitation, make_token

OWNER = frozenset({Role.OWNER})
TOKEN_MANAGERS = frozenset({Role.OWNER, Role.DEVELOPER})
AUDIT_READERS = ALL_ROLES - {Role.VIEWER}

ENDPOINTS = {
    ("/api/v1/tenant", "GET"): Endpoint("tenant:read", ALL_ROLES),
    ("/api/v1/tenant", "PATCH"): Endpoint("tenant:write", OWNER, {"name": "Renamed Vendor"}),
    ("/api/v1/members", "GET"): Endpoint("team:read", ALL_ROLES),
    ("/api/v1/members/<member_id>", "GET"): Endpoint("team:read", ALL_ROLES),
    ("/api/v1/members/<member_id>", "PATCH"): Endpoint("team:write", OWNER, {"role": "viewer"}),
    ("/api/v1/members/<member_id>", "DELETE"): Endpoint("team:write", OWNER),
    ("/api/v1/invitations", "GET"): Endpoint("team:read", ALL_ROLES),
    ("/api/v1/invitations", "POST"): Endpoint(
        "team:write", OWNER, {"email": "walker@example.com", "role": "viewer"}),
    ("/api/v1/invitations/<invitation_id>", "GET"): Endpoint("team:read", ALL_ROLES),
    ("/api/v1/invitations/<invitation_id>", "DELETE"): Endpoint("team:write", OWNER),
    ("/api/v1/tokens", "GET"): Endpoint("tokens:read", TOKEN_MANAGERS),
    ("/api/v1/tokens", "POST"): Endpoint(
        "tokens:write", TOKEN_MANAGERS, {"name": "walker", "scope": "read"}),
    ("/api/v1/tokens/<token_id>", "GET"): Endpoint("tokens:read", TOKEN_MANAGERS),
    ("/api/v1/tokens/<token_id>", "DELETE"): Endpoint("tokens:write", TOKEN_MANAGERS),
    ("/api/v1/audit-log", "GET"): Endpoint("audit:read", AUDIT_READERS),
}

# An extra owner: changing or removing it never hits the last-owner rule, so a leak across
# tenants would show as a changed row rather than hide behind a 409.
CREATORS: dict[type, Any] = {
    Membership: lambda tenant: MembershipFactory(tenant=tenant, role=Role.OWNER),
    Invitation: lambda tenant: make_invitation(tenant),
    ApiToken: lambda tenant: make_token(tenant, TokenScope.WRITE)[0],
}
