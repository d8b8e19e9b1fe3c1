"""Configuration for every process.

Values come from code defaults, then the environment (``ENSOUL_*`` plus the conventional
``DATABASE_URL``, ``REDIS_URL``, ``MQTT_URL`` and ``SECRET_KEY``), then an explicit override
(tests). When none of the service URLs is set the platform runs on the *embedded* profile:
SQLite, an in-process MQTT broker and an in-memory Redis.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
INSTANCE_DIR = PROJECT_ROOT / "instance"

EMBEDDED = "embedded"
SERVICES = "services"

# Code defaults. Everything a first run needs; no secret lives here.
DEFAULTS: dict[str, Any] = {
    "ENSOUL_PROFILE": None,  # derived when unset
    "DATABASE_URL": f"sqlite:///{INSTANCE_DIR / 'ensoul.db'}",
    "REDIS_URL": "memory://",
    "MQTT_URL": "embedded://127.0.0.1:1884",
    "SECRET_KEY": None,
    "ENSOUL_ENCRYPTION_KEY": None,
    "ENSOUL_BASE_URL": "http://127.0.0.1:8000",
    "ENSOUL_REDIS_PREFIX": "ensoul",
    "ENSOUL_LOG_JSON": False,
    "ENSOUL_LOG_LEVEL": "INFO",
    "ENSOUL_COOKIE_SECURE": None,  # derived: on in services mode
    "ENSOUL_SMTP_HOST": None,  # None: mail is written to the log (embedded)
    "ENSOUL_SMTP_PORT": 25,
    "ENSOUL_SMTP_USER": None,
    "ENSOUL_SMTP_PASSWORD": None,
    "ENSOUL_SMTP_STARTTLS": False,
    "ENSOUL_MAIL_FROM": "Ensoul <no-reply@ensoul.local>",
    "ENSOUL_API_RATE_LIMIT": "600/minute",
    "ENSOUL_API_IP_RATE_LIMIT": "300/minute",
    "ENSOUL_LOGIN_RATE_LIMIT": "20/minute",
    "ENSOUL_LOGIN_LOCKOUT_ATTEMPTS": 5,
    "ENSOUL_LOGIN_LOCKOUT_MINUTES": 15,
    "ENSOUL_INVITATION_TTL_HOURS": 72,
    "ENSOUL_PASSWORD_RESET_TTL_MINUTES": 60,
    "ENSOUL_MAX_BODY_BYTES": 1024 * 1024,
    "ENSOUL_IDEMPOTENCY_TTL_HOURS": 24,
    "ENSOUL_STATEMENT_TIMEOUT_MS": 30000,
    "ENSOUL_ACTIVATION_CODE_TTL_HOURS": 24,
    "ENSOUL_MQTT_ACCESS": None,  # derived: embedded / mosquitto; or "emqx"
    "ENSOUL_MQTT_PUBLIC_ENDPOINT": None,  # host:port devices connect to; derived from MQTT_URL
    "ENSOUL_MQTT_PUBLIC_TLS": False,
    "ENSOUL_MOSQUITTO_DIR": None,  # where the password and ACL files live; instance/ by default
    "ENSOUL_MOSQUITTO_PID_FILE": None,
    "ENSOUL_MOSQUITTO_RELOAD_COMMAND": None,  # default: SIGHUP to the pid in the pid file
    "ENSOUL_MQTT_HOOK_SECRET": None,  # EMQX sends it in X-Ensoul-Hook-Secret to /mqtt/auth|acl
    "ENSOUL_MQTT_ROTATION_GRACE_MINUTES": 0,  # EMQX adapter only: old secret valid N minutes
    "ENSOUL_PRESENCE_FLUSH_SECONDS": 60,
    "ENSOUL_BOOTSTRAP_RATE_LIMIT": "600/minute",
    "ENSOUL_ARGON2_TIME_COST": 3,
    "ENSOUL_ARGON2_MEMORY_KIB": 65536,
    # inference broker
    "ENSOUL_INFERENCE_PROVIDER": "local",  # the default provider kind for every tenant
    "ENSOUL_INFERENCE_REQUESTS_PER_MINUTE": 60,  # per device; a product may only tighten it
    "ENSOUL_INFERENCE_CONCURRENT_STREAMS": 2,
    "ENSOUL_INFERENCE_DAILY_REQUEST_CAP": 0,  # 0: none
    "ENSOUL_INFERENCE_DEDUP_HOURS": 24,  # request ids are remembered this long per device
    "ENSOUL_INFERENCE_REQUEST_TIMEOUT_SECONDS": 120,
    "ENSOUL_INFERENCE_COALESCE_MS": 20,  # later deltas wait at most this long to be merged
    "ENSOUL_INFERENCE_COALESCE_BYTES": 512,
    "ENSOUL_INFERENCE_CHECKPOINT_MS": 250,
    "ENSOUL_INFERENCE_DEVICE_MESSAGES_PER_SECOND": 20,  # JSON floods beyond this are dropped
    "ENSOUL_INFERENCE_TURN_IDLE_SECONDS": 10.0,  # a voice turn with no audio and no stop ends
    "ENSOUL_INFERENCE_METRICS_PORT": 0,  # Prometheus /metrics of the broker process; 0: off
    # billing: the hook enforcing licences and credits in the stream (inference.service)
    "ENSOUL_BILLING_HOOK": "billing.enforcement:make_hook",
    "ENSOUL_BILLING_CHUNK_OUTPUT_TOKENS": 50,  # reserved ahead per stream: ~1 s of output
    "ENSOUL_BILLING_CHUNK_AUDIO_MS": 1000,
    # billing notifications' webhooks (docs/notifications.md)
    "ENSOUL_WEBHOOK_ALLOW_PRIVATE": False,  # deliver to private/loopback addresses (tests, dev)
    "ENSOUL_WEBHOOK_ALLOWED_HOSTS": "",  # comma-separated host names, addresses or networks
    "ENSOUL_WEBHOOK_TIMEOUT_SECONDS": 10,
    "ENSOUL_LOCAL_TTFT_MS": 150,
    "ENSOUL_LOCAL_TOKENS_PER_SECOND": 30,
    "ENSOUL_LOCAL_ANSWER_TOKENS": 40,
    "ENSOUL_MEMORY_TTL_SECONDS": 86400,
    "ENSOUL_MEMORY_MAX_TURNS": 20,
    "ENSOUL_MEMORY_MAX_TOKENS": 4000,
}

BOOL_KEYS = {"ENSOUL_LOG_JSON", "ENSOUL_COOKIE_SECURE", "ENSOUL_SMTP_STARTTLS",
             "ENSOUL_MQTT_PUBLIC_TLS", "ENSOUL_WEBHOOK_ALLOW_PRIVATE"}
INT_KEYS = {
    "ENSOUL_SMTP_PORT",
    "ENSOUL_LOGIN_LOCKOUT_ATTEMPTS",
    "ENSOUL_LOGIN_LOCKOUT_MINUTES",
    "ENSOUL_INVITATION_TTL_HOURS",
    "ENSOUL_PASSWORD_RESET_TTL_MINUTES",
    "ENSOUL_MAX_BODY_BYTES",
    "ENSOUL_IDEMPOTENCY_TTL_HOURS",
    "ENSOUL_STATEMENT_TIMEOUT_MS",
    "ENSOUL_ACTIVATION_CODE_TTL_HOURS",
    "ENSOUL_PRESENCE_FLUSH_SECONDS",
    "ENSOUL_MQTT_ROTATION_GRACE_MINUTES",
    "ENSOUL_INFERENCE_REQUESTS_PER_MINUTE",
    "ENSOUL_INFERENCE_CONCURRENT_STREAMS",
    "ENSOUL_INFERENCE_DAILY_REQUEST_CAP",
    "ENSOUL_INFERENCE_DEDUP_HOURS",
    "ENSOUL_INFERENCE_REQUEST_TIMEOUT_SECONDS",
    "ENSOUL_INFERENCE_COALESCE_MS",
    "ENSOUL_INFERENCE_COALESCE_BYTES",
    "ENSOUL_INFERENCE_CHECKPOINT_MS",
    "ENSOUL_INFERENCE_DEVICE_MESSAGES_PER_SECOND",
    "ENSOUL_INFERENCE_METRICS_PORT",
    "ENSOUL_LOCAL_ANSWER_TOKENS",
    "ENSOUL_MEMORY_TTL_SECONDS",
    "ENSOUL_MEMORY_MAX_TURNS",
    "ENSOUL_MEMORY_MAX_TOKENS",
    "ENSOUL_WEBHOOK_TIMEOUT_SECONDS",
}
FLOAT_KEYS = {"ENSOUL_INFERENCE_TURN_IDLE_SECONDS", "ENSOUL_LOCAL_TTFT_MS",
              "ENSOUL_LOCAL_TOKENS_PER_SECOND"}
SERVICE_URL_KEYS = ("DATABASE_URL", "REDIS_URL", "MQTT_URL")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


class Settings(dict[str, Any]):
    """A plain mapping of resolved settings with typed accessors for the common ones."""

    @property
    def profile(self) -> str:
        return str(self["ENSOUL_PROFILE"])

    @property
    def embedded(self) -> bool:
        return self.profile == EMBEDDED


def _coerce(key: str, value: Any) -> Any:
    if value is None or not isinstance(value, str):
        return value
    if key in BOOL_KEYS:
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if key in FLOAT_KEYS:
        try:
            return float(value)
        except ValueError as exc:
            raise SettingsError(f"{key} must be a number, got {value!r}") from exc
    if key in INT_KEYS:
        try:
            return int(value)
        except ValueError as exc:
            raise SettingsError(f"{key} must be an integer, got {value!r}") from exc
    return value


def _instance_secret(name: str) -> str:
    """A random secret kept in ``instance/`` so an embedded run survives restarts."""
    INSTANCE_DIR.mkdir(exist_ok=True)
    path = INSTANCE_DIR / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def load_settings(
    override: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = dict(DEFAULTS)
    for key in DEFAULTS:
        if key in env and env[key] != "":
            values[key] = env[key]
    explicitly_set = {k for k in SERVICE_URL_KEYS if env.get(k)}
    if override:
        values.update(override)
        explicitly_set |= {k for k in SERVICE_URL_KEYS if k in override}
    values = {key: _coerce(key, value) for key, value in values.items()}

    if not values["ENSOUL_PROFILE"]:
        values["ENSOUL_PROFILE"] = SERVICES if explicitly_set else EMBEDDED
    if values["ENSOUL_PROFILE"] not in (EMBEDDED, SERVICES):
        raise SettingsError("ENSOUL_PROFILE must be 'embedded' or 'services'")
    embedded = values["ENSOUL_PROFILE"] == EMBEDDED
    if not values["ENSOUL_MQTT_ACCESS"]:
        values["ENSOUL_MQTT_ACCESS"] = "embedded" if embedded else "mosquitto"
    if values["ENSOUL_MQTT_ACCESS"] not in ("embedded", "mosquitto", "emqx"):
        raise SettingsError("ENSOUL_MQTT_ACCESS must be 'embedded', 'mosquitto' or 'emqx'")
    if values["ENSOUL_COOKIE_SECURE"] is None:
        values["ENSOUL_COOKIE_SECURE"] = not embedded
    if not values["SECRET_KEY"]:
        if not embedded:
            raise SettingsError("SECRET_KEY must be set in the services profile")
        values["SECRET_KEY"] = _instance_secret("secret_key")
    if not values["ENSOUL_ENCRYPTION_KEY"]:
        if not embedded:
            raise SettingsError("ENSOUL_ENCRYPTION_KEY must be set in the services profile")
        values["ENSOUL_ENCRYPTION_KEY"] = _instance_secret("encryption_key")
    return Settings(values)
