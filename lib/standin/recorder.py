"""An autoscaler that only records: what the tests and the benchmark talk to.

It serves the worker's start-up and report routes, signs grants with its own
key and keeps every report, finished-request list and on-close callback with
its arrival time, so callers wait on what arrived instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from lib.standin.grants import GrantSigner
from workers.null.protocol import SESSION_COST


def is_ready(report: dict[str, Any]) -> bool:
    """A null worker's ready report: capacity of one session and no error."""
    return report.get("max_perf") == SESSION_COST and not report.get("error_msg")


@dataclass
class Received:
    at: float
    body: Any


@dataclass
class RecordingAutoscaler:
    """Serves /pubkey/, signs grants and records every report and callback."""

    signer: GrantSigner
    reports: list[Received] = field(default_factory=list)
    deleted: list[Received] = field(default_factory=list)
    callbacks: list[Received] = field(default_factory=list)
    report_status: int = 200
    pubkey_status: int = 200
    callback_delay: float = 0.0
    url: str = ""
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/pubkey/", self._pubkey)
        app.router.add_post("/worker_status/", self._record(self.reports, lambda: self.report_status))
        app.router.add_post("/delete_requests/", self._record(self.deleted, lambda: 200))
        app.router.add_post("/on_close", self._callback)
        return app

    async def _pubkey(self, request: web.Request) -> web.Response:
        if self.pubkey_status != 200:
            return web.Response(status=self.pubkey_status)
        return web.Response(text=self.signer.public_pem)

    def _record(self, into: list[Received], status: Callable[[], int]):
        async def handler(request: web.Request) -> web.Response:
            if status() != 200:
                return web.Response(status=status())
            await self._note(into, await request.json())
            return web.json_response({})

        return handler

    async def _callback(self, request: web.Request) -> web.Response:
        if self.callback_delay:
            await asyncio.sleep(self.callback_delay)
        await self._note(self.callbacks, await request.json())
        return web.json_response({})

    async def _note(self, into: list[Received], body: Any) -> None:
        async with self._changed:
            into.append(Received(time.time(), body))
            self._changed.notify_all()

    @property
    def on_close_url(self) -> str:
        return f"{self.url}/on_close"

    def grant(self, worker_url: str, **kwargs: Any) -> dict[str, Any]:
        return self.signer.grant(worker_url, **kwargs)

    async def wait_for(
        self, what: Callable[[], Any], timeout: float = 15.0, message: str | Callable[[], str] = ""
    ) -> Any:
        """Waits until ``what()`` is truthy and returns it; ``message`` (or, if callable, its result) names it."""

        async def until() -> Any:
            async with self._changed:
                while True:
                    value = what()
                    if value:
                        return value
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            described = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {described or what}") from None

    def reports_for(self, container_id: int, since: float = 0.0) -> list[dict[str, Any]]:
        return [r.body for r in self.reports if r.body.get("id") == container_id and r.at >= since]

    def first_report(
        self, container_id: int, predicate: Callable[[dict[str, Any]], bool], since: float = 0.0
    ) -> Received | None:
        for received in self.reports:
            if received.at >= since and received.body.get("id") == container_id and predicate(received.body):
                return received
        return None


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Runs ``app`` on 127.0.0.1 at a port the kernel picks; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
