"""Inference latency and throughput: the broker against a bare streamer, side by side.

    .venv/bin/python -m bench.inference_latency                      # the full run (~12 min)
    .venv/bin/python -m bench.inference_latency --streams 2 --ramp '' --duration 2 ...

Everything runs on this machine against the services profile: a Postgres database of its own
(``ensoul_bench_inference``), the benchmarks' Redis db (14, ``ENSOUL_BENCH_REDIS``) under a
per-run key prefix (test suites FLUSHDB the dbs their offset picks: a profile missing at a
phase's start is projected again and counted), a Mosquitto started from
the project's template (``set_tcp_nodelay true``). One tenant, one product and N active devices
with credentials are imported; the platform writes Mosquitto's password and ACL files.

Systems under test, never running at the same time (both answer ``t/+/d/+/up``):

- *platform*: ``flask --app app broker`` processes (the Procfile's broker: inference broker and
  presence tracker), the ``local`` provider with ``ENSOUL_LOCAL_TTFT_MS=0``, 30 tokens/s and
  50 tokens per answer (one delta per token: at 30/s no two deltas are within the 20 ms
  coalescing window); per-device limits raised so they never refuse.
- *floor*: ``python -m bench.bare_streamer`` (start, 50 deltas at 30/s, the first at once, end;
  no admission, metering or Redis), one process, or two on a shared subscription.

Load: the fleet simulator (``bench/simulator``) in ``--workers`` processes; the behaviours in
``bench/inference_load.py`` run next to each device's socket and timestamp in paho's callback.

1. Latency, open loop on a fixed schedule: S devices, device i sends a request at
   ``t0 + (i/S + k) * period`` (period 1.75 s; a stream lasts 49/30 = 1.63 s, so ~0.93 S streams
   are open at any time and S/1.75 start per second), whether or not its previous answer ended.
   Measured at the device over the window after the warm-up: first-delta latency (request
   published -> first delta received), the gaps between deltas, delivered deltas/s against
   offered, and the broker's own request-received -> first-delta-published time from
   ``end.timing.first_delta_ms``. S = ``--streams`` (the platform/floor ratios) and ``--ramp``
   (the largest S each side *sustains*: >= 99 % of the window's requests ended with every
   token, >= 95 % of the offered tokens/s delivered, and no stall: first-delta p99 and
   delta-gap p99 both <= ``--max-stall-p99-ms``, 100 ms = 3 delta intervals).
2. Throughput, closed loop, provider at zero latency (``ENSOUL_LOCAL_TOKENS_PER_SECOND=0``: all
   50 deltas at once): ``--throughput-devices`` devices each keep ``--outstanding`` requests
   open. Variants: ``coalesced`` (the shipped 20 ms coalescing: 50 tokens leave as ~2 delta
   messages), ``per_delta`` (``ENSOUL_INFERENCE_COALESCE_MS=0``: one message per token, the
   per-message cost) and the floor (bare, 50 messages at once); with 1 and 2 broker processes.
   Admitted requests/s and forwarded deltas/s per process come from each broker's Prometheus
   counters, the device side counts what arrived.

Before the phases, the broker's ``LimitsHook.admit`` is timed alone in this process (hot, and
after 50 ms of idleness as at 1 stream) next to a no-op EVALSHA and a GET: the Redis round trip
every admission pays. CPU seconds of every process over each window (broker, bare, Mosquitto,
Redis, the load generator's workers) are recorded, so a saturated generator or machine shows.
``--profile`` adds three phases with py-spy sampling the broker (latency at the largest
``--streams``, ``coalesced`` and ``per_delta`` throughput) and records the top functions.
Results: ``bench/results/inference_latency.json`` and ``.png`` (first-delta and gap CDFs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    PROJECT_ROOT,
    REDIS_URL,
    RESULTS_DIR,
    MosquittoServer,
    bench_settings,
    clear_redis_prefix,
    create_vendor,
    drop_database,
    free_port,
    fresh_database,
    mosquitto_settings,
    new_redis_prefix,
    percentile,
    raise_nofile_limit,
    write_result,
)
from bench.inference_load import PLAN_ENV
from bench.simulator import DeviceIdentity, SimulatedFleet

VENV_BIN = Path(sys.executable).parent
LIMITS = {  # per device, projected into the profiles: never the thing measured
    "ENSOUL_INFERENCE_REQUESTS_PER_MINUTE": 1_000_000,
    "ENSOUL_INFERENCE_CONCURRENT_STREAMS": 1_000,
}
TARGETS = {
    "first_delta_p50_ratio": 1.5, "first_delta_p99_ratio": 2.0, "sustained_fraction": 0.8,
    "broker_first_delta_p99_ms_at_1": 1.0, "admitted_per_second_per_process": 1_000,
    "forwarded_deltas_per_second_per_process": 10_000,
}


# --- measuring processes -----------------------------------------------------------------------


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def pids_named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


class CpuSample:
    """CPU seconds of named processes and of the machine between two instants."""

    def __init__(self, processes: dict[str, list[int]]) -> None:
        self.processes = processes
        self.start = self._read()
        self.started = time.monotonic()

    def _read(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) or 0.0 for p in pids)
               for name, pids in self.processes.items()}
        out["_machine_busy"], out["_machine_total"] = machine_busy()
        return out

    def stop(self) -> dict[str, Any]:
        end, wall = self._read(), time.monotonic() - self.started
        busy = end["_machine_busy"] - self.start["_machine_busy"]
        total = end["_machine_total"] - self.start["_machine_total"]
        result: dict[str, Any] = {
            name: round((end[name] - self.start[name]) / wall, 3) for name in self.processes}
        result["machine_busy_cores"] = round(busy / total * (os.cpu_count() or 1), 2) \
            if total else None
        result["load_avg_1m"] = round(os.getloadavg()[0], 2)
        return result


HISTOGRAMS = ("ensoul_inference_admission_seconds", "ensoul_inference_platform_added_seconds")


def scrape(port: int) -> dict[str, float]:
    """The broker's own counters and two histograms (Prometheus text format)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric = series.split("{", 1)[0]
        if metric in ("ensoul_inference_deltas_total", "ensoul_inference_requests_total",
                      "ensoul_inference_errors_total", "ensoul_inference_dropped_total"):
            out[metric] += float(value)
        elif metric.removesuffix("_sum") in HISTOGRAMS or metric.removesuffix(
                "_count") in HISTOGRAMS:
            out[metric] += float(value)
        elif metric.removesuffix("_bucket") in HISTOGRAMS:
            le = series.split('le="', 1)[1].split('"', 1)[0]
            out[f"{metric}:{le}"] += float(value)
    return dict(out)


