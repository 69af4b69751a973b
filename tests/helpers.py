"""What the tests share: building the worker's apps in-process and talking to them."""

from __future__ import annotations

from typing import Any

from aiohttp import web


def public_app(desk: Any) -> web.Application:
    """The framework's public app as ``start_server_async`` builds it, with the null worker's handlers."""
    backend = desk.backend
    app = web.Application(client_max_size=0)
    # What install() puts in place of the framework's /ping.
    app.router.add_post("/ping", backend.lifecycle.routes.ping)
    app.router.add_post("/session/create", backend.session_create_handler)
    app.router.add_post("/session/end", backend.session_end_handler)
    app.router.add_post("/session/get", backend.session_get_handler)
    app.router.add_post("/session/health", backend.session_health_handler)
    app.router.add_post("/pyworker/update", backend.pyworker_update_handler)
    return app
