"""The Procfile's processes and the embedded all-in-one server.

They compose the domains, so they live above them: ``broker`` tracks presence (inference joins
it later), ``scheduler`` enqueues the domains' periodic jobs, ``worker`` runs rq jobs, and
``serve`` runs all of it in one process on the embedded profile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from werkzeug.serving import make_server

from core.cli import GracefulStop, upgrade_database
from core.embedded_broker import EmbeddedBroker
from core.mqtt import parse_mqtt_url, platform_target

log = logging.getLogger(__name__)


def register(app: Flask) -> None:
    @app.cli.command("serve")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=8000, show_default=True, type=int)
    @click.option("--demo-devices", default=0, show_default=True, type=click.IntRange(0, 1000),
                  help="Simulated devices of the demo tenant that connect and keep presence.")
    @with_appcontext
    def serve(host: str, port: int, demo_devices: int) -> None:
        """Run the whole platform in one process (the embedded profile)."""
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        if not os.environ.get("ENSOUL_BASE_URL"):  # links in mails and pages follow --port
            app.config["ENSOUL_BASE_URL"] = f"http://{host}:{port}"
        upgrade_database()  # before the periodic jobs touch the tables
        with _embedded_broker(app), _embedded_background(app), _demo_fleet(app, demo_devices):
            _serve_http(app, host, port)

    @app.cli.command("broker")
    @with_appcontext
    def broker() -> None:
        """The broker process: streams inference answers and tracks device presence.

        Run one per core; they share the devices' messages through shared subscriptions.
        """
        from fleet.presence import PresenceTracker
        from inference.service import BrokerThread

        if current_app.config["EMBEDDED"]:
            raise click.ClickException("the embedded profile runs the broker inside `serve`")
        stop = GracefulStop()
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        target = platform_target(current_app.config)
        _serve_metrics(app)
        tracker = PresenceTracker(app, target, shared=True)
        tracker.start()
        inference = BrokerThread(app, target, shared=True)
        inference.start()
        log.info("broker started: inference and presence on %s", target.safe_url)
        click.echo("broker started", err=True)
        try:
            while not stop.event.wait(0.5):
                if tracker.refused.is_set() or inference.refused.is_set():
                    raise click.ClickException(f"{target.safe_url} refused the platform's login")
                if inference.failed is not None:
                    raise click.ClickException(f"the inference broker failed: {inference.failed}")
        finally:
            inference.stop()
            tracker.stop()
        click.echo("broker stopped", err=True)
        sys.exit(0)

    @app.cli.command("usage-writer")
    @with_appcontext
    def usage_writer() -> None:
        """Writes the usage events of the Redis streams to Postgres (one or more processes)."""
        from inference.usage import run_usage_writer

        if current_app.config["EMBEDDED"]:
            raise click.ClickException("the embedded profile writes usage inside `serve`")
        stop = GracefulStop()
        click.echo("usage writer started", err=True)
        run_usage_writer(current_app._get_current_object(),  # type: ignore[attr-defined]
                         stop.event)
        click.echo("usage writer stopped", err=True)
        sys.exit(0)

    @app.cli.command("scheduler")
    @with_appcontext
    def scheduler() -> None:
        """Enqueues the domains' periodic jobs (presence flush, broker access reconcile...)."""
        stop = GracefulStop()
        log.info("scheduler started")
        click.echo("scheduler started", err=True)
        run_periodic(current_app._get_current_object(), stop.event)  # type: ignore[attr-defined]
        click.echo("scheduler stopped", err=True)
        sys.exit(0)

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


