"""Billing commands for platform administrators."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import with_appcontext
from sqlalchemy import select

from accounts.cli import command_boundary, find_tenant
from accounts.models import Tenant
from billing import balances, purchases
from billing.models import Purchase
from core.db import db, get_by_id


def register(app: Flask) -> None:
    @app.cli.command("mark-purchase-paid")
    @click.option("--purchase", "purchase_id", required=True, help="The purchase's id.")
    @with_appcontext
    @command_boundary
    def mark_purchase_paid(purchase_id: str) -> None:
        """Deliver a pending purchase (until payment arrives with the finance issue): a pack's
        seats go to unlicensed devices at once, a package's credits to the ledger."""
        purchase = get_by_id(Purchase, purchase_id, "purchase")
        licensed = purchases.mark_paid(purchase)
        click.echo(f"paid: {purchase.kind.value} x {purchase.quantity}"
                   + (f"; {len(licensed)} devices licensed" if licensed else ""))

    @app.cli.command("billing-rebuild")
    @click.option("--tenant", "tenant_ref", default=None, help="One tenant (slug or id).")
    @with_appcontext
    @command_boundary
    def billing_rebuild(tenant_ref: str | None) -> None:
        """Rebuild the live balances in Redis from Postgres (after Redis lost its data). A
        tenant with a stream in flight is skipped: run it again once its streams ended."""
        if tenant_ref:
            tenant = find_tenant(tenant_ref)
            rebuilt = balances.rebuild(tenant.id)
            click.echo("rebuilt" if rebuilt else "busy: a reservation is open; run it again")
            if not rebuilt:
                raise SystemExit(1)
            return
        done, busy = balances.rebuild_all()
        click.echo(f"rebuilt {done} tenants; {busy} busy (run it again)")
        if busy:
            raise SystemExit(1)

    @app.cli.command("billing-reconcile")
    @click.option("--repair", is_flag=True, help="Write the ledger's figures into Redis.")
    @with_appcontext
    @command_boundary
    def billing_reconcile(repair: bool) -> None:
        """Compare every account's Redis balance with the ledger and list the differences;
        with ``--repair``, fix those of tenants with no stream in flight. Exits 1 when a
        difference remains."""
        remaining = 0
        for tenant_id in list(db.session.scalars(select(Tenant.id))):
            differences, repaired = balances.reconcile(tenant_id, repair=repair)
            for difference in differences:
                click.echo(f"{tenant_id} {difference.account}: redis={difference.redis} "
                           f"ledger={difference.expected}"
                           + (" (repaired)" if repaired else ""))
            if differences and not repaired:
                remaining += len(differences)
        click.echo(f"{remaining} differences remain")
        if remaining:
            raise SystemExit(1)
