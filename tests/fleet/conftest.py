"""Fleet fixtures for broker access and presence: a Mosquitto the platform owns, devices with
credentials, and real paho clients that record what the broker answers.

``fleet_mosquitto`` is this suite's own Mosquitto (one per xdist worker): its password and ACL
files are rewritten from the registry by the tests, so the shared ``mosquitto`` fixture is
never disturbed. ``broker_platform`` points the app's settings at it.
"""

from __future__ import annotations

import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from accounts.models import Tenant
from core.db import db
from core.embedded_broker import EmbeddedBroker
from core.mqtt import MqttTarget, parse_mqtt_url
from fleet import services
from fleet.broker_access.embedded import broker_plugins
from fleet.models import Device, HardwareKind, Product
from tests.conftest import MosquittoInstance, running_mosquitto
from tests.factories import TenantFactory
from tests.support.waiting import free_port, wait_until

TIMEOUT = 10.0
V311 = {"protocol": paho.MQTTv311}  # amqtt speaks MQTT 3.1.1 only


@pytest.fixture(scope="session")
def fleet_mosquitto(log_dir: Path) -> Iterator[MosquittoInstance]:
    with running_mosquitto(log_dir, "fleet-mosquitto") as instance:
        yield instance


@pytest.fixture
def broker_platform(base_app: Any, fleet_mosquitto: MosquittoInstance,
                    monkeypatch: pytest.MonkeyPatch) -> MosquittoInstance:
    """The app owns ``fleet_mosquitto``'s files and logs in to it as its service account."""
    for key, value in fleet_mosquitto.platform_config().items():
        monkeypatch.setitem(base_app.config, key, value)
    return fleet_mosquitto


@pytest.fixture
def embedded_broker(committed_app: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[MqttTarget]:
    """The embedded profile's amqtt broker with the platform's access plugins, on a free port."""
    monkeypatch.setitem(committed_app.config, "MQTT_URL", f"embedded://127.0.0.1:{free_port()}")
    monkeypatch.setitem(committed_app.config, "ENSOUL_MQTT_ACCESS", "embedded")
    broker = EmbeddedBroker(parse_mqtt_url(committed_app.config["MQTT_URL"]),
                            broker_plugins(committed_app))
    broker.start()
    yield broker.target
    broker.stop()


# --- the registry --------------------------------------------------------------------------


class Provisioned(NamedTuple):
    device: Device
    password: str

    @property
    def username(self) -> str:
        return self.device.mqtt_username

    @property
    def client_id(self) -> str:
        return str(self.device.id)

    def topic(self, suffix: str) -> str:
        return f"{self.device.topic_prefix}/{suffix}"


def make_product(tenant: Tenant | None = None) -> Product:
    tenant = tenant or TenantFactory()
    product, _ = services.create_product(tenant.id, f"Glasses {uuid.uuid4().hex[:6]}",
                                         HardwareKind.GLASSES)
    db.session.commit()
    return product


def provision(product: Product) -> Provisioned:
    """A device with MQTT credentials (status ``provisioned``, which has broker access)."""
    device = services.create_device(product, f"SN-{uuid.uuid4().hex[:12]}")
    password = services.issue_credentials(device)
    db.session.commit()
    return Provisioned(device, password)


# --- real MQTT clients ---------------------------------------------------------------------


class Received(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class MqttClient:
    """A paho client speaking MQTT 5 (by default), so every refusal carries its reason code.

    It never reconnects on its own: a test sees exactly what the broker did.
    """

    def __init__(self, host: str, port: int, username: str | None, password: str | None, *,
                 client_id: str | None = None, ca_file: Path | None = None,
                 protocol: int = paho.MQTTv5) -> None:
        self.host, self.port = host, port
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-{uuid.uuid4().hex[:10]}",
                                  protocol=protocol, reconnect_on_failure=False)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file), cert_reqs=ssl.CERT_REQUIRED)
        self.connack: ReasonCode | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.messages: list[Received] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        self.connack = reason
        self.connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Any) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload), message.retain))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Any) -> None:
        with self._lock:
            self._subacks[mid] = reasons

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        with self._lock:
            self._pubacks[mid] = reason

    def set_will(self, topic: str, payload: str, *, qos: int = 1, retain: bool = True) -> None:
        self.client.will_set(topic, payload, qos=qos, retain=retain)

    def connect(self) -> ReasonCode:
        """Connect and return the CONNACK's reason (``Success`` or why not)."""
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        wait_until(lambda: self.connected.is_set() or self.disconnected.is_set(), TIMEOUT,
                   what="a CONNACK")
        assert self.connack is not None, f"disconnected before CONNACK: {self.disconnect_reason}"
        return self.connack

    def subscribe(self, topic: str, qos: int = 1) -> ReasonCode:
        """The SUBACK's reason: a granted QoS, or why the subscription was refused."""
        _, mid = self.client.subscribe(topic, qos)
        reasons = wait_until(lambda: self._subacks.get(mid), TIMEOUT, what=f"SUBACK {topic}")
        return reasons[0]

    def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason (MQTT 5 names a refusal)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return wait_until(lambda: self._pubacks.get(info.mid), TIMEOUT,
                          what=f"PUBACK {topic}")

    def received(self, topic: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def wait_for(self, topic: str, payload: bytes | None = None) -> Received:
        def _found() -> Received | None:
            return next((m for m in self.received(topic)
                         if payload is None or m.payload == payload), None)

        return wait_until(_found, TIMEOUT, what=f"a message on {topic}")

    def kill(self) -> None:
        """Drop the connection without DISCONNECT, as a device losing power would."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        if self.connected.is_set() and not self.disconnected.is_set():
            self.client.disconnect()
        self.client.loop_stop()


class Endpoint(Protocol):
    host: str
    port: int


@pytest.fixture
def mqtt_clients() -> Iterator[Callable[..., MqttClient]]:
    """``make(broker, username, password, **options)``: clients closed after the test."""
    made: list[MqttClient] = []

    def _make(broker: Endpoint, username: str | None, password: str | None, *,
              tls: bool = False, **options: Any) -> MqttClient:
        port = broker.tls_port if tls else broker.port  # type: ignore[attr-defined]
        ca_file = broker.certificates.ca_file if tls else None  # type: ignore[attr-defined]
        client = MqttClient(broker.host, port, username, password, ca_file=ca_file, **options)
        made.append(client)
        return client

    yield _make
    for client in made:
        client.close()


def log_in(make: Callable[..., MqttClient], broker: Any, username: str, password: str,
           **options: Any) -> MqttClient:
    """A client that logged in, retried while a just-signalled Mosquitto reload is pending."""
    def attempt() -> MqttClient | None:
        client = make(broker, username, password, **options)
        return None if client.connect().is_failure else client

    return wait_until(attempt, TIMEOUT, what=f"{username} to log in")


def service_client(make: Callable[..., MqttClient], instance: MosquittoInstance,
                   ) -> MqttClient:
    client = make(instance, instance.service_user, instance.service_password)
    assert client.connect().is_failure is False
    return client

# The registry, import and bootstrap tests' fixtures (defined in tests/fleet/fixtures.py).
from tests.fleet.fixtures import other_vendor, vendor  # noqa: E402,F401
