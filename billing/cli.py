"""Billing commands for platform administrators."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import with_appcontext

from accounts.cli import command_boundary
from billing import purchases
from billing.models import Purchase
from core.db import get_by_id


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
