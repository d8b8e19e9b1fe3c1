"""Portal tests: every request starts with a fresh ``g``, as it does in production.

The ``app`` fixture keeps one app context pushed for the whole test and the test client
reuses it, so without this Flask-Login's cached user and Flask-Babel's cached locale would
leak from one request into the next.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask import g

from tests.conftest import CommittingClient


class FreshRequestClient(CommittingClient):
    def open(self, *args: Any, **kwargs: Any) -> Any:
        for name in list(g):
            g.pop(name)
        return super().open(*args, **kwargs)


@pytest.fixture
def client(app: Any) -> Any:
    app.test_client_class = FreshRequestClient
    return app.test_client()


# Fixtures of the fleet pages' tests (tests/portal/test_portal_fleet_*.py).
from tests.portal.fleet_helpers import other_vendor, refusing_hook, vendor  # noqa: E402, F401
