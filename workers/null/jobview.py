"""What the dispatcher shows: a live one-line view on a terminal, and Prometheus metrics on request."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import IO, Any

from .ledger import DEAD_STATE, DONE_STATE, Attempt, Ledger

log = logging.getLogger(__name__)

VIEW_EVERY = 0.25


def view_line(ledger: Ledger, workers: int | None = None) -> str:
    """``queued 3 · waiting for a worker 2 · running 5 · done 10 · failed 0 · workers 7``."""
    if workers is None:
        workers = len({s.url for s in ledger.sessions.values() if s.alive and s.reserved})
    parts = [
        f"queued {ledger.pending}",
        f"waiting for a worker {ledger.waiting_for_worker}",
        f"running {ledger.running}",
        f"done {ledger.count(DONE_STATE)}",
        f"failed {ledger.count(DEAD_STATE)}",
        f"workers {workers}",
    ]
    return " · ".join(parts)


class LiveLine(logging.Handler):
    """Keeps one status line at the bottom of a terminal; log records print above it."""

    def __init__(self, stream: IO[str], inner: logging.Handler | None):
        super().__init__()
        self.stream = stream
        self.inner = inner
        self.line = ""

    def show(self, line: str) -> None:
        self.line = line
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write("\r\x1b[2K")
        if self.inner is not None:
            self.inner.handle(record)
        self.stream.write(self.line)
        self.stream.flush()

    def finish(self) -> None:
        if self.line:
            self.stream.write("\r\x1b[2K" + self.line + "\n")
            self.stream.flush()
            self.line = ""


class ViewTicker:
    """Every quarter second: the live line (on a terminal) and the metrics' gauges."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        live: bool,
        metrics: Metrics | None = None,
        workers: Callable[[], int] | None = None,
        stream: IO[str] | None = None,
    ):
        self.ledger = ledger
        self.live = live
        self.metrics = metrics
        self.workers = workers
        self.stream = stream or sys.stdout
        self._task: asyncio.Future[None] | None = None
        self._handler: LiveLine | None = None
        self._replaced: list[logging.Handler] = []

    def start(self) -> None:
        if self.live:
            root = logging.getLogger()
            self._replaced = [h for h in root.handlers if getattr(h, "stream", None) is self.stream]
            inner = self._replaced[0] if self._replaced else None
            for handler in self._replaced:
                root.removeHandler(handler)
            self._handler = LiveLine(self.stream, inner)
            root.addHandler(self._handler)
        if self.live or self.metrics is not None:
            self._task = asyncio.ensure_future(self._run())

    def line(self) -> str:
        return view_line(self.ledger, self.workers() if self.workers else None)

    async def _run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(VIEW_EVERY)

    def tick(self) -> None:
        if self._handler is not None:
            self._handler.show(self.line())
        if self.metrics is not None:
            self.metrics.update(self.ledger)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._handler is not None:
            self._handler.show(self.line())
            self._handler.finish()
            root = logging.getLogger()
            root.removeHandler(self._handler)
            for handler in self._replaced:
                root.addHandler(handler)
            self._handler = None


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
            from .cli import StartupError

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
