"""The runnable example device works against the real broker, as a firmware developer runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from inference.service import BrokerThread
from tests.inference.conftest import Fleet
from tests.support.processes import PROJECT_ROOT


@pytest.mark.parametrize("extra", [["--text", "Tell me a joke"], ["--voice-ms", "600"]])
def test_the_example_device_streams_an_answer(platform: Any, fleet: Fleet, broker: BrokerThread,
                                              tmp_path: Path, extra: list[str]) -> None:
    mqtt = tmp_path / "mqtt.json"
    mqtt.write_text(json.dumps(fleet.info(0)))
    result = subprocess.run([sys.executable, "-m", "inference.example_device",
                             "--mqtt-json", str(mqtt), *extra],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"type": "end"' in result.stdout and "first delta after" in result.stdout
    if "--voice-ms" in extra:
        assert "heard: 600 milliseconds of audio" in result.stdout
        assert "Opus frames" in result.stdout