def histogram(counters: dict[str, float], name: str) -> dict[str, Any] | None:
    """Mean and the share of observations at or under 0.5, 1 and 2.5 ms, from the buckets."""
    count = counters.get(f"{name}_count", 0.0)
    if not count:
        return None
    shares = {f"under_{le}_ms": round(counters.get(f"{name}_bucket:{float(le) / 1000}", 0.0)
                                      / count, 4) for le in ("0.5", "1.0", "2.5")}
    return {"n": int(count), "mean_ms": round(counters[f"{name}_sum"] / count * 1000, 3),
            **shares}


# --- the systems under test ------------------------------------------------------------------


class Service:
    """Broker or bare-streamer processes; started, probed until every one answers, stopped."""

    def __init__(self, kind: str, argvs: list[list[str]], envs: list[dict[str, str]],
                 ready_marker: str, logdir: Path, metrics_ports: list[int] | None = None
                 ) -> None:
        self.kind = kind
        self.argvs = argvs
        self.envs = envs
        self.ready_marker = ready_marker
        self.logdir = logdir
        self.metrics_ports = metrics_ports or []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, probe: DeviceIdentity, timeout: float = 60.0) -> dict[str, Any]:
        started = time.monotonic()
        for index, (argv, env) in enumerate(zip(self.argvs, self.envs, strict=True)):
            log = self.logdir / f"{self.kind}-{index}-{uuid.uuid4().hex[:6]}.log"
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(argv, env=env, cwd=PROJECT_ROOT, stdout=out,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))
            self.logs.append(log)
        deadline = started + timeout
        for proc, log in zip(self.procs, self.logs, strict=True):
            while self.ready_marker not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.kind} did not start (exit {proc.poll()}):\n"
                                       + log.read_text(errors="replace")[-3000:])
                time.sleep(0.05)
        routes = asyncio.run(probe_routes(probe, len(self.procs), deadline))
        return {"start_seconds": round(time.monotonic() - started, 2), "routes": routes}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()

    def problems(self, limit: int = 3000) -> str:
        """Tracebacks and errors the processes logged (empty when none)."""
        lines = [line for log in self.logs
                 for line in log.read_text(errors="replace").splitlines()
                 if "Traceback" in line or "Error" in line or "ERROR" in line
                 or "WARNING" in line or "failed" in line]
        return "\n".join(lines)[:limit]


async def probe_routes(identity: DeviceIdentity, expected: int, deadline: float) -> list[str]:
    """Ask through a spare device until ``expected`` distinct processes have answered."""
    from core.mqtt import MqttTarget
    from inference.client import DeviceClient

    target = MqttTarget(host=identity.host, port=identity.port, username=identity.username,
                        password=identity.password, tls=False, embedded=False)
    client = DeviceClient(target, f"{identity.client_id}-probe", identity.topic_prefix)
    await client.connect()
    routes: set[str] = set()
    last: Any = None
    try:
        while len(routes) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {sorted(routes)} answered (last: {last})")
            try:
                reply = await client.ask("probe", max_output_tokens=1, timeout=2.0)
            except TimeoutError:
                continue
            last = reply.terminal
            if reply.start is not None and reply.terminal and reply.terminal["type"] == "end":
                routes.add(str(reply.start["route"]))
            else:
                await asyncio.sleep(0.1)
    finally:
        await client.close()
    return sorted(routes)


