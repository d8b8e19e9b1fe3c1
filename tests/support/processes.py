"""Start, kill -9 and restart processes of the platform (or of services) from tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.support.waiting import wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ManagedProcess:
    """A child process with a readiness check; its output goes to a log file for diagnosis."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 ready: Callable[[], bool] | None = None, log_dir: Path,
                 cwd: Path = PROJECT_ROOT) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.ready = ready
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ManagedProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if self.ready is not None:
            def _ready() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                       + self.output()[-3000:])
                return bool(self.ready and self.ready())

            wait_until(_ready, timeout, what=f"{self.name} to be ready")
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill9(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def restart(self, timeout: float = 20.0) -> ManagedProcess:
        self.stop()
        return self.start(timeout)


def flask_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flask", "--app", "app", *args]
