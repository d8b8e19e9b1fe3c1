"""The inference benchmark runs end to end at a tiny size (performance is never asserted).

``bench.inference_latency`` with 2 streams of 5 deltas against one broker process and the bare
streamer, then the throughput phases with 2 processes of each (shared subscriptions), so the
broker processes, the floor, the simulator behaviours, the probes and the summaries stay
working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from bench.inference_latency import top_functions
from tests.support.processes import PROJECT_ROOT

RUN = f"{os.environ.get('PYTEST_XDIST_WORKER', 'gw0')}_{uuid.uuid4().hex[:6]}"
TINY = ("--streams", "2", "--ramp", "", "--deltas", "5", "--duration", "2", "--warmup", "1",
        "--drain", "2", "--throughput-devices", "2", "--throughput-duration", "2",
        "--throughput-procs", "2", "--throughput-variants", "per_delta,bare", "--burst", "0")


def test_inference_benchmark_runs_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.inference_latency", *TINY, "--result-name", "",
         "--database", f"ensoul_bench_test_inference_{RUN}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)

    assert report["setup"]["profiles_projected"] == 3  # 2 + the probe device
    for system in ("platform", "bare"):
        phase = report["latency"][f"{system}_2"]
        assert phase["requests"] >= 2, phase
        assert phase["complete"] == phase["requests"], phase
        assert phase["errors"] == {}, phase
        assert phase["first_delta_ms"]["p50"] > 0
        assert phase["gap_ms"]["n"] >= 4 * phase["requests"]
        assert phase["deltas_per_stream"] == 5.0
    assert report["latency"]["platform_2"]["broker_first_delta_ms"]["n"] >= 2
    assert report["latency"]["bare_2"]["broker_first_delta_ms"] is None

    row = report["compare"][0]
    assert row["streams"] == 2
    assert row["first_delta_ms_p50"]["ratio"] > 0
    assert set(report["target_met"]) >= {"first_delta_p50_within_1.5x_at_2",
                                         "sustained_streams_at_least_80pct_of_floor"}

    platform, bare = report["throughput"]["per_delta_2"], report["throughput"]["bare_2"]
    assert len(platform["start"]["routes"]) == 2  # both processes of the shared subscription
    assert len(bare["start"]["routes"]) == 2
    assert len(platform["per_process"]) == 2
    assert sum(p["delta_messages_per_second"] for p in platform["per_process"]) > 0
    assert platform["errors"] == {} and bare["errors"] == {}
    assert bare["delta_messages_received_per_second"] > 0


def test_top_functions_reads_py_spys_folded_stacks() -> None:
    folded = ("thread (1): inference-broker;run (asyncio/runners.py:190);"
              "flush (/x/inference/streams.py:400);dumps (json/__init__.py:231) 3\n"
              "thread (1): inference-broker;run (asyncio/runners.py:190);"
              "flush (/x/inference/streams.py:401) 1\n")
    top = top_functions(folded)
    assert top["samples"] == 4
    assert top["self_percent"][0] == ["dumps (json/__init__.py)", 75.0]
    assert ["flush (/x/inference/streams.py)", 100.0] in top["inclusive_percent"]
    assert top["threads_percent"] == [["thread (1): inference-broker", 100.0]]
