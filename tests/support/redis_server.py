"""A redis-server of a test's own, for tests that kill -9 and restart it."""

from __future__ import annotations

from pathlib import Path

import redis as redis_lib

from tests.support.processes import PROJECT_ROOT, ManagedProcess
from tests.support.waiting import free_port


class RedisServer:
    """A redis-server with the project's config (AOF, fsync every second) on a free port,
    its data in ``workdir``; ``name`` names its log file."""

    def __init__(self, workdir: Path, log_dir: Path, name: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis_lib.Redis.from_url(self.url, socket_timeout=5)
        self.process = ManagedProcess(
            f"{name}-{self.port}",
            ["redis-server", str(PROJECT_ROOT / "config/redis.conf"), "--port", str(self.port),
             "--dir", str(workdir)],
            log_dir=log_dir, ready=self.loaded)

    def loaded(self) -> bool:
        try:
            return int(self.client.info("persistence")["loading"]) == 0
        except redis_lib.RedisError:
            return False

    def aof_holds_every_write(self) -> bool:
        """Every write Redis answered is in the AOF file on disk.

        Redis 7.0 (``redis-server --version`` here) has no WAITAOF (7.2) and does not report
        how far it has fsynced, so this waits for what a kill -9 of the *process* needs: Redis's
        own AOF buffer empty (``aof_buffer_length``; with everysec a write is acknowledged
        before its write(2) while a background fsync is slow) and no fsync queued, with the
        file's size on disk matching ``aof_current_size``. Data written to the kernel survives
        the process; only an OS crash could lose the last second, which fsync everysec bounds.
        """
        info = self.client.info("persistence")
        if info["aof_last_write_status"] != "ok" or info["aof_buffer_length"] \
                or info["aof_pending_bio_fsync"]:
            return False
        on_disk = sum(p.stat().st_size for p in (self.workdir / "appendonlydir").glob("*.incr.*"))
        return on_disk >= int(info["aof_current_size"]) - int(info["aof_base_size"])
