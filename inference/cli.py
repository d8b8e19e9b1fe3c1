"""Inference commands."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import with_appcontext


def register(app: Flask) -> None:
    @app.cli.command("inference-profiles")
    @with_appcontext
    def inference_profiles() -> None:
        """Rebuild every device's admission profile in Redis (after Redis lost its data)."""
        from inference.directory import project_all

        click.echo(f"{project_all()} device profiles written")
