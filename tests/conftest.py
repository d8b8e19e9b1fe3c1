"""The test harness: real Postgres, Redis and Mosquitto; one database per xdist worker.

- ``app``: in-process tests. The schema is built once per worker by the migrations; each test
  runs inside an outer transaction that is rolled back (services flush, requests commit to a
  savepoint). An app context stays pushed for the test.
- ``committed_app``: for tests whose other processes must see the data; commits for real and
  truncates every table afterwards.
- Redis: each worker has its own db index (cleared with FLUSHDB, never FLUSHALL) and every
  pub/sub channel and stream name carries a per-run prefix.
- ``mailbox``: a local SMTP sink (aiosmtpd); ``mosquitto``: a project-configured Mosquitto on a
  free port.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from aiosmtpd.controller import Controller
from flask import g
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app import create_app
from core.db import Base, db
from tests.support.processes import PROJECT_ROOT, ManagedProcess
from tests.support.tls import make_test_certificates
from tests.support.waiting import free_port, port_open, wait_until

PG_ADMIN_URL = os.environ.get("ENSOUL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE_URL = os.environ.get("ENSOUL_TEST_REDIS", "redis://127.0.0.1:6379")
RUN_ID = os.environ.get("ENSOUL_TEST_RUN_ID") or uuid.uuid4().hex[:8]
# Two suites running at once on one machine (two developers) need other names and db indexes.
DB_PREFIX = os.environ.get("ENSOUL_TEST_DB_PREFIX", "ensoul_test")
REDIS_DB_OFFSET = int(os.environ.get("ENSOUL_TEST_REDIS_DB_OFFSET", "1"))


def _worker_number(worker_id: str) -> int:
    return int(worker_id[2:]) if worker_id.startswith("gw") else 0


@pytest.fixture(scope="session")
def worker_number(worker_id: str) -> int:
    return _worker_number(worker_id)


@pytest.fixture(scope="session")
def database_url(worker_number: int) -> Iterator[str]:
    name = f"{DB_PREFIX}_{worker_number}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from alembic import command

    from core.cli import alembic_config

    cfg = alembic_config(url)
    cfg.attributes["skip_logging"] = True  # type: ignore[attr-defined]
    command.upgrade(cfg, "head")  # type: ignore[arg-type]
    yield url


@pytest.fixture(scope="session")
def redis_url(worker_number: int) -> str:
    return f"{REDIS_BASE_URL}/{(REDIS_DB_OFFSET + worker_number) % 16}"


@pytest.fixture(scope="session")
def redis_prefix(worker_number: int) -> str:
    return f"ensoul-test-{RUN_ID}-{worker_number}"


class Mailbox:
    """Collects every message the SMTP sink receives."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self._lock:
            self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def wait_for(self, to: str, timeout: float = 5.0) -> Message:
        def _find() -> Message | None:
            with self._lock:
                return next((m for m in self.messages if m["To"] == to), None)

        return wait_until(_find, timeout, what=f"a mail to {to}")

    @staticmethod
    def body(message: Message) -> str:
        payload = message.get_payload(decode=True)
        assert isinstance(payload, bytes)
        return payload.decode()


@pytest.fixture(scope="session")
def smtp_sink() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture
def mailbox(smtp_sink: tuple[Mailbox, int]) -> Mailbox:
    box, _ = smtp_sink
    box.clear()
    return box


def app_settings(database_url: str, redis_url: str, redis_prefix: str, smtp_port: int,
                 **extra: Any) -> dict[str, Any]:
    return {
        "TESTING": True,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "MQTT_URL": os.environ.get("ENSOUL_TEST_MQTT", "mqtt://127.0.0.1:1883"),
        "SECRET_KEY": "test-secret-key",
        "ENSOUL_ENCRYPTION_KEY": "test-encryption-key",
        "ENSOUL_REDIS_PREFIX": redis_prefix,
        "ENSOUL_BASE_URL": "http://localhost",
        "ENSOUL_SMTP_HOST": "127.0.0.1",
        "ENSOUL_SMTP_PORT": smtp_port,
        "ENSOUL_COOKIE_SECURE": False,
        "ENSOUL_API_RATE_LIMIT": "100000/minute",
        "ENSOUL_API_IP_RATE_LIMIT": "100000/minute",
        "ENSOUL_LOGIN_RATE_LIMIT": "100000/minute",
        # Cheap argon2id in tests; production keeps the RFC 9106 default (64 MiB, 3 passes).
        "ENSOUL_ARGON2_TIME_COST": 1,
        "ENSOUL_ARGON2_MEMORY_KIB": 1024,
        **extra,
    }


@pytest.fixture(scope="session")
def base_app(database_url: str, redis_url: str, redis_prefix: str,
             smtp_sink: tuple[Mailbox, int]) -> Any:
    return create_app(app_settings(database_url, redis_url, redis_prefix, smtp_sink[1]))


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def app(base_app: Any, redis_client: redis_lib.Redis) -> Iterator[Any]:
    """The app with a pushed context whose every write is rolled back after the test."""
    from core.ratelimit import limiter

    limiter.reset()
    engine = base_app.extensions["ensoul_db_engine"]
    connection = engine.connect()
    outer = connection.begin()
    db.bind(connection, join_transaction_mode="create_savepoint")
    ctx = base_app.app_context()
    ctx.push()
    try:
        yield base_app
    finally:
        ctx.pop()
        db.session.remove()
        outer.rollback()
        connection.close()
        db.bind(None, join_transaction_mode="conditional_savepoint")


