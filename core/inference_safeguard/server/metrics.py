"""`/metrics`: the server's and the backend's numbers in Prometheus' text format.

The server counts what it sees: requests by endpoint and status with their latency
(to the first byte, for a stream), responses by finish reason, refusals, resample
rounds, candidates scored and tokens (Prometheus' `rate()` of the token counters is the
throughput). A backend with `stats()` (the batching engine: queue length, rows in
flight, ...) adds each of its numbers as a `safeguard_engine_<name>` gauge, read at
scrape time. Each app has its own registry, so several apps live in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from inference_safeguard.extras import import_extra
from inference_safeguard.results import GuardResult
from inference_safeguard.server.backend import backend_stats

prometheus = import_extra("prometheus_client", extra="serve", needed_by="safeguard serve")
core = import_extra("prometheus_client.core", extra="serve", needed_by="safeguard serve")

CONTENT_TYPE = prometheus.CONTENT_TYPE_LATEST


class _BackendStats:
    """A collector of the backend's `stats()`, as gauges."""

    def __init__(self, backend: object) -> None:
        self.backend = backend

    def collect(self) -> Iterator[object]:
        for name, value in backend_stats(self.backend).items():
            yield core.GaugeMetricFamily(
                f"safeguard_engine_{name}", f"{name}, as the backend reports it", value=value
            )

    def describe(self) -> list[object]:
        return []  # the names depend on the backend; nothing to check at registration


class ServerMetrics:
    """The counters of one app, and the backend's stats, in one registry."""

    def __init__(self, backend: object) -> None:
        self.registry = prometheus.CollectorRegistry()
        registry = self.registry
        self.requests = prometheus.Counter(
            "safeguard_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.latency = prometheus.Histogram(
            "safeguard_request_duration_seconds",
            "Seconds from request to response headers (first byte of a stream)",
            ["endpoint"],
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.in_progress = prometheus.Gauge(
            "safeguard_requests_in_progress", "Requests being answered now", registry=registry
        )
        self.responses = prometheus.Counter(
            "safeguard_responses",
            "Responses generated, by endpoint and OpenAI finish reason",
            ["endpoint", "finish_reason"],
            registry=registry,
        )
        self.refusals = prometheus.Counter(
            "safeguard_refusals", "Responses refused as over the safety budget", registry=registry
        )
        self.unsafe = prometheus.Counter(
            "safeguard_over_budget_responses",
            "Responses over the safety budget (refused, withheld or returned flagged)",
            registry=registry,
        )
        self.resample_rounds = prometheus.Counter(
            "safeguard_resample_rounds",
            "Blocks resampled because every candidate was over budget",
            registry=registry,
        )
        self.candidates = prometheus.Counter(
            "safeguard_candidates_scored", "Candidate blocks scored", registry=registry
        )
        self.prompt_tokens = prometheus.Counter(
            "safeguard_prompt_tokens", "Prompt tokens of the responses", registry=registry
        )
        self.completion_tokens = prometheus.Counter(
            "safeguard_completion_tokens", "Tokens of the responses returned", registry=registry
        )
        registry.register(_BackendStats(backend))

    def observe(self, endpoint: str, finish_reason: str, result: GuardResult) -> None:
        """Count one finished response."""
        self.responses.labels(endpoint, finish_reason).inc()
        self.refusals.inc(int(result.refused))
        self.unsafe.inc(int(not result.safe))
        self.resample_rounds.inc(result.stats.resample_rounds)
        self.candidates.inc(result.stats.candidates_scored)
        self.prompt_tokens.inc(result.stats.prompt_tokens)
        self.completion_tokens.inc(result.stats.completion_tokens)

    def render(self) -> bytes:
        return bytes(prometheus.generate_latest(self.registry))
