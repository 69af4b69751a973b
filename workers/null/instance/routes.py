"""The worker's public session routes: parse the body once, verify the grant, then ask the desk.

Each refusal answers ``{"error": reason}`` with 401 (bad signature), 422
(malformed), 429 (busy) or 410 (gone), never a 500 for a client's mistake.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from workers.null.instance import framework
from workers.null.instance.bodies import (
    Refusal,
    grant_request_idx,
    parse_create,
    parse_grant,
    parse_named,
    parse_ping,
    read_json,
    refusals,
)
from workers.null.instance.desk import Ending, SessionDesk
from workers.null.instance.grants import GrantVerifier
from workers.null.protocol import SESSION_GONE


class SessionRoutes:
    def __init__(self, desk: SessionDesk):
        self.desk = desk
        backend = desk.backend
        self.verifier = GrantVerifier(
            desk.settings.url, lambda: framework.public_key(backend), unsecured=desk.settings.unsecured
        )

    @refusals("/session/create")
    async def create(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        grant = parse_grant(body)
        # The signature first: only a genuine grant's request id is reported back.
        self.verifier.check(grant)
        try:
            create = parse_create(body, max_lifetime=self.desk.settings.max_lifetime)
        except Refusal:
            self.desk.grant_ended(grant_request_idx(grant), used=False)
            raise
        session = await self.desk.open(create)
        return web.json_response({"session_id": session.session_id, "expiration": session.expiration}, status=201)

    async def _named(self, request: web.Request) -> Any | None:
        named = parse_named(await read_json(request))
        session = self.desk.backend.sessions.get(named.session_id)
        if session is None:
            return None
        if session.auth_data != named.session_auth:
            raise Refusal(401, "session_auth does not match the session's grant")
        return session

    @refusals("/session/end")
    async def end(self, request: web.Request) -> web.Response:
        session = await self._named(request)
        if session is None or not await self.desk.close(session.session_id, Ending.DISPATCHER):
            raise Refusal(410, SESSION_GONE)
        return web.json_response({"ended": True, "removed_session": session.session_id})

    @refusals("/session/get")
    async def get(self, request: web.Request) -> web.Response:
        session = await self._named(request)
        if session is None:
            raise Refusal(410, SESSION_GONE)
        return web.json_response(
            {
                "session_id": session.session_id,
                "auth_data": session.auth_data,
                "lifetime": session.lifetime,
                "expiration": session.expiration,
                "created_at": session.created_at,
                "on_close_route": session.on_close_route,
                "on_close_payload": session.on_close_payload,
            }
        )

    @refusals("/session/health")
    async def health(self, request: web.Request) -> web.Response:
        session = await self._named(request)
        return web.json_response({"ok": session is not None})

    @refusals("/ping")
    async def ping(self, request: web.Request) -> web.Response:
        """A signed no-op; with a session_id it renews that session's lease."""
        ping = parse_ping(await read_json(request))
        self.verifier.check(ping.auth_data)
        if ping.session_id is None:
            # A grant used for nothing else: reported served, so it stops counting as load.
            self.desk.grant_ended(grant_request_idx(ping.auth_data), used=True)
            return web.json_response({"ok": True, "ready": self.desk.status()["ready"]})
        # A session's keep-alive: never reported finished, the session goes on.
        session = self.desk.backend.sessions.get(ping.session_id)
        if session is None:
            raise Refusal(410, "invalid session: it ended or expired")
        if session.auth_data != ping.auth_data:
            raise Refusal(401, "auth_data does not match the session's grant")
        expires_in = self.desk.renew(session, session.lifetime, shorten=False)
        return web.json_response({"ok": True, "session_id": ping.session_id, "expires_in": expires_in})

    @refusals("/pyworker/update")
    async def update(self, request: web.Request) -> web.StreamResponse:
        # With no MASTER_TOKEN the framework accepts an empty token from anyone.
        if not self.desk.backend.mtoken:
            raise Refusal(403, "updates are disabled: MASTER_TOKEN is not set")
        assert self.desk.originals is not None
        return await self.desk.originals.update_handler(request)


def install(desk: SessionDesk) -> SessionRoutes:
    """Puts the desk and these routes in charge of the framework's session state, routes and reports."""
    routes = SessionRoutes(desk)
    desk.originals = framework.take_over(
        desk.backend,
        create=routes.create,
        end=routes.end,
        get=routes.get,
        health=routes.health,
        update=routes.update,
        close_session=desk.close_for_framework,
        report_loop=desk.report_loop,
        model_loaded=desk.on_model_loaded,
        model_errored=desk.on_model_errored,
    )
    return routes
