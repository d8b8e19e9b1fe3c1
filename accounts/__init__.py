"""Tenants, users, memberships and roles, API tokens, invitations and the audit log."""