# --- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="ensoul-bench-inference-"))
        self.prefix = new_redis_prefix("inference")
        self.server: MosquittoServer | None = None
        self.database_url = ""
        self.identities: list[DeviceIdentity] = []
        self.probe: DeviceIdentity | None = None
        self.redis_pids = pids_named("redis-server")
        self.profiles: dict[str, Any] = {}
        self.app: Any = None
        self.tenant_id: uuid.UUID | None = None
        self.reprojected = 0

    # --- setup -------------------------------------------------------------------------

    def setup(self) -> dict[str, Any]:
        from app import create_app
        from bench.simulator.probe import wait_until_accepted
        from bench.simulator.provision import import_identities
        from core.db import db
        from fleet.broker_access.mosquitto import MosquittoFiles
        from inference.directory import project_devices

        args = self.args
        self.server = MosquittoServer().start()
        self.database_url = fresh_database(args.database)
        app = create_app(bench_settings(self.database_url, self.prefix, REDIS_URL=REDIS_URL,
                                        **mosquitto_settings(self.server), **LIMITS))
        needed = max([*args.streams, *args.ramp, args.throughput_devices,
                      args.burst // 2]) + 1
        started = time.perf_counter()
        self.app = app
        with app.app_context():
            vendor = create_vendor("inference")
            self.tenant_id = vendor.tenant_id
            identities = import_identities(vendor, needed, prefix="INF")
            projected = project_devices(vendor.tenant_id)
            sync = MosquittoFiles.from_config(app.config).sync()
            db.session.remove()
        wait_until_accepted(identities[0])
        self.probe, self.identities = identities[0], identities[1:]
        return {"devices": needed, "profiles_projected": projected,
                "mosquitto_sync": {k: sync.get(k) for k in ("devices", "reloaded")},
                "seconds": round(time.perf_counter() - started, 2)}

    def ensure_profiles(self) -> None:
        """Project the device profiles again if someone flushed the Redis db under us."""
        import redis

        from inference.directory import project_devices

        client = redis.Redis.from_url(REDIS_URL)
        try:
            found = sum(1 for _ in client.scan_iter(match=f"{self.prefix}:*:profile:*",
                                                    count=1000))
        finally:
            client.close()
        if found < len(self.identities) + 1:
            with self.app.app_context():
                project_devices(self.tenant_id)
            self.reprojected += 1
            log(f"device profiles were missing from Redis ({found}); projected again")

    def cleanup(self) -> None:
        if self.server is not None:
            self.server.stop()
        clear_redis_prefix(self.prefix, REDIS_URL)
        if not self.args.keep_db:
            drop_database(self.args.database)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- services ------------------------------------------------------------------------

    def platform(self, procs: int, *, rate: float, coalesce_ms: int) -> Service:
        assert self.server is not None
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("ENSOUL_") and k not in ("DATABASE_URL", "REDIS_URL",
                                                              "MQTT_URL", "SECRET_KEY")}
        settings = {
            "DATABASE_URL": self.database_url, "REDIS_URL": REDIS_URL,
            "SECRET_KEY": "bench-secret-key", "ENSOUL_ENCRYPTION_KEY": "bench-encryption-key",
            "ENSOUL_REDIS_PREFIX": self.prefix, "ENSOUL_LOCAL_TTFT_MS": 0,
            "ENSOUL_LOCAL_TOKENS_PER_SECOND": rate,
            "ENSOUL_LOCAL_ANSWER_TOKENS": self.args.deltas,
            # The broker alone: billing's hook is measured by bench.billing_hook.
            "ENSOUL_BILLING_HOOK": "inference.hook:limits_only",
            "ENSOUL_INFERENCE_COALESCE_MS": coalesce_ms,
            "ENSOUL_INFERENCE_DEVICE_MESSAGES_PER_SECOND": 1_000_000,
            **LIMITS, **mosquitto_settings(self.server),
        }
        ports = [free_port() for _ in range(procs)]
        envs = [{**base, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                 **{k: str(v) for k, v in settings.items()},
                 "ENSOUL_INFERENCE_METRICS_PORT": str(port)} for port in ports]
        argv = [str(VENV_BIN / "flask"), "--app", "app", "broker"]
        return Service("platform", [argv] * procs, envs, "broker started", self.workdir, ports)

    def bare(self, procs: int, *, rate: float) -> Service:
        assert self.server is not None
        argv = [sys.executable, "-m", "bench.bare_streamer", "--url", self.server.url,
                "--deltas", str(self.args.deltas), "--rate", str(rate)]
        if procs > 1:
            argv.append("--shared")
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        return Service("bare", [argv] * procs, [env] * procs, "bare streamer ready",
                       self.workdir)

    # --- one phase ------------------------------------------------------------------------

    def phase(self, service: Service, mode: str, devices: int, *, duration: float,
              tokens: int, outstanding: int = 1, profile: str | None = None) -> dict[str, Any]:
        args = self.args
        assert self.server is not None and self.probe is not None
        identities = self.identities[:devices]
        plan_path = self.workdir / f"plan-{uuid.uuid4().hex[:6]}.json"
        plan: dict[str, Any] = {
            "mode": mode, "warmup": args.warmup, "duration": duration, "drain": args.drain,
            "period": args.period, "max_output_tokens": tokens, "outstanding": outstanding,
            "offsets": {d.device_id: i / devices for i, d in enumerate(identities)},
        }
        plan_path.write_text(json.dumps(plan))
        os.environ[PLAN_ENV] = str(plan_path)
        self.ensure_profiles()
        info = service.start(self.probe)
        fleet = SimulatedFleet(identities, workers=args.workers,
                               behaviour=f"bench.inference_load:{mode}")
        spy: subprocess.Popen[bytes] | None = None
        try:
            connect = fleet.start(timeout=120)
        except BaseException:
            service.stop()
            raise
        try:
            if connect.connected != devices:
                raise RuntimeError(f"only {connect.connected} of {devices} devices connected: "
                                   f"{connect.failures}")
            start_at = time.time() + 0.3
            tmp = plan_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({**plan, "start_at": start_at}))
            tmp.replace(plan_path)
            window_start = start_at + args.warmup
            time.sleep(max(0.0, window_start - time.time()))
            processes = {"broker" if service.kind == "platform" else "bare": service.pids,
                         "mosquitto": [self.server.process.pid] if self.server.process else [],
                         "redis": self.redis_pids}
            sample = CpuSample(processes)
            counters = [scrape(p) for p in service.metrics_ports]
            if profile:
                spy = self._spy(service.pids[0], duration, profile)
            time.sleep(max(0.0, window_start + duration - time.time()))
            cpu = sample.stop()
            counters = [{k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                        for before, after in zip(counters, [scrape(p) for p in
                                                            service.metrics_ports],
                                                 strict=True)]
            deadline = window_start + duration + args.drain + 2.0
            while time.time() < deadline:
                stats = fleet.stats()
                if len(stats.behaviour_results) + len(stats.behaviour_errors) >= devices:
                    break
                time.sleep(0.5)
        finally:
            final = fleet.stop()
            if spy is not None:
                self._collect_spy(spy, profile or "")
            service.stop()
        if final.behaviour_errors:
            raise RuntimeError(f"behaviours failed: {final.behaviour_errors[:3]}")
        problems = service.problems()
        results = final.behaviour_results
        workers = {r["cpu"]["pid"]: r["cpu"]["cpu_seconds"] for r in results}
        cpu["load_generator_workers"] = [round(s / duration, 3) for s in workers.values()]
        common = {"system": service.kind, "processes": len(service.argvs),
                  "devices": devices, "duration_s": duration,
                  "behaviours_returned": len(results), "start": info,
                  "connect": {"connected": connect.connected,
                              "connack_p50_ms": connect.connack.get("p50_ms")},
                  "cpu_cores": cpu}
        if problems:
            common["service_log_problems"] = problems
        if counters:
            common["broker_histograms"] = [
                {"admission": histogram(c, HISTOGRAMS[0]),
                 "received_to_provider_start": histogram(c, HISTOGRAMS[1])} for c in counters]
        body = (self._latency(results, devices, duration, tokens) if mode == "latency"
                else self._throughput(results, duration, tokens, counters))
        messages = body.get("delivered_deltas_per_second") or body.get(
            "delta_messages_received_per_second")
        own = cpu.get("broker", cpu.get("bare"))
        if messages and own is not None:
            common["cpu_us_per_delta_message"] = round(own * 1e6 / messages, 1)
        return {**common, **body}

    def _latency(self, results: list[dict[str, Any]], devices: int, duration: float,
                 tokens: int) -> dict[str, Any]:
        requests = [r for res in results for r in res["requests"]]
        first = [r["first_delta_ms"] for r in requests if r["first_delta_ms"] is not None]
        gaps = [g for r in requests for g in r["gaps_ms"]]
        internal = [r["broker_first_delta_ms"] for r in requests
                    if r["broker_first_delta_ms"] is not None]
        complete = sum(1 for r in requests if r["end_ms"] is not None and r["error"] is None
                       and r["tokens"] == tokens)
        delivered = sum(r["deltas_in_window"] for r in results) / duration
        delivered_tokens = sum(r["tokens_in_window"] for r in results) / duration
        offered = devices * tokens / self.args.period
        gap_summary = summary(gaps)
        sustained = {
            "complete_fraction": round(complete / len(requests), 4) if requests else 0.0,
            "delivered_fraction": round(delivered_tokens / offered, 4),
            "gap_p99_ms": gap_summary["p99"],
        }
        first_summary = summary(first)
        sustained["first_delta_p99_ms"] = first_summary["p99"]
        stall = self.args.max_stall_p99_ms
        sustained["sustained"] = bool(
            sustained["complete_fraction"] >= 0.99 and sustained["delivered_fraction"] >= 0.95
            and gap_summary["p99"] is not None and gap_summary["p99"] <= stall
            and first_summary["p99"] is not None and first_summary["p99"] <= stall)
        return {
            "requests": len(requests), "complete": complete,
            "errors": dict(Counter(r["error"] for r in requests if r["error"])),
            "open_at_end": sum(r["open_at_end"] for r in results),
            "first_delta_ms": first_summary, "gap_ms": gap_summary,
            "start_ms": summary([r["start_ms"] for r in requests if r["start_ms"] is not None]),
            "stream_ms": summary([r["end_ms"] for r in requests if r["end_ms"] is not None]),
            "broker_first_delta_ms": summary(internal) if internal else None,
            "offered_streams_per_second": round(devices / self.args.period, 2),
            "ended_streams_per_second": round(sum(r["ends_in_window"] for r in results)
                                              / duration, 2),
            "offered_deltas_per_second": round(offered, 1),
            "delivered_deltas_per_second": round(delivered, 1),
            "delivered_tokens_per_second": round(delivered_tokens, 1),
            "deltas_per_stream": round(sum(r["deltas"] for r in requests) / len(requests), 2)
            if requests else None,
            **sustained,
            "_first_delta_samples": first, "_gap_samples": gaps,
        }

    def _throughput(self, results: list[dict[str, Any]], duration: float, tokens: int,
                    counters: list[dict[str, float]]) -> dict[str, Any]:
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r["errors"])
        out: dict[str, Any] = {
            "answer_tokens": tokens,
            "ended_requests_per_second": round(sum(r["ends_in_window"] for r in results)
                                               / duration, 1),
            "delta_messages_received_per_second": round(
                sum(r["deltas_in_window"] for r in results) / duration, 1),
            "errors": dict(errors),
            "open_at_end": sum(r["open_at_end"] for r in results),
            "request_ms": summary([d for r in results for d in r["request_ms"]]),
        }
        if counters:
            out["per_process"] = [{
                "admitted_requests_per_second": round(
                    c.get("ensoul_inference_requests_total", 0.0) / duration, 1),
                "delta_messages_per_second": round(
                    c.get("ensoul_inference_deltas_total", 0.0) / duration, 1),
                "admission_mean_ms": round(
                    c["ensoul_inference_admission_seconds_sum"]
                    / c["ensoul_inference_admission_seconds_count"] * 1000, 3)
                if c.get("ensoul_inference_admission_seconds_count") else None,
                "errors": c.get("ensoul_inference_errors_total", 0.0),
                "dropped": c.get("ensoul_inference_dropped_total", 0.0),
            } for c in counters]
        return out

    # --- py-spy ----------------------------------------------------------------------------

    def _spy(self, pid: int, duration: float, name: str) -> subprocess.Popen[bytes] | None:
        spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
        if spy is None:
            self.profiles[name] = {"error": "py-spy is not installed (.venv/bin/pip install "
                                            "py-spy)"}
            return None
        out = self.workdir / f"{name}.folded"
        return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration",
                                 str(max(1, int(duration))), "--rate", "200", "--nonblocking",
                                 "--threads", "--format", "raw", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _collect_spy(self, spy: subprocess.Popen[bytes], name: str) -> None:
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        path = self.workdir / f"{name}.folded"
        if not path.exists():
            self.profiles[name] = {"error": err.decode(errors="replace")[-500:]}
            return
        self.profiles[name] = top_functions(path.read_text())
        if self.args.keep_profiles:
            keep = RESULTS_DIR / f"inference_profile_{name}.folded"
            shutil.copy(path, keep)
            self.profiles[name]["folded"] = str(keep.relative_to(PROJECT_ROOT))

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        payload: dict[str, Any] = {"setup": self.setup()}
        if args.admission_samples:
            payload["admission_floor_ms"] = asyncio.run(admission_floor(
                self.prefix, args.admission_samples, gapped=args.admission_samples // 20))
            log(f"admission alone: {payload['admission_floor_ms']}")
        latency: dict[str, dict[str, Any]] = {}
        sizes = list(dict.fromkeys([*args.streams, *args.ramp]))
        for index, streams in enumerate(sizes):
            duration = args.duration_1 if streams == 1 else args.duration
            order = ("bare", "platform") if index % 2 == 0 else ("platform", "bare")
            for system in order:
                if streams not in args.streams and system not in args.ramp_systems:
                    continue
                service = (self.platform(1, rate=args.rate, coalesce_ms=20)
                           if system == "platform" else self.bare(1, rate=args.rate))
                result = self.phase(service, "latency", streams, duration=duration,
                                    tokens=args.deltas)
                latency[f"{system}_{streams}"] = result
                log(f"latency {system} S={streams}: first delta p50/p99 "
                    f"{result['first_delta_ms']['p50']}/{result['first_delta_ms']['p99']} ms, "
                    f"gap p99 {result['gap_ms']['p99']} ms, delivered "
                    f"{result['delivered_fraction']:.0%}, cpu {result['cpu_cores']}")
        throughput: dict[str, dict[str, Any]] = {}
        for procs in args.throughput_procs:
            for variant in args.throughput_variants:
                if variant == "bare":
                    service = self.bare(procs, rate=0)
                else:
                    service = self.platform(procs, rate=0,
                                            coalesce_ms=20 if variant == "coalesced" else 0)
                result = self.phase(service, "throughput", args.throughput_devices,
                                    duration=args.throughput_duration, tokens=args.deltas,
                                    outstanding=args.outstanding)
                throughput[f"{variant}_{procs}"] = result
                log(f"throughput {variant} x{procs}: {result['ended_requests_per_second']} "
                    f"requests/s, {result['delta_messages_received_per_second']} deltas/s at "
                    f"the devices, per process {result.get('per_process')}, "
                    f"cpu {result['cpu_cores']}")
        if args.burst:
            devices = max(1, args.burst // 2)
            result = self.phase(self.platform(1, rate=0, coalesce_ms=0), "throughput", devices,
                                duration=args.throughput_duration, tokens=args.deltas,
                                outstanding=2)
            throughput["per_delta_1_burst"] = result
            log(f"throughput per_delta x1 with {args.burst} open: "
                f"{result['ended_requests_per_second']} requests/s, errors {result['errors']}")
        if args.profile:
            if args.streams:
                biggest = max(args.streams)
                self.phase(self.platform(1, rate=args.rate, coalesce_ms=20), "latency",
                           biggest, duration=args.duration, tokens=args.deltas,
                           profile=f"latency_{biggest}")
            for variant, coalesce in (("coalesced", 20), ("per_delta", 0)):
                self.phase(self.platform(1, rate=0, coalesce_ms=coalesce), "throughput",
                           args.throughput_devices, duration=args.throughput_duration,
                           tokens=args.deltas, outstanding=args.outstanding,
                           profile=f"throughput_{variant}")
            payload["profile"] = self.profiles
        payload["profiles_projected_again"] = self.reprojected
        payload.update(summarise(args, latency, throughput))
        if args.result_name and args.streams:
            plot(latency, args, RESULTS_DIR / f"{args.result_name}.png")
            payload["png"] = f"bench/results/{args.result_name}.png"
        payload["latency"] = {k: strip_samples(v, keep_first=int(k.rsplit("_", 1)[1])
                                               in args.streams)
                              for k, v in latency.items()}
        payload["throughput"] = throughput
        return payload


# --- admission alone ------------------------------------------------------------------------------


async def admission_floor(prefix: str, count: int, *, gapped: int = 0,
                          gap: float = 0.05) -> dict[str, Any]:
    """The broker's own ``LimitsHook.admit`` (one EVALSHA) alone on an event loop in this
    process, against a no-op EVALSHA and a GET on the same ``redis.asyncio`` client: ``count``
    back to back (a hot loop), then ``gapped`` more with ``gap`` seconds of idleness before each
    (as at 1 stream, where the broker sleeps between requests)."""
    from core.redis import connect_async
    from inference.directory import DeviceProfile
    from inference.hook import LimitsHook
    from inference.units import Units

    redis = connect_async(REDIS_URL)
    hook = LimitsHook(redis, f"{prefix}-micro")
    profile = DeviceProfile(tenant_id=str(uuid.uuid4()), device_id=str(uuid.uuid4()),
                            product_id=None, status="active", tenant_status="active",
                            timezone="Asia/Shanghai", requests_per_minute=10**9,
                            concurrent_streams=10**9, daily_request_cap=None)
    out: dict[str, Any] = {}
    try:
        noop = await redis.script_load("return 1")
        await redis.get(f"{prefix}-micro:nothing")
        for label, samples, pause in (("back_to_back", count, 0.0),
                                      (f"after_{gap:g}s_idle", gapped, gap)):
            times: dict[str, list[float]] = {"hook_admit": [], "evalsha_noop": [], "get": []}
            for index in range(samples):
                for name in times:
                    if pause:
                        await asyncio.sleep(pause)
                    started = time.perf_counter()
                    if name == "hook_admit":
                        await hook.admit(profile, uuid.uuid4().hex, "text",
                                         Units(input_tokens=5),
                                         stream_id=f"micro-{label}-{index}",
                                         owner="bench-micro")
                    elif name == "evalsha_noop":
                        await redis.evalsha(noop, 0)
                    else:
                        await redis.get(f"{prefix}-micro:nothing")
                    times[name].append((time.perf_counter() - started) * 1000)
            if samples:
                out[label] = {name: summary(values) for name, values in times.items()}
    finally:
        await redis.aclose()
    return out


# --- summaries ----------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {"n": len(values), "p50": round(percentile(values, 50), 3),
            "p90": round(percentile(values, 90), 3), "p99": round(percentile(values, 99), 3),
            "max": round(max(values), 3)}


def strip_samples(result: dict[str, Any], *, keep_first: bool) -> dict[str, Any]:
    out = {k: v for k, v in result.items() if not k.startswith("_")}
    if keep_first:
        out["first_delta_samples_ms"] = sorted(round(v, 3)
                                               for v in result["_first_delta_samples"])
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def summarise(args: argparse.Namespace, latency: dict[str, dict[str, Any]],
              throughput: dict[str, dict[str, Any]]) -> dict[str, Any]:
    compare = []
    for streams in args.streams:
        platform, bare = latency[f"platform_{streams}"], latency[f"bare_{streams}"]
        row = {"streams": streams}
        for what in ("first_delta_ms", "gap_ms"):
            for p in ("p50", "p99"):
                row[f"{what}_{p}"] = {"platform": platform[what][p], "bare": bare[what][p],
                                      "ratio": ratio(platform[what][p], bare[what][p])}
        internal = platform["broker_first_delta_ms"] or {}
        row["broker_first_delta_ms"] = {"p50": internal.get("p50"), "p99": internal.get("p99"),
                                        "n": internal.get("n")}
        compare.append(row)

    def largest(system: str) -> int | None:
        ran = [s for s in dict.fromkeys([*args.streams, *args.ramp])
               if f"{system}_{s}" in latency]
        if not ran:
            return None  # not measured in this run (--ramp-systems)
        ok = [s for s in ran if latency[f"{system}_{s}"]["sustained"]]
        return max(ok) if ok else 0

    sustained: dict[str, Any] = {"platform": largest("platform"), "bare": largest("bare")}
    sustained["fraction"] = ratio(sustained["platform"], sustained["bare"])
    per_process: dict[str, Any] = {}
    for key, result in throughput.items():
        if "per_process" in result and not key.endswith("_burst"):
            per_process[key] = {
                "admitted_requests_per_second": [p["admitted_requests_per_second"]
                                                 for p in result["per_process"]],
                "delta_messages_per_second": [p["delta_messages_per_second"]
                                              for p in result["per_process"]]}
    targets: dict[str, Any] = {}
    for row in compare:
        s = row["streams"]
        targets[f"first_delta_p50_within_1.5x_at_{s}"] = (
            row["first_delta_ms_p50"]["ratio"] is not None
            and row["first_delta_ms_p50"]["ratio"] <= TARGETS["first_delta_p50_ratio"])
        targets[f"first_delta_p99_within_2x_at_{s}"] = (
            row["first_delta_ms_p99"]["ratio"] is not None
            and row["first_delta_ms_p99"]["ratio"] <= TARGETS["first_delta_p99_ratio"])
        if s == 1:
            p99 = row["broker_first_delta_ms"]["p99"]
            targets["broker_first_delta_p99_under_1ms_at_1"] = (
                p99 is not None and p99 < TARGETS["broker_first_delta_p99_ms_at_1"])
    targets["sustained_streams_at_least_80pct_of_floor"] = (
        sustained["fraction"] is not None
        and sustained["fraction"] >= TARGETS["sustained_fraction"])
    for key, values in per_process.items():
        if key.startswith("coalesced"):
            targets[f"admitted_1000_per_second_per_process_{key}"] = all(
                v >= TARGETS["admitted_per_second_per_process"]
                for v in values["admitted_requests_per_second"])
        if key.startswith("per_delta"):
            targets[f"forwarded_10000_deltas_per_second_per_process_{key}"] = all(
                v >= TARGETS["forwarded_deltas_per_second_per_process"]
                for v in values["delta_messages_per_second"])
    return {"command": command_line(), "targets": TARGETS, "compare": compare,
            "sustained_streams": sustained, "throughput_per_process": per_process,
            "target_met": targets}


def command_line() -> str:
    return "python -m bench.inference_latency " + " ".join(sys.argv[1:])


def top_functions(folded: str, count: int = 40) -> dict[str, Any]:
    """Self and inclusive shares of py-spy's raw (folded) stacks, and the threads' shares."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        total += samples
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread", "process")):
            threads[frames[0]] += samples
            frames = [f for f in frames[1:] if not f.startswith("thread")]
        names = [_frame(f) for f in frames]
        if names:
            own[names[-1]] += samples
        for name in set(names):
            inclusive[name] += samples

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(n / total * 100, 1)] for name, n in counter.most_common(count)]

    return {"samples": total, "self_percent": share(own), "inclusive_percent": share(inclusive),
            "threads_percent": share(threads)}


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: lines merged."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for root in (str(PROJECT_ROOT) + "/", "/usr/lib/python3.11/", "site-packages/"):
        if root in where:
            where = where.split(root, 1)[1]
    return f"{name} ({where})"


def plot(latency: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"platform": "-", "bare": "--"}
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for index, streams in enumerate(args.streams):
        for system in ("platform", "bare"):
            result = latency[f"{system}_{streams}"]
            label = f"{'floor (bare)' if system == 'bare' else 'platform'}, {streams} stream" \
                    + ("s" if streams != 1 else "")
            for axis, key in ((left, "_first_delta_samples"), (right, "_gap_samples")):
                values = sorted(result[key])
                if not values:
                    continue
                count = len(values)
                ys = ([(i + 1) / count for i in range(count)] if axis is left
                      else [(count - i) / count for i in range(count)])  # tail: P(gap >= x)
                axis.plot(values, ys, styles[system], color=colours[index % len(colours)],
                          label=label)
    from matplotlib.ticker import FuncFormatter

    left.set_xscale("log")
    left.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    left.xaxis.set_minor_formatter(FuncFormatter(
        lambda x, _: f"{x:g}" if str(x)[0] in "25" else ""))
    left.set_xlabel("request published -> first delta received (ms, log)")
    left.set_title("First-delta latency at the device")
    right.set_yscale("log")
    right.set_xlabel("gap between consecutive deltas (ms)")
    right.set_ylabel("fraction of gaps longer (log)")
    right.set_title(f"Delta gaps, tail (paced every {1000 / args.rate:.1f} ms)")
    right.set_xlim(1000 / args.rate * 0.8, 1000 / args.rate * 2.5)
    left.set_ylabel("fraction of samples")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="lower right" if axis is left else "upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command line --------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.inference_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=ints, default=[1, 50],
                   help="latency sizes compared platform/floor (default 1,50)")
    p.add_argument("--ramp", type=ints, default=[100, 150, 200],
                   help="more sizes for the largest sustained S ('' for none)")
    p.add_argument("--ramp-systems", type=lambda s: [x for x in s.split(",") if x],
                   default=["bare", "platform"],
                   help="which systems the --ramp sizes run (e.g. 'bare' to find the floor's "
                        "limit past the platform's)")
    p.add_argument("--period", type=float, default=1.75,
                   help="seconds between a device's requests (open loop)")
    p.add_argument("--deltas", type=int, default=50, help="deltas (tokens) per answer")
    p.add_argument("--rate", type=float, default=30.0, help="deltas per second per stream")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase")
    p.add_argument("--duration-1", type=float, default=90.0,
                   help="measured seconds at S=1 (few samples otherwise)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--drain", type=float, default=5.0,
                   help="seconds after the window for the last answers to end")
    p.add_argument("--max-stall-p99-ms", type=float, default=100.0,
                   help="a sustained S keeps its first-delta p99 and delta-gap p99 under this "
                        "(3 delta intervals at 30/s)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes")
    p.add_argument("--throughput-devices", type=int, default=50)
    p.add_argument("--outstanding", type=int, default=1,
                   help="requests each device keeps open in the throughput phases (50 x 1: "
                        "under redis-py's 100-connection pool, see --burst)")
    p.add_argument("--burst", type=int, default=200,
                   help="one more per_delta phase (1 process) with this many requests open "
                        "(--burst/2 devices x 2): past the Redis pool's 100 connections; 0: none")
    p.add_argument("--throughput-duration", type=float, default=15.0)
    p.add_argument("--throughput-procs", type=ints, default=[1, 2])
    p.add_argument("--throughput-variants", type=lambda s: [x for x in s.split(",") if x],
                   default=["coalesced", "per_delta", "bare"])
    p.add_argument("--admission-samples", type=int, default=2000,
                   help="sequential LimitsHook.admit calls measured alone (0: none)")
    p.add_argument("--profile", action="store_true",
                   help="three more phases with py-spy sampling the broker")
    p.add_argument("--keep-profiles", action="store_true",
                   help="copy py-spy's folded stacks to bench/results/inference_profile_*")
    p.add_argument("--database", default="ensoul_bench_inference",
                   help="recreated, then dropped (must start with ensoul_bench)")
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--result-name", default="inference_latency")
    return p


def main() -> None:
    args = parser().parse_args()
    if 1 in args.streams and args.duration_1 <= 0:
        args.duration_1 = args.duration
    raise_nofile_limit()
    bench = Bench(args)
    try:
        payload = bench.run()
    finally:
        bench.cleanup()
        os.environ.pop(PLAN_ENV, None)
    if args.result_name:
        payload["json"] = str(write_result(args.result_name, payload).relative_to(PROJECT_ROOT))
    payload["latency"] = {k: {m: x for m, x in v.items() if m != "first_delta_samples_ms"}
                          for k, v in payload["latency"].items()}
    print(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
