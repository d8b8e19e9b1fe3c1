"""Billing fixtures: the fleet's vendor (a tenant with an owner, a token and a product), and
limits generous enough for many streams per device (restored after each test)."""

from typing import Any

import pytest

from tests.fleet.fixtures import vendor  # noqa: F401


@pytest.fixture(autouse=True)
def generous_limits(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("committed_app", "app"):
        if name in request.fixturenames:
            app: Any = request.getfixturevalue(name)
            monkeypatch.setitem(app.config, "ENSOUL_INFERENCE_REQUESTS_PER_MINUTE", 100_000)
            monkeypatch.setitem(app.config, "ENSOUL_INFERENCE_CONCURRENT_STREAMS", 1000)
            return
