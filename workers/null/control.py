"""The loopback control server the consumer on the instance talks to.

It has no authentication, so it listens on 127.0.0.1 only: whoever can reach
it is already on the instance.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from .requests import Refusal, finite, read_json, require_object
from .sessions import SessionDesk, refusals

log = logging.getLogger(__name__)

CONTROL_HOST = "127.0.0.1"
DESK = web.AppKey("desk", SessionDesk)


def _session_id(body: Any) -> str | None:
    """The optional ``session_id`` a consumer names to act on that session only."""
    session_id = body.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise Refusal(422, "session_id must be a non-empty string or null")
    return session_id


@refusals("/release")
async def release(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True)
    session_id = None if body is None else _session_id(require_object(body, "body"))
    desk = request.app[DESK]
    if session_id is not None and session_id not in desk.backend.sessions:
        # A consumer that outlived its lease must not release the next job's session.
        return web.json_response({"released": False, "reason": f"session {session_id} is not held"})
    released = await desk.release("consumer (/release)", only=session_id)
    if not released:
        return web.json_response({"released": False, "reason": "no active session"})
    return web.json_response({"released": True, "session_ids": released})


@refusals("/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[DESK].status())


@refusals("/extend")
async def extend(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True)
    seconds = session_id = None
    if body is not None:
        body = require_object(body, "body")
        session_id = _session_id(body)
        if body.get("seconds") is not None:
            seconds = finite(body["seconds"])
            if seconds is None or seconds <= 0:
                raise Refusal(422, "seconds must be a finite number > 0")
    desk = request.app[DESK]
    if session_id is not None and session_id not in desk.backend.sessions:
        raise Refusal(409, f"session {session_id} is not held")
    extended = await desk.extend(seconds)
    if extended is None:
        raise Refusal(409, "no active session to extend")
    return web.json_response(extended)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "stub": True})


def make_control_app(desk: SessionDesk, *, health_stub: bool) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[DESK] = desk
    app.router.add_post("/release", release)
    app.router.add_get("/status", status)
    app.router.add_post("/extend", extend)
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
