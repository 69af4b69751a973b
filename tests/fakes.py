"""Stand-ins for what the project does not own: Vast's autoscaler and a consumer.

Each is a real aiohttp server on 127.0.0.1 that records what it was sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from lib.bench.recorder import Received, serving
from lib.bench.recorder import RecordingAutoscaler as FakeAutoscaler

__all__ = ["FakeAutoscaler", "FakeConsumer", "Received", "serving"]


@dataclass
class FakeConsumer:
    """A consumer's health endpoint that can be made to die."""

    healthy: bool = True
    checks: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        self.checks += 1
        return web.Response(status=200 if self.healthy else 503)
