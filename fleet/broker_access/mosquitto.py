"""The Mosquitto adapter: the platform owns Mosquitto's password file and ACL file.

Both live in ``ENSOUL_MOSQUITTO_DIR`` (``instance/mosquitto`` by default) as ``passwords`` and
``acl``, which is where ``config/mosquitto/mosquitto.conf.template`` points Mosquitto. A sync
streams the registry into temporary files next to them and replaces a file (fsynced, atomic
rename, mode 0644 so a Mosquitto that dropped to its own user reads it) only when its content
changed. A replaced file leaves a ``.reload-pending`` marker until Mosquitto has been told:
``ENSOUL_MOSQUITTO_RELOAD_COMMAND`` if set, else ``SIGHUP`` to the pid in
``ENSOUL_MOSQUITTO_PID_FILE``. A failed reload keeps the marker, is logged and recorded in Redis,
and raises :class:`ReloadFailed` so the job fails visibly and the next sync reloads even though
the files no longer change. The registry is never rolled back because the broker is down.

On reload Mosquitto re-checks every connected client against the new files: a client whose
username is gone, or whose password no longer matches the (rotated) hash, is disconnected.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from config.settings import INSTANCE_DIR
from core.db import db
from core.redis import get_redis, name
from fleet.broker_access.rules import ServiceAccount, has_broker_access, service_account
from fleet.credentials import hash_password
from fleet.models import Device
from fleet.topics import acl_patterns

log = logging.getLogger(__name__)

PASSWORD_FILE = "passwords"  # noqa: S105 - a file name
ACL_FILE = "acl"
PENDING_MARKER = ".reload-pending"
RELOAD_FAILED_KEY = "mqtt-access:reload-failed"
STREAM_BATCH = 5000


class ReloadFailed(RuntimeError):
    """Mosquitto could not be told to reload; the files are written, the reload is pending."""


@dataclass
class _Tally:
    """Devices written, and against the previous file (reconcile only) what differs."""

    previous: dict[str, str] | None
    devices: int = 0
    added: int = 0
    updated: int = 0
    seen: set[str] = field(default_factory=set)

    def count(self, username: str, password_hash: str) -> None:
        if self.previous is None:
            return
        self.seen.add(username)
        old = self.previous.get(username)
        if old is None:
            self.added += 1
        elif old != password_hash:
            self.updated += 1

    @property
    def removed(self) -> int:
        return 0 if self.previous is None else len(self.previous.keys() - self.seen)


@dataclass
class MosquittoFiles:
    directory: Path
    pid_file: Path
    reload_command: str | None = None
    service: ServiceAccount | None = None
    salt_key: bytes = b""

    @classmethod
    def from_config(cls, config: MutableMapping[str, Any]) -> MosquittoFiles:
        directory = Path(config.get("ENSOUL_MOSQUITTO_DIR") or INSTANCE_DIR / "mosquitto")
        pid_file = config.get("ENSOUL_MOSQUITTO_PID_FILE") or directory / "mosquitto.pid"
        service = service_account(config)
        if service is None:
            log.warning("MQTT_URL has no username and password: the platform's own clients "
                        "will not be able to log in to Mosquitto")
        return cls(directory=directory, pid_file=Path(pid_file),
                   reload_command=config.get("ENSOUL_MOSQUITTO_RELOAD_COMMAND") or None,
                   service=service, salt_key=str(config["SECRET_KEY"]).encode())

    @property
    def password_path(self) -> Path:
        return self.directory / PASSWORD_FILE

    @property
    def acl_path(self) -> Path:
        return self.directory / ACL_FILE

    @property
    def pending_marker(self) -> Path:
        return self.directory / PENDING_MARKER

    def sync(self) -> dict[str, Any]:
        """Rewrite what changed and reload: ``{"devices", "changed", "reloaded"}``."""
        return self._apply(detailed=False)

    def reconcile(self) -> dict[str, Any]:
        """:meth:`sync`, also reporting entries added, updated and removed against the files."""
        return self._apply(detailed=True)

    def _apply(self, *, detailed: bool) -> dict[str, Any]:
        self.directory.mkdir(parents=True, exist_ok=True)
        tally = _Tally(previous=read_password_file(self.password_path) if detailed else None)
        passwords_changed = self._replace_if_changed(self.password_path,
                                                     self._password_lines(tally))
        acl_changed = self._replace_if_changed(self.acl_path, self.acl_lines())
        report: dict[str, Any] = {"devices": tally.devices,
                                  "changed": passwords_changed or acl_changed,
                                  "reloaded": False}
        if detailed:
            report.update(added=tally.added, updated=tally.updated, removed=tally.removed,
                          acl_rewritten=acl_changed)
        if self.pending_marker.exists():
            self._reload(tally.devices)
            report["reloaded"] = True
        return report

    # --- content -------------------------------------------------------------------------

    def _password_lines(self, tally: _Tally) -> Iterator[str]:
        if self.service is not None:
            service_hash = self._service_hash(self.service)
            tally.count(self.service.username, service_hash)
            yield f"{self.service.username}:{service_hash}\n"
        rows = db.session.execute(
            select(Device.tenant_id, Device.id, Device.mqtt_password_hash)
            .where(has_broker_access())
            .order_by(Device.id)
            .execution_options(yield_per=STREAM_BATCH)
        )
        for tenant_id, device_id, password_hash in rows:
            if not password_hash or ":" in password_hash or "\n" in password_hash:
                log.error("device %s has a malformed password hash; left out", device_id)
                continue
            username = f"{tenant_id}/d/{device_id}"  # Device.mqtt_username
            tally.devices += 1
            tally.count(username, password_hash)
            yield f"{username}:{password_hash}\n"

    def _service_hash(self, account: ServiceAccount) -> str:
        # A salt derived from SECRET_KEY keeps the line stable, so an unchanged registry
        # rewrites nothing and Mosquitto is not reloaded for nothing.
        salt = hmac.new(self.salt_key, f"mosquitto-service:{account.username}".encode(),
                        hashlib.sha256).digest()[:12]
        return hash_password(account.password, salt=salt)

    def acl_lines(self) -> Iterator[str]:
        yield "# Written by Ensoul from the device registry; edits are overwritten.\n"
        if self.service is not None:
            yield f"user {self.service.username}\ntopic readwrite t/#\n\n"
        yield "# Device {tenant}/d/{device} owns t/{tenant}/d/{device}/<suffix> (fleet.topics)\n"
        for line in acl_patterns():
            yield line + "\n"

    # --- files ---------------------------------------------------------------------------

    def _replace_if_changed(self, path: Path, lines: Iterable[str]) -> bool:
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
                for line in lines:
                    out.write(line)
                    digest.update(line.encode())
                out.flush()
                if digest.digest() == _file_digest(path):
                    return False
                os.fsync(out.fileno())
            tmp.chmod(0o644)
            # The marker goes first: a crash between the rename and the reload still reloads.
            self.pending_marker.touch()
            os.replace(tmp, path)
            _fsync_directory(self.directory)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    # --- reload --------------------------------------------------------------------------

    def _reload(self, devices: int) -> None:
        try:
            self._signal_mosquitto()
        except ReloadFailed as exc:
            log.error("Mosquitto reload failed (files written, reload pending): %s", exc)
            get_redis().set(name(RELOAD_FAILED_KEY), json.dumps({
                "at": dt.datetime.now(dt.UTC).isoformat(), "error": str(exc),
                "devices": devices}))
            raise
        self.pending_marker.unlink(missing_ok=True)
        get_redis().delete(name(RELOAD_FAILED_KEY))
        log.info("Mosquitto reloaded with %s device entries", devices)

    def _signal_mosquitto(self) -> None:
        if self.reload_command:
            try:
                # The operator's own command (ENSOUL_MOSQUITTO_RELOAD_COMMAND), run by a shell.
                result = subprocess.run(["/bin/sh", "-c", self.reload_command],  # noqa: S603
                                        capture_output=True, text=True, timeout=30, check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                raise ReloadFailed(f"reload command failed: {exc}") from exc
            if result.returncode != 0:
                raise ReloadFailed(f"reload command exited with {result.returncode}: "
                                   f"{(result.stderr or result.stdout).strip()[-300:]}")
            return
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ReloadFailed(f"no Mosquitto pid in {self.pid_file}: {exc}") from exc
        comm = Path(f"/proc/{pid}/comm")
        if comm.parent.parent.exists():  # Linux: never signal a pid that was reused
            try:
                command = comm.read_text().strip()
            except OSError:
                raise ReloadFailed(f"Mosquitto (pid {pid}) is not running") from None
            if "mosquitto" not in command:
                raise ReloadFailed(f"pid {pid} from {self.pid_file} is {command!r}, "
                                   "not mosquitto")
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            raise ReloadFailed(f"cannot signal Mosquitto (pid {pid}): {exc}") from exc


def read_password_file(path: Path) -> dict[str, str]:
    """``username -> hash`` of a Mosquitto password file (empty when there is none)."""
    entries: dict[str, str] = {}
    try:
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                username, sep, password_hash = line.rstrip("\n").rpartition(":")
                if sep:
                    entries[username] = password_hash
    except FileNotFoundError:
        pass
    return entries


def reload_failure() -> dict[str, Any] | None:
    """The last reload failure not yet followed by a successful reload."""
    raw = get_redis().get(name(RELOAD_FAILED_KEY))
    return json.loads(raw) if raw else None


def _file_digest(path: Path) -> bytes | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as existing:
            for chunk in iter(lambda: existing.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.digest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