def truncate_all(app: Any) -> None:
    """Empty every table. A request of a live server may still be finishing (a browser's last
    fetch): a deadlock or lock wait with it is retried, never a reason to fail the test."""
    engine = app.extensions["ensoul_db_engine"]
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))
                conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            return
        except OperationalError:
            if attempt == 4:
                raise


@pytest.fixture
def committed_app(base_app: Any, redis_client: redis_lib.Redis) -> Iterator[Any]:
    """The app committing for real (other processes see the data); truncated afterwards."""
    from core.ratelimit import limiter

    limiter.reset()
    truncate_all(base_app)
    ctx = base_app.app_context()
    ctx.push()
    try:
        yield base_app
    finally:
        db.session.remove()
        ctx.pop()
        truncate_all(base_app)


class CommittingClient(FlaskClient):
    """Commits what the test set up before each request, as a real client would find it.

    Inside the ``app`` fixture a commit only releases a savepoint of the outer transaction, so
    a request that fails (and rolls back) does not take the test's own data with it.
    """

    def open(self, *args: Any, **kwargs: Any) -> Any:
        db.session.commit()
        # Every request starts with a fresh ``g``, as in production (the test's app context
        # outlives requests; Flask-Login and Flask-Babel cache on ``g``).
        for key in list(g):
            g.pop(key)
        return super().open(*args, **kwargs)


@pytest.fixture
def client(app: Any) -> Any:
    app.test_client_class = CommittingClient
    return app.test_client()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


class MosquittoInstance:
    """A Mosquitto running the project's config template on free ports (plain and TLS).

    Its files are where the platform writes them when ``platform_config()`` is applied:
    ``ENSOUL_MOSQUITTO_DIR`` = ``workdir`` (``passwords``, ``acl``, ``mosquitto.pid``).
    """

    def __init__(self, workdir: Path, log_dir: Path) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port = free_port()
        self.workdir = workdir
        self.password_file = workdir / "passwords"
        self.acl_file = workdir / "acl"
        self.pid_file = workdir / "mosquitto.pid"
        self.service_user = "ensoul-platform"
        self.service_password = uuid.uuid4().hex
        self.password_file.write_text("")
        subprocess.run(["mosquitto_passwd", "-b", str(self.password_file), self.service_user,
                        self.service_password], check=True)
        self.acl_file.write_text(f"user {self.service_user}\ntopic readwrite #\n")
        # Started as root, Mosquitto drops to its own user: it must read and write here.
        workdir.chmod(0o777)
        for path in (self.password_file, self.acl_file):
            path.chmod(0o644)
        self.certificates = make_test_certificates(workdir, self.host)
        template = (PROJECT_ROOT / "config/mosquitto/mosquitto.conf.template").read_text()
        self.config_file = workdir / "mosquitto.conf"
        self.config_file.write_text(template.format(
            password_file=self.password_file, acl_file=self.acl_file, pid_file=self.pid_file,
            port=self.port, host=self.host, tls_port=self.tls_port,
            cafile=self.certificates.ca_file, certfile=self.certificates.cert_file,
            keyfile=self.certificates.key_file))
        self.process = ManagedProcess(
            f"mosquitto-{self.port}", ["mosquitto", "-c", str(self.config_file)],
            log_dir=log_dir,
            ready=lambda: port_open(self.host, self.port) and port_open(self.host, self.tls_port))

    @property
    def url(self) -> str:
        return f"mqtt://{self.service_user}:{self.service_password}@{self.host}:{self.port}"

    def platform_config(self) -> dict[str, Any]:
        """Settings that make the platform own this instance's files and reload it."""
        return {"MQTT_URL": self.url, "ENSOUL_MQTT_ACCESS": "mosquitto",
                "ENSOUL_MOSQUITTO_DIR": str(self.workdir),
                "ENSOUL_MOSQUITTO_PID_FILE": str(self.pid_file),
                "ENSOUL_MOSQUITTO_RELOAD_COMMAND": None}


@contextmanager
def running_mosquitto(log_dir: Path, name: str) -> Iterator[MosquittoInstance]:
    """A started :class:`MosquittoInstance` in a fresh ``ensoul-{name}-*`` temp dir; stopped
    and its dir removed on exit. Fails (never skips) when mosquitto is not installed."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients")
    # Not under pytest's 0700 temp root: Mosquitto started as root drops to its own user.
    workdir = Path(tempfile.mkdtemp(prefix=f"ensoul-{name}-"))
    instance = MosquittoInstance(workdir, log_dir)
    try:
        instance.process.start()
        yield instance
    finally:
        instance.process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def mosquitto(log_dir: Path) -> Iterator[MosquittoInstance]:
    with running_mosquitto(log_dir, "mosquitto") as instance:
        yield instance


@pytest.fixture(autouse=True)
def _services_required() -> None:
    """Fail (never skip) when a service the suite needs is down, naming how to start it."""
    if not port_open("127.0.0.1", 5432):
        pytest.fail("PostgreSQL is not running: pg_ctlcluster --skip-systemctl-redirect "
                    "$(ls /etc/postgresql) main start")
    if not port_open("127.0.0.1", 6379):
        pytest.fail("Redis is not running: redis-server --daemonize yes --port 6379 --save ''")
