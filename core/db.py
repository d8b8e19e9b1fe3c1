"""One typed declarative base and a session per request or job.

Services flush; the boundary (a request, a job, a CLI command) commits. The session is a
``scoped_session`` removed at the end of every app context.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from sqlalchemy import DateTime, Enum, MetaData, Uuid, create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.types import TypeDecorator

from core.errors import NotFound
from core.ids import uuid7

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime, uuid.UUID: Uuid}


def str_enum(cls: type[enum.Enum], name: str) -> Enum:
    """An enum stored as its values in a VARCHAR(32) with a CHECK, the same on Postgres and
    SQLite (no native enum type to migrate)."""
    return Enum(cls, name=name, native_enum=False, values_callable=lambda e: [m.value for m in e],
                validate_strings=True, length=32)


class UUIDPrimaryKey:
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)


class Timestamped:
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AppSession(OrmSession):
    """Uses the engine of the app in context, unless bound explicitly (tests bind a connection).

    Several apps can then live in one process (tests, tools), each with its own database.
    """

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind is not None:
            return self.bind
        return current_app.extensions["ensoul_db_engine"]


class Database:
    """The scoped session and the per-app engines (an unbound extension)."""

    def __init__(self) -> None:
        self._factory = sessionmaker(class_=AppSession, expire_on_commit=False)
        self.session: scoped_session[AppSession] = scoped_session(self._factory)

    def init_app(self, app: Flask) -> None:
        app.extensions["ensoul_db_engine"] = make_engine(app.config["DATABASE_URL"], app.config)
        app.extensions["ensoul_db"] = self
        app.teardown_appcontext(self._remove_session)

    @property
    def engine(self) -> Engine:
        """The current app's engine."""
        engine: Engine = current_app.extensions["ensoul_db_engine"]
        return engine

    def bind(self, bind: Engine | Connection | None, **options: Any) -> None:
        """Bind every session to ``bind`` (tests: one connection in an outer transaction);
        ``None`` goes back to the app's engine."""
        self.session.remove()
        self._factory.configure(bind=bind, **options)

    def _remove_session(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.session.rollback()
        self.session.remove()


def make_engine(url: str, config: Any = None) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    timeout = int((config or {}).get("ENSOUL_STATEMENT_TIMEOUT_MS", 30000))
    return create_engine(
        url,
        pool_pre_ping=True,
        # Custom plans: a prepared prefix search (``LIKE $1``) would otherwise switch to a
        # generic plan that cannot use the prefix indexes (docs/benchmarks.md).
        connect_args={"options": f"-c statement_timeout={timeout} "
                                 "-c plan_cache_mode=force_custom_plan",
                      "connect_timeout": 5},
    )


db = Database()


def on_commit(callback: Any) -> None:
    """Run ``callback()`` once the current transaction commits (never if it rolls back)."""
    db.session().info.setdefault("on_commit", []).append(callback)


def transaction_state(key: str) -> tuple[dict[str, Any], bool]:
    """A dict that lives until the current transaction ends, and whether it is new."""
    info = db.session().info
    state_key = ("transaction_state", key)
    created = state_key not in info
    return info.setdefault(state_key, {}), created


def _end_transaction_state(session: OrmSession) -> None:
    for key in [k for k in session.info if isinstance(k, tuple) and k[0] == "transaction_state"]:
        del session.info[key]


@event.listens_for(OrmSession, "after_commit")
def _run_on_commit(session: OrmSession) -> None:
    callbacks = session.info.pop("on_commit", [])
    _end_transaction_state(session)
    for callback in callbacks:
        callback()


@event.listens_for(OrmSession, "after_rollback")
def _drop_on_commit(session: OrmSession) -> None:
    if not session.in_transaction():
        session.info.pop("on_commit", None)
        _end_transaction_state(session)


def get_by_id(model: type[Any], obj_id: Any, what: str) -> Any:
    """The row of a model that is not tenant-owned (tenant-owned rows go through
    ``core.tenancy.get_owned``), or ``NotFound`` for a missing row or a malformed id."""
    try:
        key = obj_id if isinstance(obj_id, uuid.UUID) else uuid.UUID(str(obj_id))
    except ValueError:
        key = None
    row = db.session.get(model, key) if key is not None else None
    if row is None:
        raise NotFound(f"No such {what}.")
    return row


def insert_ignoring_duplicates(table: Any, rows: list[dict[str, Any]],
                               unique: list[str]) -> None:
    """Insert ``rows`` (every column given, the same keys in each) in the session's transaction,
    skipping those whose ``unique`` key is already there.

    On Postgres the rows go straight to the driver as one pipelined executemany (SQLAlchemy's
    per-row parameter processing was a quarter of the usage writer's time). Elsewhere (SQLite,
    the embedded profile) through SQLAlchemy's insert. Enums must be given by value."""
    if not rows:
        return
    connection = db.session.connection()
    if connection.dialect.name != "postgresql":
        from sqlalchemy.dialects import sqlite

        connection.execute(sqlite.insert(table).on_conflict_do_nothing(
            index_elements=unique), rows)
        return
    from psycopg import sql
    from psycopg.types.json import Json
    from sqlalchemy.types import JSON

    columns = list(rows[0])
    statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO NOTHING").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        sql.SQL(", ").join(map(sql.Identifier, unique)))
    json_at = [i for i, name in enumerate(columns)
               if isinstance(table.columns[name].type, JSON)]
    tuples = []
    for row in rows:
        values = [row[name] for name in columns]
        for index in json_at:
            if values[index] is not None:
                values[index] = Json(values[index])
        tuples.append(values)
    with connection.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.executemany(statement, tuples)
