"""Ids are time-ordered (uuid7), so ordering by id is creation order, which keyset pagination
and every "newest first" list rely on."""

from __future__ import annotations

import threading
import time
import uuid

from core.ids import uuid7


def test_ids_follow_creation_order_within_a_millisecond() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_from_several_threads_are_unique_and_ordered_per_thread() -> None:
    made: dict[int, list[uuid.UUID]] = {}

    def make(n: int) -> None:
        made[n] = [uuid7() for _ in range(2000)]

    threads = [threading.Thread(target=make, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in made.values() for i in ids]
    assert len(set(every)) == len(every)
    assert all(ids == sorted(ids) for ids in made.values())


def test_id_is_a_version_7_uuid_carrying_the_time() -> None:
    before = time.time_ns() // 1_000_000
    made = uuid7()
    after = time.time_ns() // 1_000_000
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert before <= made.int >> 80 <= after + 1
