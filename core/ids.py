"""Time-ordered UUIDs (RFC 9562 version 7) so keyset pagination follows creation order.

Within one millisecond a 12-bit counter (RFC 9562, method 3) keeps ids of one process in
creation order; its start is random so processes do not collide.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_millis = 0
_counter = 0


def uuid7() -> uuid.UUID:
    global _last_millis, _counter
    with _lock:
        millis = time.time_ns() // 1_000_000
        if millis > _last_millis:
            _last_millis = millis
            _counter = int.from_bytes(os.urandom(2), "big") & 0x7FF  # room to count up
        else:
            _counter += 1
            if _counter > 0xFFF:  # more than ~2000 ids in one millisecond: borrow the next
                _last_millis += 1
                _counter = 0
            millis = _last_millis
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= counter << 64  # rand_a used as the counter
    value |= 0b10 << 62  # variant
    value |= rand_b
    return uuid.UUID(int=value)
