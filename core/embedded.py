"""The embedded profile: web, MQTT broker and jobs in one process, nothing external."""

from __future__ import annotations

import logging

import click
from flask import Flask
from werkzeug.serving import make_server

from core.cli import GracefulStop, upgrade_database
from core.embedded_broker import EmbeddedBroker
from core.mqtt import parse_mqtt_url

log = logging.getLogger(__name__)


def run_embedded(app: Flask, host: str, port: int) -> None:
    upgrade_database()
    target = parse_mqtt_url(app.config["MQTT_URL"])
    broker = EmbeddedBroker(target) if target.embedded else None
    if broker is not None:
        broker.start()
    server = make_server(host, port, app, threaded=True)
    stop = GracefulStop()
    import threading

    thread = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    thread.start()
    click.echo(f"Ensoul (embedded) is running: http://{host}:{port}/  (Ctrl-C stops it)")
    stop.event.wait()
    server.shutdown()
    if broker is not None:
        broker.stop()
    click.echo("stopped")