def run_periodic(app: Flask, stop: threading.Event) -> None:
    """Enqueue every periodic job when it is due, until ``stop`` is set.

    A Redis key per job and interval lets several schedulers run without enqueueing twice.
    The embedded profile runs each job right here (its queue is synchronous).
    """
    from billing.tasks import periodic_jobs as billing_jobs
    from core.queue import enqueue
    from core.redis import get_redis, name
    from fleet.tasks import periodic_jobs as fleet_jobs
    from inference.tasks import periodic_jobs as inference_jobs

    jobs = fleet_jobs(app.config) + inference_jobs(app.config) + billing_jobs(app.config)
    due = [0.0] * len(jobs)
    while not stop.is_set():
        for index, (every, job) in enumerate(jobs):
            if time.monotonic() < due[index]:
                continue
            due[index] = time.monotonic() + every
            with app.app_context():
                try:
                    key = name("periodic", job.__name__)
                    if get_redis().set(key, "1", nx=True, ex=max(1, every - 1)):
                        queued = enqueue(job)
                        if queued.is_failed:  # run here (embedded), where rq only records it
                            result = queued.latest_result()
                            log.error("periodic job %s failed: %s", job.__name__,
                                      result.exc_string if result else "")
                except Exception:  # a failed tick is logged; the next one tries again
                    log.exception("periodic job %s failed to run", job.__name__)
        stop.wait(max(0.05, min(due) - time.monotonic()))


def _serve_http(app: Flask, host: str, port: int) -> None:
    server = make_server(host, port, app, threaded=True)
    stop = GracefulStop()
    thread = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    thread.start()
    click.echo(f"Ensoul (embedded) is running: http://{host}:{port}/  (Ctrl-C stops it)")
    stop.event.wait()
    server.shutdown()
    click.echo("stopped")


@contextlib.contextmanager
def _embedded_broker(app: Flask) -> Iterator[None]:
    """The in-process MQTT broker with the registry's access rules."""
    from fleet.broker_access.embedded import broker_plugins

    target = parse_mqtt_url(app.config["MQTT_URL"])
    if not target.embedded:
        yield
        return
    broker = EmbeddedBroker(target, broker_plugins(app))
    broker.start()
    try:
        yield
    finally:
        broker.stop()


@contextlib.contextmanager
def _demo_fleet(app: Flask, count: int) -> Iterator[None]:
    """``count`` simulated devices of the demo tenant, connected through the real MQTT path.

    Their passwords are issued afresh at each start (only hashes are stored).
    """
    if count <= 0:
        yield
        return
    from bench.simulator import DeviceIdentity, SimulatedFleet
    from demo import demo_device_credentials

    with app.app_context():
        credentials = demo_device_credentials(count)
    identities = [DeviceIdentity.from_mqtt_info(info, serial=serial, firmware_version="1.4.2")
                  for serial, info in credentials]
    fleet = SimulatedFleet(identities, workers=1, behaviour="bench.simulator.chat:converse")
    report = fleet.start(timeout=60)
    click.echo(f"{report.connected} simulated demo devices are online")
    try:
        yield
    finally:
        fleet.stop()


def _serve_metrics(app: Flask) -> None:
    """Prometheus metrics of this process; several brokers on one host take the next free
    port after ``ENSOUL_INFERENCE_METRICS_PORT``."""
    first = int(app.config["ENSOUL_INFERENCE_METRICS_PORT"])
    if not first:
        return
    from prometheus_client import start_http_server

    for port in range(first, first + 16):
        try:
            start_http_server(port, addr="127.0.0.1")
        except OSError:
            continue
        log.info("metrics on http://127.0.0.1:%s/metrics", port)
        return
    log.warning("no free metrics port in %s-%s", first, first + 15)


@contextlib.contextmanager
def _embedded_background(app: Flask) -> Iterator[None]:
    """What the Procfile's broker, usage writer and scheduler do, as threads of ``serve``."""
    from billing.balances import rebuild_all
    from fleet.presence import PresenceTracker
    from inference.service import BrokerThread
    from inference.usage import run_usage_writer

    with app.app_context():  # the embedded Redis starts empty: balances come from the ledger
        rebuild_all()
    stop = threading.Event()
    target = platform_target(app.config)
    tracker = PresenceTracker(app, target, shared=False)
    tracker.start()  # paho retries until the embedded broker listens
    inference = BrokerThread(app, target, shared=False)
    inference.start()
    threads = [threading.Thread(target=run_periodic, args=(app, stop), name="periodic",
                                daemon=True),
               threading.Thread(target=run_usage_writer, args=(app, stop), name="usage-writer",
                                daemon=True)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        inference.stop()
        tracker.stop()
        for thread in threads:
            thread.join(10)
