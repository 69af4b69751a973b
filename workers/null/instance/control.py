"""The loopback control server the consumer on the instance talks to.

It has no authentication, so it listens on 127.0.0.1 only: whoever can reach
it is already on the instance.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from workers.null.instance.bodies import Refusal, parse_claim, parse_extend, parse_release, read_json, refusals
from workers.null.instance.desk import Ending, SessionDesk
from workers.null.protocol import CONTROL_HOST

log = logging.getLogger(__name__)

DESK = web.AppKey("desk", SessionDesk)


@refusals("/release")
async def release(request: web.Request) -> web.Response:
    asked = parse_release(await read_json(request, allow_empty=True))
    desk = request.app[DESK]
    if asked.session_id is not None and not desk.holds(asked.session_id):
        # A consumer that outlived its lease must not release the next job's session.
        return web.json_response({"released": False, "reason": f"session {asked.session_id} is not held"})
    released = await desk.release(Ending.CONSUMER, only=asked.session_id)
    if not released:
        return web.json_response({"released": False, "reason": "no active session"})
    return web.json_response({"released": True, "session_ids": released})


@refusals("/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[DESK].status())


@refusals("/extend")
async def extend(request: web.Request) -> web.Response:
    asked = parse_extend(await read_json(request, allow_empty=True))
    desk = request.app[DESK]
    if asked.session_id is not None and not desk.holds(asked.session_id):
        raise Refusal(409, f"session {asked.session_id} is not held")
    extended = desk.extend(asked.session_id, asked.seconds)
    if extended is None:
        raise Refusal(409, "no active session to extend")
    return web.json_response(extended)


@refusals("/claim")
async def claim(request: web.Request) -> web.Response:
    """Answers as soon as the worker holds a session (at once if it holds one), or with none at the timeout."""
    asked = parse_claim(await read_json(request, allow_empty=True))
    desk = request.app[DESK]
    session = await desk.claim(asked.seconds)
    return web.json_response({"session": None if session is None else desk.describe(session)})


@refusals("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "stub": True})


def make_control_app(desk: SessionDesk, *, health_stub: bool) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[DESK] = desk
    app.router.add_post("/release", release)
    app.router.add_get("/status", status)
    app.router.add_post("/extend", extend)
    app.router.add_post("/claim", claim)
    if health_stub:
        app.router.add_get("/health", health)
    return app


@asynccontextmanager
async def serve_control(app: web.Application, port: int) -> AsyncIterator[int]:
    """Serves ``app`` on 127.0.0.1:``port`` and yields the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, CONTROL_HOST, port)
        try:
            await site.start()
        except OSError as exc:
            raise RuntimeError(
                f"control server cannot listen on {CONTROL_HOST}:{port} ({exc.strerror or exc}): "
                "set NULL_CONTROL_PORT to a free port"
            ) from None
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
