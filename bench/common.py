"""What every benchmark shares: its own database, Redis db and Mosquitto; timing and results.

Benchmarks run against the real services of the services profile (Postgres, Redis, a Mosquitto
started here with the project's config template on a free port, never the system one on 1883)
under names of their own: databases ``ensoul_bench*``, Redis db 14 with a per-run key prefix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import string
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
PG_ADMIN_URL = os.environ.get("ENSOUL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ENSOUL_BENCH_REDIS", "redis://127.0.0.1:6379/14")
SERVICE_USER = "ensoul-platform"
# Below `ulimit -n` (20,000 here) with room for Mosquitto's own descriptors.
MOSQUITTO_MAX_CONNECTIONS = 19_000


# --- descriptors ---------------------------------------------------------------------------


def raise_nofile_limit(wanted: int = 20_000) -> int:
    """Raise this process's open-file limit as far as the hard limit allows; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- Postgres ------------------------------------------------------------------------------


def database_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _schema_template() -> str:
    """A database migrated to head once, copied by every run (CREATE DATABASE ... TEMPLATE).

    Its name carries a digest of the migrations, so a new migration makes a new template; a
    stale one is dropped when the new one is made. An advisory lock serialises two runs that
    would both build it.
    """
    digest = hashlib.sha256()
    for path in sorted((PROJECT_ROOT / "migrations" / "versions").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    name = f"ensoul_bench_tmpl_{digest.hexdigest()[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('ensoul_bench_template'))")
        try:
            names = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'ensoul_bench_tmpl_%'")]
            if name in names:
                return name
            for stale in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
            from alembic import command

            from core.cli import alembic_config

            cfg = alembic_config(database_url(name))
            cfg.attributes["skip_logging"] = True  # type: ignore[attr-defined]
            command.upgrade(cfg, "head")  # type: ignore[arg-type]
            return name
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('ensoul_bench_template'))")


def fresh_database(name: str) -> str:
    """Drop and recreate ``name`` with the schema the migrations build; return its URL."""
    if not name.startswith("ensoul_bench") or name.startswith("ensoul_bench_tmpl_"):
        raise ValueError(f"benchmark databases are named ensoul_bench*, not {name!r}")
    template = _schema_template()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return database_url(name)


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- Redis ---------------------------------------------------------------------------------


def new_redis_prefix(label: str) -> str:
    return f"ensoul-bench-{label}-{uuid.uuid4().hex[:8]}"


def clear_redis_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete this run's keys (never FLUSHDB: other runs may share db 14)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        batch = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(batch), 1000):
            client.delete(*batch[start:start + 1000])
        # rq keeps its own key names; jobs our runs enqueued stay harmless but we drop them.
        for key in client.scan_iter(match="rq:*", count=1000):
            client.delete(key)
    finally:
        client.close()


