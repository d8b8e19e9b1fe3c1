"""Two creates of the same serial at once: the loser gets 409, never a 500."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from sqlalchemy import text

from core.db import db
from tests.fleet.fixtures import make_vendor
from tests.support.waiting import wait_until


def test_a_racing_duplicate_serial_answers_409(committed_app: Any) -> None:
    vendor = make_vendor()
    client = committed_app.test_client()
    engine = committed_app.extensions["ensoul_db_engine"]
    other = engine.connect()
    tx = other.begin()
    other.execute(text(
        "INSERT INTO devices (id, tenant_id, product_id, serial, name, status, created_at) "
        "VALUES (:id, :t, :p, 'RACE-1', 'x', 'provisioned', now())"),
        {"id": uuid.uuid4(), "t": vendor.setup.tenant.id, "p": vendor.product.id})
    result: dict[str, Any] = {}

    def call() -> None:
        with committed_app.app_context():
            r = client.post("/api/v1/devices", json={"product_id": str(vendor.product.id),
                                                     "serial": "RACE-1"}, headers=vendor.headers)
            result["r"] = (r.status_code, r.get_json())

    thread = threading.Thread(target=call)
    thread.start()
    try:
        # Autocommit: Postgres keeps one snapshot of pg_stat_activity per transaction.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
            wait_until(lambda: not thread.is_alive() or watcher.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()")).scalar(), 10, what="the insert to wait")
        assert thread.is_alive(), f"the request did not wait for the lock: {result}"
    finally:
        tx.commit()
        other.close()
        thread.join(10)
    db.session.remove()

    assert result["r"][0] == 409, result
    assert result["r"][1]["error"]["code"] == "conflict"
