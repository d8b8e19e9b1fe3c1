"""The web process's entry point (gunicorn ``wsgi:app``): fails fast when the database is down."""

from __future__ import annotations

import sys

import click

from app import create_app
from core.cli import check_database

app = create_app()

with app.app_context():
    try:
        check_database()
    except click.ClickException as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(3)
