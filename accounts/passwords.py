"""Human passwords: argon2id.

The cost defaults to argon2-cffi's (RFC 9106's low-memory profile: 64 MiB, 3 passes). Tests
lower it with ``ENSOUL_ARGON2_MEMORY_KIB`` / ``ENSOUL_ARGON2_TIME_COST``; hashes made with other
parameters still verify and are upgraded at the next login.
"""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import current_app

from core.errors import ValidationFailed

MIN_LENGTH = 10
MAX_LENGTH = 256


@functools.cache
def _hasher_for(time_cost: int, memory_kib: int) -> tuple[PasswordHasher, str]:
    hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib)
    # Verifying against this keeps an unknown e-mail as slow as a wrong password.
    return hasher, hasher.hash("not-a-real-password")


def _hasher() -> tuple[PasswordHasher, str]:
    config = current_app.config
    return _hasher_for(int(config["ENSOUL_ARGON2_TIME_COST"]),
                       int(config["ENSOUL_ARGON2_MEMORY_KIB"]))


def hash_password(password: str) -> str:
    check_password_strength(password)
    return _hasher()[0].hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    hasher, dummy = _hasher()
    try:
        return hasher.verify(password_hash or dummy, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _hasher()[0].check_needs_rehash(password_hash)


def check_password_strength(password: str, field: str = "password") -> None:
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise ValidationFailed(
            details={field: [f"Use {MIN_LENGTH} to {MAX_LENGTH} characters."]}
        )
