"""What each role and each token scope may do, as permissions checked per endpoint."""

from __future__ import annotations

from accounts.models import Role, TokenScope

TENANT_READ = "tenant:read"
TENANT_WRITE = "tenant:write"
TEAM_READ = "team:read"
TEAM_WRITE = "team:write"
TOKENS_READ = "tokens:read"
TOKENS_WRITE = "tokens:write"
AUDIT_READ = "audit:read"
FLEET_READ = "fleet:read"
FLEET_WRITE = "fleet:write"
BILLING_READ = "billing:read"
BILLING_WRITE = "billing:write"
INFERENCE_READ = "inference:read"  # settings, providers, devices' requests
# What end users said and heard: the people who run and support the devices, not everyone.
TRANSCRIPTS_READ = "transcripts:read"
INFERENCE_WRITE = "inference:write"  # settings and providers (data deletion is fleet:write)

ALL = frozenset(
    {
        TENANT_READ, TENANT_WRITE, TEAM_READ, TEAM_WRITE, TOKENS_READ, TOKENS_WRITE,
        AUDIT_READ, FLEET_READ, FLEET_WRITE, BILLING_READ, BILLING_WRITE, INFERENCE_READ,
        INFERENCE_WRITE, TRANSCRIPTS_READ,
    }
)
READ_ONLY = frozenset(p for p in ALL if p.endswith(":read"))

ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.OWNER: ALL,
    Role.DEVELOPER: READ_ONLY | {TOKENS_WRITE, FLEET_WRITE, INFERENCE_WRITE},
    Role.OPERATIONS: (READ_ONLY - {TOKENS_READ}) | {FLEET_WRITE},
    Role.FINANCE: (READ_ONLY - {TOKENS_READ, TRANSCRIPTS_READ}) | {BILLING_WRITE},
    Role.VIEWER: READ_ONLY - {TOKENS_READ, AUDIT_READ, TRANSCRIPTS_READ},
}

SCOPE_PERMISSIONS: dict[TokenScope, frozenset[str]] = {
    TokenScope.READ: READ_ONLY,
    TokenScope.WRITE: ALL,
}

# Roles whose members must use two-factor authentication once the tenant requires it.
TWO_FACTOR_ROLES = frozenset({Role.OWNER, Role.FINANCE})
