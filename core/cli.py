"""Platform commands every process shares: the database check and migrations, clean stops."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from config.settings import PROJECT_ROOT
from core.db import db

log = logging.getLogger(__name__)


def alembic_config(database_url: str | None = None) -> object:
    from alembic.config import Config

    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url or current_app.config["DATABASE_URL"]
    # The app configured logging already; alembic.ini's would silence the app's loggers.
    cfg.attributes["skip_logging"] = True
    return cfg


def safe_db_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown as its scheme only
        return url.split("://", 1)[0] + "://..."


def check_database() -> None:
    """Fail at once, naming the URL (without password), when the database is unreachable."""
    url = current_app.config["DATABASE_URL"]
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise click.ClickException(
            f"cannot connect to the database at {safe_db_url(url)}: {reason}"
        ) from None


def upgrade_database() -> None:
    from alembic import command

    check_database()
    command.upgrade(alembic_config(), "head")  # type: ignore[arg-type]


class GracefulStop:
    """SIGTERM/SIGINT set an event that idle loops wait on, so processes stop cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("received signal %s, stopping", signum)
        self.event.set()


def register(app: Flask) -> None:
    @app.cli.command("db-upgrade")
    @with_appcontext
    def db_upgrade() -> None:
        """Apply all migrations (the Procfile's release step)."""
        upgrade_database()
        click.echo("database is up to date")