# --- Mosquitto -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _self_signed(workdir: Path) -> tuple[Path, Path]:
    """A throwaway certificate for the template's TLS listener (benchmarks use plain MQTT)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "server.crt", workdir / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class MosquittoServer:
    """A Mosquitto on a free port, rendered from the project's config template.

    Its password and ACL files live in ``workdir`` (``passwords`` and ``acl``, the names the
    platform's Mosquitto adapter writes when ``ENSOUL_MOSQUITTO_DIR`` points there). It is
    started with the open-file limit raised and ``max_connections`` set so 10,000 simulated
    devices fit.
    """

    def __init__(self, workdir: Path | None = None, *, options: Sequence[str] = ()) -> None:
        from fleet.credentials import hash_password

        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ensoul-bench-mosquitto-"))
        self.password_file = self.workdir / "passwords"
        self.acl_file = self.workdir / "acl"
        self.pid_file = self.workdir / "mosquitto.pid"
        self.log_file = self.workdir / "mosquitto.log"
        self.service_user = SERVICE_USER
        self.service_password = uuid.uuid4().hex
        self.password_file.write_text(
            f"{self.service_user}:{hash_password(self.service_password)}\n")
        self.acl_file.write_text(f"user {self.service_user}\ntopic readwrite #\n")
        # Started as root, Mosquitto drops to its own user: it must read and write here.
        self.workdir.chmod(0o777)
        for path in (self.password_file, self.acl_file):
            path.chmod(0o644)
        self.options = list(options)  # extra global lines, for what-if runs
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(self._render())
        self.process: subprocess.Popen[bytes] | None = None

    def _render(self) -> str:
        template = (PROJECT_ROOT / "config/mosquitto/mosquitto.conf.template").read_text()
        values: dict[str, Any] = {
            "password_file": self.password_file, "acl_file": self.acl_file,
            "pid_file": self.pid_file, "port": self.port, "host": self.host,
        }
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        if "tls_port" in fields:
            cert, key = _self_signed(self.workdir)
            values.update(tls_port=free_port(), cafile=cert, certfile=cert, keyfile=key)
        missing = fields - set(values)
        if missing:
            raise RuntimeError(f"the Mosquitto template has fields bench/ does not fill: "
                               f"{sorted(missing)}")
        lines = list(self.options)
        for line in template.format(**values).splitlines():
            lines.append(line)
            if line.startswith("listener "):
                lines.append(f"max_connections {MOSQUITTO_MAX_CONNECTIONS}")
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        return f"mqtt://{self.service_user}:{self.service_password}@{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoServer:
        def _limits() -> None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            target = 20_000 if hard == resource.RLIM_INFINITY else min(20_000, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_limits, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not port_open(self.host, self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_file.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto did not listen on {self.port} in {timeout}s")
            time.sleep(0.02)
        return self

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the app -------------------------------------------------------------------------------


def bench_settings(database: str, redis_prefix: str, **extra: Any) -> dict[str, Any]:
    """The services profile against the benchmark's own database and Redis keys."""
    return {
        "DATABASE_URL": database,
        "REDIS_URL": REDIS_URL,
        "MQTT_URL": "mqtt://127.0.0.1:1",  # replaced by the benchmark's own Mosquitto if any
        "SECRET_KEY": "bench-secret-key",
        "ENSOUL_ENCRYPTION_KEY": "bench-encryption-key",
        "ENSOUL_REDIS_PREFIX": redis_prefix,
        "ENSOUL_BASE_URL": "http://localhost",
        "ENSOUL_SKIP_LOGGING": True,
        "ENSOUL_COOKIE_SECURE": False,
        "ENSOUL_API_RATE_LIMIT": "10000000/minute",
        "ENSOUL_API_IP_RATE_LIMIT": "10000000/minute",
        "ENSOUL_BOOTSTRAP_RATE_LIMIT": "10000000/minute",
        "ENSOUL_STATEMENT_TIMEOUT_MS": 600_000,
        "ENSOUL_MAX_BODY_BYTES": 64 * 1024 * 1024,
        **extra,
    }


def mosquitto_settings(server: MosquittoServer) -> dict[str, Any]:
    return {"MQTT_URL": server.url, "ENSOUL_MQTT_ACCESS": "mosquitto",
            "ENSOUL_MOSQUITTO_DIR": str(server.workdir),
            "ENSOUL_MOSQUITTO_PID_FILE": str(server.pid_file)}


class Vendor:
    """A tenant with a write API token and one product (with its enrolment key)."""

    def __init__(self, tenant_id: uuid.UUID, token: str, product_id: uuid.UUID,
                 enrolment_key: str) -> None:
        self.tenant_id = tenant_id
        self.token = token
        self.product_id = product_id
        self.enrolment_key = enrolment_key

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def create_vendor(label: str = "bench") -> Vendor:
    """In an app context: a new tenant, token and product; committed."""
    from accounts import services as accounts
    from accounts.models import TokenScope
    from core.db import db
    from fleet import services
    from fleet.models import HardwareKind

    suffix = uuid.uuid4().hex[:8]
    tenant = accounts.create_tenant(f"{label} {suffix}", "CNY", "Asia/Shanghai")
    # No member: a user costs an argon2 hash and the API needs only the token.
    _, token = accounts.create_token(tenant, "bench", TokenScope.WRITE, None)
    product, key = services.create_product(tenant.id, f"Bench glasses {suffix}",
                                           HardwareKind.GLASSES)
    db.session.commit()
    return Vendor(tenant.id, token, product.id, key)


# --- CSV -----------------------------------------------------------------------------------


def device_csv(n: int, prefix: str = "SN", *, tags: bool = True) -> bytes:
    """An import file of ``n`` valid devices with MACs, names, groups and tags."""
    lines = ["serial,mac,name,group,tags"]
    base = int(uuid.uuid4().hex[:6], 16) << 24
    for i in range(n):
        mac = f"{base + i:012x}"
        mac = ":".join(mac[j:j + 2] for j in range(0, 12, 2))
        tag = f"batch-{i % 10};line-{i % 3}" if tags else ""
        lines.append(f"{prefix}{i:07d},{mac},Device {i},group-{i % 20},{tag}")
    return ("\n".join(lines) + "\n").encode()


# --- timing and results --------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 3),
            "p95_ms": round(percentile(ms, 95), 3), "p99_ms": round(percentile(ms, 99), 3),
            "max_ms": round(max(ms), 3) if ms else float("nan")}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_1m_at_write": round(load1, 2),
            "load_avg_5m_at_write": round(load5, 2), "git_commit": commit}


def write_result(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    document = {"benchmark": name,
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": machine(), **payload}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path

