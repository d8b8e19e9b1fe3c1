"""``/healthz`` says the process is alive; ``/readyz`` checks the database, Redis and MQTT."""

from __future__ import annotations

from typing import Any

from tests.support.waiting import free_port


def test_healthz(client: Any) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_with_every_dependency_up(app: Any, client: Any, mosquitto: Any,
                                         monkeypatch: Any) -> None:
    monkeypatch.setitem(app.config, "MQTT_URL", mosquitto.url)
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "status": "ready", "checks": {"database": "ok", "redis": "ok", "mqtt": "ok"}}


def test_readyz_is_503_when_mqtt_is_down(app: Any, client: Any, monkeypatch: Any) -> None:
    monkeypatch.setitem(app.config, "MQTT_URL", f"mqtt://127.0.0.1:{free_port()}")
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"] == {"database": "ok", "redis": "ok", "mqtt": "unavailable"}
    assert body["error"]["code"] == "unavailable"
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["details"]["mqtt"] == "unavailable"


def test_readyz_is_503_when_mqtt_refuses_the_login(app: Any, client: Any, mosquitto: Any,
                                                   monkeypatch: Any) -> None:
    wrong = f"mqtt://{mosquitto.service_user}:wrong-password@{mosquitto.host}:{mosquitto.port}"
    monkeypatch.setitem(app.config, "MQTT_URL", wrong)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["mqtt"] == "unavailable"


def test_readyz_never_shows_the_mqtt_password(app: Any, client: Any, mosquitto: Any,
                                              monkeypatch: Any) -> None:
    monkeypatch.setitem(app.config, "MQTT_URL", f"mqtt://u:hunter2-secret@127.0.0.1:{free_port()}")
    response = client.get("/readyz")
    assert "hunter2-secret" not in response.get_data(as_text=True)
