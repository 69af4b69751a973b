"""The null worker: reserves a Vast Serverless worker per session and runs nothing.

``python -m workers.null.worker`` runs it. A dispatcher opens a session with
the SDK; the consumer on the instance ends it with ``POST
127.0.0.1:18999/release``. Everything else (reports, grants, expiry) follows
from that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

from workers.null.aio import stop_task
from workers.null.instance import framework
from workers.null.instance.settings import Settings, SettingsError
from workers.null.protocol import SESSION_COST

log = logging.getLogger("workers.null")
STARTED_AT = time.time()  # before the framework's imports, the bulk of start-up

PING_ROUTE = "/ping"
STOP_GRACE = 3.5  # seconds to deliver the last report and callback; SIGTERM to exit stays under 5 s
PUBKEY_WAIT = 90.0  # the framework retries the key fetch for about 45 s


async def _pong(**_: Any) -> dict:
    return {"pong": True}


class NullLifecycle:
    """Runs beside the framework's start-up: the benchmark cache, the control server, expiry."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.desk = None
        self.routes = None
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> NullLifecycle:
        from workers.null.instance.control import make_control_app, serve_control

        desk = self.desk
        assert desk is not None, "install() attaches the desk before the worker runs"
        # A number in the framework's benchmark cache is taken as max_perf and
        # skips the benchmark: capacity is one session whatever the hardware.
        Path(framework.benchmark_file()).write_text(f"{SESSION_COST}\n")
        stack = AsyncExitStack()
        try:
            app = make_control_app(desk, health_stub=self.settings.backend_health_url is None)
            await stack.enter_async_context(serve_control(app, self.settings.control_port))
            expiry = asyncio.ensure_future(desk.expiry_loop())
            stack.push_async_callback(stop_task, expiry)
            if self.settings.backend_health_url is None:
                log.warning(
                    "BACKEND_HEALTH_URL is unset: health checks hit a stub on 127.0.0.1:%d/health that always "
                    "answers 200, so a dead consumer will not show as a broken worker",
                    self.settings.control_port,
                )
            if not self.settings.unsecured:
                await self._wait_for_public_key(desk.backend)
        finally:
            # Kept open even when start-up fails: the consumer can still read
            # the error from /status. serve() closes it when the worker stops.
            self._stack = stack
        return self

    async def _wait_for_public_key(self, backend: Any) -> None:
        if await framework.wait_for_public_key(backend, PUBKEY_WAIT) is None:
            addrs = ", ".join(f"{addr.rstrip('/')}/pubkey/" for addr in self.settings.report_addrs)
            raise RuntimeError(
                f"could not fetch the autoscaler's public key from {addrs}, so no grant can be verified: "
                "check REPORT_ADDR (or set UNSECURED=true to skip grant checks)"
            )

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


def build_worker_config(settings: Settings):
    """The framework configuration: one benchmarked /ping, one session, the null lifecycle."""
    # Imported here so an incompatible framework is reported by main(), not as an import traceback.
    from vastai.serverless.server.worker import BenchmarkConfig, HandlerConfig, WorkerConfig

    health_url = settings.backend_health_url or f"http://127.0.0.1:{settings.control_port}/health"
    return WorkerConfig(
        # The framework's HTTP client needs a base URL; health checks and
        # on-close callbacks use absolute URLs, so only its form matters.
        model_server_url="http://127.0.0.1",
        model_server_port=settings.control_port,
        model_healthcheck_url=health_url,
        max_sessions=1,
        lifecycle=NullLifecycle(settings),
        handlers=[
            HandlerConfig(
                route=PING_ROUTE,
                allow_parallel_requests=True,
                # Never run (the cache answers); here because the framework
                # requires exactly one benchmarked handler.
                benchmark_config=BenchmarkConfig(dataset=[{}], runs=1, concurrency=1, do_warmup=False),
                remote_function=_pong,
                workload_calculator=lambda _payload: 0.0,
            )
        ],
    )


def install(worker: Any, settings: Settings):
    """Puts the session desk in charge of the framework's session state and routes."""
    from aiohttp import web

    from workers.null.instance import routes
    from workers.null.instance.desk import SessionDesk

    missing = framework.missing_instance_attributes(worker.backend)
    if missing:
        raise framework.FrameworkMismatch(missing)
    desk = SessionDesk(settings, worker.backend, started_at=STARTED_AT)
    session_routes = routes.install(desk)
    worker.routes = [
        web.post(route.path, session_routes.ping) if route.path == PING_ROUTE else route for route in worker.routes
    ]
    worker.backend.lifecycle.desk = desk
    worker.backend.lifecycle.routes = session_routes
    return desk


def configure_logging(settings: Settings) -> None:
    # The framework's Worker sets the root logger to DEBUG (a status dump a
    # second); the configured level applies from here on.
    root = logging.getLogger()
    root.setLevel(settings.log_level_number)
    formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setLevel(logging.NOTSET)
        handler.setFormatter(formatter)
    if settings.log_level != "DEBUG":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(settings: Settings) -> int:
    # Before the framework's imports, which take most of start-up: a stop
    # asked for meanwhile is honoured once the worker is in place.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    from vastai.serverless.server.worker import Worker

    config = build_worker_config(settings)
    worker = Worker(config)
    configure_logging(settings)
    try:
        desk = install(worker, settings)
    except framework.FrameworkMismatch as exc:
        return await _refuse_framework(settings, exc.missing)

    running = asyncio.ensure_future(worker.run_async())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        stopping.cancel()
        log.error("the framework's server stopped on its own: %r", running.exception())
        return 1
    log.info("stopping")
    await desk.shutdown(time.monotonic() + STOP_GRACE)
    await stop_task(running)
    await config.lifecycle.aclose()
    await close_clients(worker.backend)
    log.info("stopped")
    return 0


async def close_clients(backend: Any) -> None:
    """Closes the framework's HTTP clients: its report client and the on-close callback client."""
    with suppress(Exception):
        await backend.metrics.aclose()
    client = backend.__dict__.get("session")  # created on first use only
    if client is not None:
        with suppress(Exception):
            await client.close()


async def _refuse_framework(settings: Settings, missing) -> int:
    message = framework.describe(missing)
    log.error("%s", message)
    await framework.report_error(settings, message)
    return 1


def main(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        print(f"null worker: {exc}", file=sys.stderr)
        return 2
    missing = framework.missing_internals()
    if missing:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
        return asyncio.run(_refuse_framework(settings, missing))
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
