"""The billing hook benchmark runs end to end at a tiny size (performance is never asserted).

``bench.billing_hook`` with a few streams per hook at 1 and 2 concurrent streams, short
throughput loops, 60 usage events through the writer and its baselines, the overdraft with
20 streams, and one full-broker throughput run per hook (2 devices), so the billed tenant's
setup, the hooks' calls, the writer's measurement and the broker phases stay working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from tests.support.processes import PROJECT_ROOT

RUN = f"{os.environ.get('PYTEST_XDIST_WORKER', 'gw0')}_{uuid.uuid4().hex[:6]}"
TINY = ("--repeats", "1", "--devices", "4", "--concurrency", "1,2", "--latency-streams", "8",
        "--pace-ms", "1", "--throughput-concurrency", "2", "--throughput-seconds", "0.2",
        "--writer-events", "60", "--writer-batch", "25", "--overdraft-streams", "20",
        "--broker-repeats", "1", "--broker-devices", "2", "--broker-duration", "2")


def test_billing_hook_benchmark_runs_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.billing_hook", *TINY, "--result-name", "",
         "--database", f"ensoul_bench_test_billing_{RUN}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)

    assert report["setup"]["licence_state"] == "licensed"
    latency = report["latency"]
    for size in ("1", "2", "2_saturated"):
        for hook in ("credit", "limits", "noop"):
            assert latency[f"{hook}_{size}"]["admit"]["samples_per_run"] == [8]
            assert latency[f"{hook}_{size}"]["settle"]["p99_ms"] > 0
        assert latency[f"credit_{size}"]["extend"]["samples_per_run"] == [16]  # 2 per stream
        assert "extend" not in latency[f"limits_{size}"]
    assert [row["size"] for row in report["compare_latency"]] == ["1", "2", "2_saturated"]

    throughput = report["throughput"]
    for variant in ("credit", "credit_250", "limits", "noop"):
        assert throughput[variant]["requests_per_second"] > 0
    assert throughput["ratio_credit_to_limits"] > 0

    writer = report["usage_writer"]
    assert writer["ledger_entries_per_event"] == {  # one package account per event
        "writer": 1.0, "writer_without_ledger": 0.0}
    assert set(writer["variants"]) == {"writer", "writer_without_ledger",
                                       "executemany_floor", "copy_floor"}
    assert all(v["events_per_second"] > 0 for v in writer["variants"].values())

    [overdraft] = report["overdraft"]["runs"]
    assert overdraft["admitted"] >= 1
    assert overdraft["billed_equals_balance_plus_overdraft"]
    assert overdraft["max_overdraft_per_stream_chunks"] <= 1
    assert overdraft["balance_after"] == 0

    broker = report["broker"]
    for hook in ("credit", "limits"):
        [run] = broker[hook]["runs"]
        assert run["admitted_requests_per_second"] > 0
        assert run["errors"] == {} and run["broker_errors"] == 0
    assert set(report["target_met"]) >= {"admit_p99_under_0.5ms_at_1",
                                         "throughput_under_10pct_slower",
                                         "writer_at_least_half_of_executemany"}
