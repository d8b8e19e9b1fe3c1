"""Device MQTT secrets, stored only as Mosquitto-format PBKDF2-SHA512 hashes.

``$7$<iterations>$<base64 salt (12 bytes)>$<base64 hash (64 bytes)>`` is exactly what
``mosquitto_passwd`` writes, so one stored hash serves the Mosquitto password file, the
EMQX-format HTTP auth endpoint and the embedded broker; the files can be rebuilt at any time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ITERATIONS = 101  # Mosquitto 2.0's default for $7$
SALT_BYTES = 12
HASH_BYTES = 64


def new_password() -> str:
    """A random device password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = ITERATIONS) -> str:
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def verify_password(stored: str | None, password: str) -> bool:
    if not stored:
        return False
    try:
        _, kind, iterations, salt_b64, hash_b64 = stored.split("$")
        if kind != "7":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(hash_b64)
        rounds = int(iterations)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, rounds, len(expected))
    return hmac.compare_digest(digest, expected)


def hardware_hmac(hardware_key: str, challenge: str) -> str:
    """HMAC-SHA256(hardware key, challenge) as lowercase hex, as xiaozhi-esp32 computes it."""
    key = bytes.fromhex(hardware_key) if _is_hex(hardware_key) else hardware_key.encode()
    return hmac.new(key, challenge.encode(), hashlib.sha256).hexdigest()


def _is_hex(value: str) -> bool:
    try:
        bytes.fromhex(value)
        return len(value) % 2 == 0 and len(value) >= 32
    except ValueError:
        return False
