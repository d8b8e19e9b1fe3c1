"""Platform commands: migrations, the embedded all-in-one server and the Procfile processes."""

from __future__ import annotations

import logging
import signal
import sys
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
        assert db.engine is not None
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

    @app.cli.command("serve")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=8000, show_default=True, type=int)
    @with_appcontext
    def serve(host: str, port: int) -> None:
        """Run the whole platform in one process (the embedded profile)."""
        from core.embedded import run_embedded

        run_embedded(current_app._get_current_object(), host, port)  # type: ignore[attr-defined]

    @app.cli.command("broker")
    @with_appcontext
    def broker() -> None:
        """The inference broker process (idles until the inference domain is built)."""
        _idle("broker")

    @app.cli.command("scheduler")
    @with_appcontext
    def scheduler() -> None:
        """Periodic jobs (idles until a domain registers some)."""
        _idle("scheduler")

    @app.cli.command("worker")
    @click.option("--burst", is_flag=True, help="Stop when the queues are empty.")
    @with_appcontext
    def worker(burst: bool) -> None:
        """An rq worker on the platform's Redis."""
        from rq import Worker
        from rq.serializers import JSONSerializer

        from core.redis import get_redis

        if current_app.config["EMBEDDED"]:
            raise click.ClickException("the embedded profile runs jobs in-process; no worker")
        w = Worker(["default"], connection=get_redis(), serializer=JSONSerializer)
        w.work(burst=burst, with_scheduler=False)


def _idle(name: str) -> None:
    stop = GracefulStop()
    log.info("%s started (nothing to do yet)", name)
    click.echo(f"{name} started", err=True)
    stop.event.wait()
    click.echo(f"{name} stopped", err=True)
    sys.exit(0)
