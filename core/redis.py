"""Redis connection from ``REDIS_URL``; ``memory://`` is the embedded in-process Redis.

Pub/sub channels and stream names ignore the db index, so every name the platform uses goes
through :func:`name` which prefixes it with ``ENSOUL_REDIS_PREFIX``. Keys also carry a per-tenant
hash tag (``{t:<tenant>}``) where a domain needs Redis Cluster to keep them together.
"""

from __future__ import annotations

from typing import Any

import redis
from flask import Flask, current_app

_memory_servers: dict[str, Any] = {}


def connect(url: str, **options: Any) -> redis.Redis:
    if url.startswith("memory://"):
        import fakeredis  # embedded profile only

        server = _memory_servers.setdefault(url, fakeredis.FakeServer())
        return fakeredis.FakeRedis(server=server, **options)
    options.setdefault("socket_connect_timeout", 2)
    options.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(url, **options)


def connect_async(url: str, **options: Any) -> Any:
    """An asyncio client (``redis.asyncio.Redis``) for the broker's event loop."""
    if url.startswith("memory://"):
        import fakeredis

        server = _memory_servers.setdefault(url, fakeredis.FakeServer())
        return fakeredis.FakeAsyncRedis(server=server, **options)
    import redis.asyncio

    options.setdefault("socket_connect_timeout", 2)
    options.setdefault("health_check_interval", 30)
    # A burst waits for a free connection instead of failing (redis-py's default pool raises
    # once its connections are all in use).
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=options.pop("max_connections", 200),
        timeout=options.pop("pool_timeout", 5), **options)
    return redis.asyncio.Redis.from_pool(pool)  # owns the pool: aclose() closes it


class RedisExtension:
    def __init__(self) -> None:
        self.client: redis.Redis | None = None
        self.prefix = "ensoul"

    def init_app(self, app: Flask) -> None:
        self.client = connect(app.config["REDIS_URL"])
        self.prefix = app.config["ENSOUL_REDIS_PREFIX"]
        app.extensions["ensoul_redis"] = self


redis_ext = RedisExtension()


def get_redis() -> redis.Redis:
    ext: RedisExtension = current_app.extensions["ensoul_redis"]
    assert ext.client is not None
    return ext.client


def name(*parts: str) -> str:
    """A prefixed key, channel or stream name."""
    ext: RedisExtension = current_app.extensions["ensoul_redis"]
    return ":".join((ext.prefix, *parts))
