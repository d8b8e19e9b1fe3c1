"""rq queues with the JSON serializer and an explicit connection.

The embedded profile runs jobs synchronously in the caller's process (``is_async=False``).
Jobs take ids, run in an app context and are enqueued after commit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import current_app, has_app_context
from rq import Queue
from rq.serializers import JSONSerializer

from core.redis import get_redis

DEFAULT_QUEUE = "default"
T = TypeVar("T")


def get_queue(name: str = DEFAULT_QUEUE) -> Queue:
    return Queue(
        name,
        connection=get_redis(),
        serializer=JSONSerializer,
        is_async=not current_app.config["EMBEDDED"],
    )


def app_job(func: Callable[..., T]) -> Callable[..., T]:
    """Run a job inside an app context (a worker's own, or a new one) and commit at its end.

    Jobs are the transaction boundary, like requests: services flush, the job commits.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if has_app_context():
            return _run_in_boundary(func, *args, **kwargs)
        from app import create_app  # a worker process without an app context

        with create_app().app_context():
            return _run_in_boundary(func, *args, **kwargs)

    return wrapper


def _run_in_boundary(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    from core.db import db

    try:
        result = func(*args, **kwargs)
        db.session.commit()
        return result
    except BaseException:
        db.session.rollback()
        raise


def enqueue(func: Any, *args: Any, queue: str = DEFAULT_QUEUE, **kwargs: Any) -> Any:
    return get_queue(queue).enqueue(func, *args, **kwargs)
