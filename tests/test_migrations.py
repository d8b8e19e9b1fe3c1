"""The migrations build the whole schema on an empty database, go down to nothing and up again,
and agree with the models (``alembic check``), on Postgres and on SQLite (the embedded profile)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

import models_registry  # noqa: F401 - every model, so the metadata is complete
from core.cli import alembic_config
from core.db import Base
from tests.conftest import DB_PREFIX, PG_ADMIN_URL

MODEL_TABLES = {table.name for table in Base.metadata.sorted_tables}


@pytest.fixture
def empty_postgres(worker_number: int) -> Iterator[str]:
    name = f"{DB_PREFIX}_migr_{worker_number}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def config_for(url: str) -> Any:
    cfg = alembic_config(url)
    cfg.attributes["skip_logging"] = True  # type: ignore[attr-defined]
    return cfg


def tables(url: str) -> set[str]:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def audit_trigger_exists(url: str) -> bool:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return bool(conn.execute(text(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'audit_log_append_only'"
            )).scalar_one())
    finally:
        engine.dispose()


def up_down_up_check(url: str) -> None:
    cfg = config_for(url)
    assert tables(url) == set()
    command.upgrade(cfg, "head")
    assert tables(url) == MODEL_TABLES
    command.check(cfg)
    command.downgrade(cfg, "base")
    assert tables(url) == set()
    command.upgrade(cfg, "head")
    assert tables(url) == MODEL_TABLES
    command.check(cfg)  # raises when models and migrations disagree


def test_postgres_up_down_up_and_check(empty_postgres: str) -> None:
    up_down_up_check(empty_postgres)
    assert audit_trigger_exists(empty_postgres)
    command.downgrade(config_for(empty_postgres), "base")
    assert not audit_trigger_exists(empty_postgres)


def test_sqlite_up_down_up_and_check(tmp_path: Path) -> None:
    up_down_up_check(f"sqlite:///{tmp_path / 'fresh.db'}")


def test_the_ledger_is_append_only_on_sqlite_too(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    command.upgrade(config_for(url), "head")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, slug, currency, timezone, status, "
                              "require_two_factor, created_at) VALUES ('t1', 'T', 't', 'EUR', "
                              "'UTC', 'active', 0, '2026-12-07')"))
            conn.execute(text("INSERT INTO ledger_entries (id, tenant_id, account, kind, "
                              "credits, cause_type, cause_id, details, created_at) VALUES "
                              "('e1', 't1', 'package:p', 'grant', 10, 'purchase', 'p', '{}', "
                              "'2026-12-07')"))
        for statement in ("UPDATE ledger_entries SET credits = 99",
                          "DELETE FROM ledger_entries"):
            with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT credits FROM ledger_entries")).scalar_one() == 10
    finally:
        engine.dispose()


def test_one_head_and_sortable_file_names() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(config_for("sqlite://"))
    assert len(script.get_heads()) == 1
    for revision in script.walk_revisions():
        name = Path(revision.path).name
        assert name[:8].isdigit() and name[8] == "_" and name[9:13].isdigit(), name
        assert revision.revision in name
