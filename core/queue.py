"""rq queues with the JSON serializer and an explicit connection.

The embedded profile runs jobs synchronously in the caller's process (``is_async=False``).
Jobs take ids, run in an app context and are enqueued after commit.
"""

from __future__ import annotations

from typing import Any

from flask import current_app
from rq import Queue
from rq.serializers import JSONSerializer

from core.redis import get_redis

DEFAULT_QUEUE = "default"


def get_queue(name: str = DEFAULT_QUEUE) -> Queue:
    return Queue(
        name,
        connection=get_redis(),
        serializer=JSONSerializer,
        is_async=not current_app.config["EMBEDDED"],
    )


def enqueue(func: Any, *args: Any, queue: str = DEFAULT_QUEUE, **kwargs: Any) -> Any:
    return get_queue(queue).enqueue(func, *args, **kwargs)
