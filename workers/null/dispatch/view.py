"""What the dispatcher shows on a terminal: one live line of jobs and workers, kept below the log."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import IO, Any

from workers.null.dispatch.ledger import DEAD_STATE, DONE_STATE, Ledger

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
        metrics: Any = None,
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
