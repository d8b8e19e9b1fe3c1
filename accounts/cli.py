"""Operator commands: ``flask --app app create-admin | create-tenant | create-token | ...``."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from typing import Any

import click
from flask import Flask
from flask.cli import with_appcontext
from sqlalchemy import select

from accounts import services
from accounts.models import Role, Tenant, TenantStatus, TokenScope
from core.cli import check_database, upgrade_database
from core.db import db
from core.errors import EnsoulError

DEMO_EMAIL = "demo@ensoul.local"
DEMO_PASSWORD = "ensoul-demo-2026"  # noqa: S105 - the documented demo login
DEMO_TENANT = "Demo Devices Ltd"


def command_boundary(func: Callable[..., Any]) -> Callable[..., Any]:
    """Commit on success; print a typed error and exit non-zero on failure."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_database()
        try:
            result = func(*args, **kwargs)
            db.session.commit()
            return result
        except EnsoulError as exc:
            db.session.rollback()
            detail = "; ".join(f"{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}"
                               for k, v in exc.details.items())
            raise click.ClickException(f"{exc.code}: {exc.message}"
                                       + (f" ({detail})" if detail else "")) from None

    return wrapper


def find_tenant(ref: str) -> Tenant:
    tenant = db.session.execute(select(Tenant).where(Tenant.slug == ref)).scalar_one_or_none()
    if tenant is None:
        try:
            import uuid

            tenant = db.session.get(Tenant, uuid.UUID(ref))
        except ValueError:
            tenant = None
    if tenant is None:
        raise click.ClickException(f"no tenant with slug or id {ref!r}")
    return tenant


def seed_demo() -> tuple[Tenant, str | None]:
    """The demo tenant and its owner; idempotent. Returns the tenant and a new token, if any."""
    user = services.get_user_by_email(DEMO_EMAIL)
    if user is None:
        user = services.create_user(DEMO_EMAIL, DEMO_PASSWORD, "Demo Owner")
    tenant = db.session.execute(
        select(Tenant).where(Tenant.name == DEMO_TENANT)
    ).scalar_one_or_none()
    raw = None
    if tenant is None:
        tenant = services.create_tenant(DEMO_TENANT, "CNY", "Asia/Shanghai")
        services.add_member(tenant, user, Role.OWNER)
        _, raw = services.create_token(tenant, "demo", TokenScope.WRITE, user)
    from billing import services as billing  # billing builds on accounts: imported late

    billing.catalog.seed_demo_catalogue()
    billing.purchases.seed_demo_tenant(tenant.id, tenant.currency)
    return tenant, raw


def register(app: Flask) -> None:
    @app.cli.command("create-admin")
    @click.option("--email", required=True)
    @click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
    @click.option("--name", default="")
    @with_appcontext
    @command_boundary
    def create_admin(email: str, password: str, name: str) -> None:
        """Create a platform administrator."""
        user = services.create_user(email, password, name, platform_admin=True)
        click.echo(f"platform admin {user.email} created")

    @app.cli.command("create-tenant")
    @click.option("--name", required=True)
    @click.option("--owner-email", required=True)
    @click.option("--owner-password", default=None,
                  help="Only for a new user; without it a random one is printed once.")
    @click.option("--currency", default="CNY", show_default=True)
    @click.option("--timezone", default="Asia/Shanghai", show_default=True)
    @with_appcontext
    @command_boundary
    def create_tenant(name: str, owner_email: str, owner_password: str | None, currency: str,
                      timezone: str) -> None:
        """Create a tenant with its owner (a new or an existing user)."""
        tenant = services.create_tenant(name, currency, timezone)
        user = services.get_user_by_email(owner_email)
        if user is None:
            password = owner_password or secrets.token_urlsafe(12)
            user = services.create_user(owner_email, password, "")
            if owner_password is None:
                click.echo(f"owner password (shown once): {password}")
        services.add_member(tenant, user, Role.OWNER)
        click.echo(f"tenant {tenant.slug} ({tenant.id}) created, owner {user.email}")

    @app.cli.command("create-token")
    @click.option("--tenant", "tenant_ref", required=True, help="Tenant slug or id.")
    @click.option("--name", required=True)
    @click.option("--scope", type=click.Choice(["read", "write"]), default="read",
                  show_default=True)
    @with_appcontext
    @command_boundary
    def create_token(tenant_ref: str, name: str, scope: str) -> None:
        """Create an API token; its secret is printed once."""
        tenant = find_tenant(tenant_ref)
        _, raw = services.create_token(tenant, name, TokenScope(scope), None)
        click.echo(raw)

    @app.cli.command("suspend-tenant")
    @click.option("--tenant", "tenant_ref", required=True)
    @click.option("--reason", required=True)
    @with_appcontext
    @command_boundary
    def suspend_tenant(tenant_ref: str, reason: str) -> None:
        """Suspend a tenant: its tokens and portal access stop working."""
        services.set_tenant_status(find_tenant(tenant_ref), TenantStatus.SUSPENDED, reason)
        click.echo("suspended")

    @app.cli.command("reactivate-tenant")
    @click.option("--tenant", "tenant_ref", required=True)
    @with_appcontext
    @command_boundary
    def reactivate_tenant(tenant_ref: str) -> None:
        services.set_tenant_status(find_tenant(tenant_ref), TenantStatus.ACTIVE)
        click.echo("reactivated")

    @app.cli.command("seed-demo")
    @with_appcontext
    @command_boundary
    def seed_demo_command() -> None:
        """Create the demo tenant and its owner (safe to run twice; migrates first)."""
        upgrade_database()
        tenant, raw = seed_demo()
        click.echo(f"demo tenant: {tenant.name}; log in as {DEMO_EMAIL} / {DEMO_PASSWORD}")
        if raw:
            click.echo(f"demo API token (shown once): {raw}")
