"""The dispatcher's Prometheus metrics (``--metrics-port``), on their own registry."""

from __future__ import annotations

import logging
from typing import Any

from workers.null.cli import StartupError
from workers.null.dispatch.ledger import Attempt, Ledger

log = logging.getLogger(__name__)


class Metrics:
    """The dispatcher's Prometheus metrics on their own registry; no job ids as labels."""

    def __init__(self, registry: Any):
        from prometheus_client import Counter, Gauge, Histogram

        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
        self.registry = registry
        self.queue_pending = Gauge(
            "null_dispatcher_queue_pending", "Jobs not yet delivered to any consumer", registry=registry
        )
        self.jobs_running = Gauge("null_dispatcher_jobs_running", "Jobs claimed by a consumer", registry=registry)
        self.sessions = Gauge("null_dispatcher_sessions", "Sessions alive, by state", ["state"], registry=registry)
        self.sessions_asked = Counter("null_dispatcher_sessions_asked", "Sessions asked for", registry=registry)
        self.wait = Histogram(
            "null_dispatcher_queue_wait_seconds",
            "From a job's publish to its handler's start",
            buckets=buckets,
            registry=registry,
        )
        self.run = Histogram(
            "null_dispatcher_run_seconds", "From a handler's start to its end", buckets=buckets, registry=registry
        )
        self.outcomes = Counter("null_dispatcher_attempts", "Job attempts by outcome", ["outcome"], registry=registry)
        self._asked = 0
        self.server: Any = None
        self.port = 0

    @classmethod
    def start(cls, port: int, host: str = "127.0.0.1") -> Metrics:
        from prometheus_client import CollectorRegistry, start_http_server

        metrics = cls(CollectorRegistry())
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("metrics served on %s:%d: anyone who reaches it can read them", host, port)
        try:
            server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise StartupError(f"--metrics-port {port} on {host}: {exc.strerror}: give a free port", code=2) from None
        metrics.server = server
        metrics.port = server.server_port
        log.info("metrics on http://%s:%d/metrics", host, metrics.port)
        return metrics

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def update(self, ledger: Ledger) -> None:
        self.queue_pending.set(ledger.pending)
        self.jobs_running.set(ledger.running)
        alive = [s for s in ledger.sessions.values() if s.alive]
        self.sessions.labels("waiting").set(sum(1 for s in alive if not s.reserved))
        self.sessions.labels("unclaimed").set(sum(1 for s in alive if s.reserved and s.job_id is None))
        self.sessions.labels("running").set(sum(1 for s in alive if s.job_id is not None))
        if ledger.asked > self._asked:
            self.sessions_asked.inc(ledger.asked - self._asked)
            self._asked = ledger.asked

    def attempt(self, row: Attempt) -> None:
        self.outcomes.labels(row.outcome or "unknown").inc()
        if row.started is not None and row.enqueued is not None:
            self.wait.observe(max(0.0, row.started - row.enqueued))
        if row.started is not None and row.finished is not None:
            self.run.observe(max(0.0, row.finished - row.started))
