"""What a simulated device knows about itself: its id, MQTT credentials and broker address."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    username: str
    password: str
    topic_prefix: str
    host: str
    port: int
    serial: str = ""
    firmware_version: str = "1.0.0"

    @property
    def client_id(self) -> str:
        """The client id the platform hands out (``topics.connection_info``): the device id."""
        return self.device_id

    def topic(self, suffix: str) -> str:
        return f"{self.topic_prefix}/{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mqtt_info(cls, mqtt: dict[str, Any], *, serial: str = "",
                       firmware_version: str = "1.0.0") -> DeviceIdentity:
        """From the ``mqtt`` section of the bootstrap answer (xiaozhi keys)."""
        host, _, port = str(mqtt["endpoint"]).rpartition(":")
        return cls(device_id=str(mqtt["client_id"]), username=mqtt["username"],
                   password=mqtt["password"], topic_prefix=mqtt["topic_prefix"], host=host,
                   port=int(port), serial=serial, firmware_version=firmware_version)


def identities_from_credentials_csv(content: str | Path, host: str, port: int, *,
                                    firmware_version: str = "1.0.0") -> list[DeviceIdentity]:
    """Read an import's one-time credentials file (device_id, serial, mqtt_username,
    mqtt_password, topic_prefix) as handed to the factory for flashing."""
    text = content.read_text() if isinstance(content, Path) else content
    reader = csv.DictReader(io.StringIO(text))
    return [DeviceIdentity(device_id=row["device_id"], username=row["mqtt_username"],
                           password=row["mqtt_password"], topic_prefix=row["topic_prefix"],
                           host=host, port=port, serial=row.get("serial", ""),
                           firmware_version=firmware_version)
            for row in reader]
