"""Prometheus metrics of a broker process (served on ENSOUL_INFERENCE_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

ADMISSION_SECONDS = Histogram("ensoul_inference_admission_seconds",
                              "Time the billing hook took to admit a request", buckets=FAST)
PLATFORM_SECONDS = Histogram(
    "ensoul_inference_platform_added_seconds",
    "Request received to first delta published, minus the provider's time to first token",
    buckets=FAST)
PROVIDER_TTFT_SECONDS = Histogram("ensoul_inference_provider_ttft_seconds",
                                  "Provider time to first token", ["provider"], buckets=SLOW)
DELTAS = Counter("ensoul_inference_deltas_total", "Delta messages published")
REQUESTS = Counter("ensoul_inference_requests_total", "Requests finished", ["kind", "finish"])
ERRORS = Counter("ensoul_inference_errors_total", "Error messages sent to devices", ["code"])
DROPPED = Counter("ensoul_inference_dropped_total", "Device messages dropped", ["reason"])
IN_FLIGHT = Gauge("ensoul_inference_streams_in_flight", "Streams open on this process")
SWEPT = Counter("ensoul_inference_swept_total", "Streams of dead brokers settled here")
