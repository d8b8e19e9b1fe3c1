"""How simulated devices get their identities, the two ways real ones do.

- :func:`import_identities`: factory provisioning. A CSV import with credentials issued (and the
  devices activated); the one-time credentials file is read back as a factory would flash it.
- :func:`bootstrap_identities`: the xiaozhi-shaped bootstrap over HTTP. Each device checks in
  (``POST /bootstrap/ota/``) and gets a 6-digit code, polls once (``202``), the vendor's app
  claims the code through the REST API with its token, and the next poll returns the MQTT
  credentials (``200``).

Both need an app context (import) or an HTTP client of the app (bootstrap): the Flask test
client in-process, or :class:`HttpTransport` against a running server.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench.common import Vendor, device_csv, summary_ms
from bench.simulator.identity import DeviceIdentity, identities_from_credentials_csv


def import_identities(vendor: Vendor, count: int, *, prefix: str = "SIM",
                      firmware_version: str = "1.0.0") -> list[DeviceIdentity]:
    """Import ``count`` devices with credentials, activated; commit; read the one-time file."""
    from core.db import db
    from fleet import imports, topics
    from fleet.models import Product

    product = db.session.get(Product, vendor.product_id)
    assert product is not None
    batch = imports.import_devices(product, device_csv(count, prefix), filename="sim.csv",
                                   issue_credentials=True, activate=True)
    db.session.commit()
    content = imports.take_credentials_file(batch)
    db.session.commit()
    host, port, _tls = topics.public_endpoint()
    return identities_from_credentials_csv(content, host, port,
                                           firmware_version=firmware_version)


class Transport(Protocol):
    def post(self, path: str, body: dict[str, Any],
             headers: dict[str, str]) -> tuple[int, dict[str, Any]]: ...


class FlaskTransport:
    """The app in-process through its test client (no server, no sockets)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def post(self, path: str, body: dict[str, Any],
             headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        response = self.client.post(path, json=body, headers=headers)
        return response.status_code, response.get_json(silent=True) or {}


class HttpTransport:
    """A running server (``--base-url http://127.0.0.1:8000``), one kept-alive connection."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def post(self, path: str, body: dict[str, Any],
             headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode()
        self.conn.request("POST", path, body=data,
                          headers={**headers, "Content-Type": "application/json"})
        response = self.conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw) if raw else {}
        except ValueError:
            return response.status, {"raw": raw[:200].decode(errors="replace")}


@dataclass
class BootstrapReport:
    devices: int
    activated: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    steps: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"devices": self.devices, "activated": self.activated,
                "failures": self.failures, "seconds": round(self.seconds, 3),
                "devices_per_second": round(self.activated / self.seconds, 1)
                if self.seconds else 0.0,
                "steps": {k: summary_ms(v) for k, v in self.steps.items() if v}}


def bootstrap_identities(transport: Transport, vendor: Vendor, count: int, *,
                         firmware_version: str = "1.0.0",
                         board: str = "bench-sim-board") -> tuple[list[DeviceIdentity],
                                                                  BootstrapReport]:
    """Bootstrap ``count`` new devices one after another, as the xiaozhi firmware does."""
    report = BootstrapReport(devices=count, steps={"ota": [], "poll_pending": [], "claim": [],
                                                   "poll_activated": []})
    identities: list[DeviceIdentity] = []
    base = uuid.uuid4().int & ((1 << 40) - 1)
    started = time.perf_counter()
    for i in range(count):
        raw = f"02{base + i:010x}"
        mac = ":".join(raw[j:j + 2] for j in range(0, 12, 2))
        try:
            identity = _bootstrap_one(transport, vendor, mac, firmware_version, board,
                                      report.steps)
        except BootstrapFailed as exc:
            report.failures[str(exc)] = report.failures.get(str(exc), 0) + 1
            continue
        identities.append(identity)
    report.seconds = time.perf_counter() - started
    report.activated = len(identities)
    return identities, report


class BootstrapFailed(Exception):
    pass


def _timed(steps: dict[str, list[float]], step: str, call: Callable[[], tuple[int, Any]],
           expect: int) -> dict[str, Any]:
    started = time.perf_counter()
    status, body = call()
    steps[step].append(time.perf_counter() - started)
    if status != expect:
        code = body.get("code") if isinstance(body, dict) else None
        raise BootstrapFailed(f"{step}: HTTP {status} {code or ''}".strip())
    return body


def _bootstrap_one(transport: Transport, vendor: Vendor, mac: str, firmware_version: str,
                   board: str, steps: dict[str, list[float]]) -> DeviceIdentity:
    client_id = str(uuid.uuid4())
    device_headers = {"Device-Id": mac, "Client-Id": client_id,
                      "Enrolment-Key": vendor.enrolment_key}
    system_info = {"mac_address": mac, "uuid": client_id,
                   "application": {"name": "xiaozhi", "version": firmware_version},
                   "board": {"type": board}}
    answer = _timed(steps, "ota", lambda: transport.post("/bootstrap/ota/", system_info,
                                                         device_headers), 200)
    activation = answer.get("activation")
    if not activation:
        raise BootstrapFailed("ota: no activation code (device already active?)")
    poll = {"challenge": activation["challenge"]}
    _timed(steps, "poll_pending", lambda: transport.post("/bootstrap/ota/activate", poll,
                                                         device_headers), 202)
    _timed(steps, "claim", lambda: transport.post("/api/v1/activation-codes/claim",
                                                  {"code": activation["code"]}, vendor.auth),
           200)
    done = _timed(steps, "poll_activated", lambda: transport.post(
        "/bootstrap/ota/activate", poll, device_headers), 200)
    return DeviceIdentity.from_mqtt_info(done["mqtt"], serial=mac.replace(":", ""),
                                         firmware_version=firmware_version)
