"""The one door to the ``vastai`` SDK client's internals, and sessions opened with a punctual deadline.

The SDK hides the request it queues for ``/session/create`` and offers no way
to stop routing once a caller gives up; the project's session client, its
dispatcher and the bench need both. The private names are written here only
and checked by ``missing_internals()``.

Its own ``timeout`` is checked only between route polls, which sleep up to
5 s (2-3 s after a 429), so a plain ``endpoint.session(timeout=T)`` can raise
several seconds after T. ``open_session`` keeps the deadline within a second.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import ssl
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from workers.null.cli import StartupError, short
from workers.null.protocol import SESSION_GONE

log = logging.getLogger(__name__)

# Vast's autoscalers, as the SDK names them; local: the stand-in.
INSTANCES = ("prod", "alpha", "candidate", "local")
DEFAULT_ENDPOINT = "null-pyworker"  # the stand-in serves this name by default
LOCAL_API_KEY = "local"  # the stand-in's default key
DEFAULT_LOCAL_PORT = 8080  # where the SDK's instance="local" looks for the autoscaler

CREATE_ROUTE = "/session/create"
ROUTE = "_route"  # Endpoint: one /route/ call; overridden to stop routing once interrupted
# While a create request is in one of these, it has not reached a worker:
# cancelling it leaves nothing held.
NOT_SENT = ("Queued", "Polling", "Retrying")
# How long a create that already reached a worker is awaited past the deadline.
SENT_CREATE_GRACE = 0.8

_CREATIONS: contextvars.ContextVar[list[Any]] = contextvars.ContextVar("null_sdk_creations")


class Interrupted(Exception):
    """Raised in place of routing once the caller stopped: no new session may be created."""


class SessionTimeout(Exception):
    """No worker took the session before the caller's deadline."""


def missing_internals() -> list[str]:
    """SDK names this module relies on that the installed SDK lacks."""
    from vastai import Serverless
    from vastai.serverless.client.endpoint import Endpoint

    wanted = ((Endpoint, ROUTE), (Serverless, "queue_endpoint_request"), (Serverless, "get_ssl_context"))
    return [f"{owner.__name__}.{name}" for owner, name in wanted if not hasattr(owner, name)]


def _classes() -> tuple[type, type]:
    # Imported on use: vastai takes most of a second to import, and --help or
    # a usage error should not wait for it.
    from vastai import Serverless
    from vastai.serverless.client.endpoint import Endpoint

    class Client(Serverless):
        """Hands each /session/create request to the task that asked; plain TLS on loopback."""

        def __init__(self, *args: Any, system_ca: bool = False, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # Plain HTTP on loopback: no need for the CA certificate the SDK
            # would otherwise download from the console first. Made once: the
            # SDK asks for it on every request, and each one costs ~30 ms.
            self._system_context = ssl.create_default_context() if system_ca else None

        async def get_ssl_context(self) -> ssl.SSLContext:
            if self._system_context is not None:
                return self._system_context
            return await super().get_ssl_context()

        def queue_endpoint_request(self, *args: Any, **kwargs: Any) -> Any:
            request = super().queue_endpoint_request(*args, **kwargs)
            route = kwargs.get("worker_route", args[1] if len(args) > 1 else None)
            holder = _CREATIONS.get(None)
            if route == CREATE_ROUTE and holder is not None:
                holder.append(request)
            return request

    class GuardedEndpoint(Endpoint):
        """An endpoint that stops routing once ``stop`` is set, so no create is sent after it."""

        def __init__(self, *args: Any, stop: asyncio.Event, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._stop = stop
            self.late_closes: set[asyncio.Future] = set()  # closes of sessions that opened past their deadline

        async def _route(self, *args: Any, **kwargs: Any) -> Any:
            if self._stop.is_set():
                raise Interrupted("interrupted")
            answer = await super()._route(*args, **kwargs)
            if self._stop.is_set():
                raise Interrupted("interrupted")
            return answer

    return Client, GuardedEndpoint


def make_client(api_key: str, instance: str, url: str | None = None, **kwargs: Any) -> Any:
    """An SDK client; ``url``: a local stand-in serving both the console and the autoscaler."""
    client_class, _ = _classes()
    if url is not None:
        return client_class(
            api_key=api_key, instance=instance, autoscaler_url=url, webserver_url=url, system_ca=True, **kwargs
        )
    return client_class(api_key=api_key, instance=instance, **kwargs)


async def find_endpoint(client: Any, name: str, stop: asyncio.Event | None = None) -> Any:
    """The endpoint called ``name``, routing only until ``stop`` is set; StartupError (exit 2) naming the fix."""
    _, guarded = _classes()
    try:
        endpoints = await client.get_endpoints()
    except Exception as exc:
        raise StartupError(f"cannot list endpoints at {client.vast_web_url}: {short(exc)}", code=2) from None
    for endpoint in endpoints:
        if endpoint.name == name:
            return guarded(client=client, data=endpoint.data, stop=stop or asyncio.Event())
    names = ", ".join(repr(e.name) for e in endpoints) or "none"
    raise StartupError(
        f"no endpoint named {name!r} at {client.vast_web_url} (it has: {names}): pass --endpoint NAME", code=2
    )


def create_sent(creations: list[Any]) -> bool:
    """Whether a /session/create of these may be at a worker now (so its answer must be awaited)."""
    return bool(creations) and creations[-1].status not in NOT_SENT


async def open_session(
    endpoint: Any,
    *,
    cost: float,
    lifetime: float,
    timeout: float | None,
    creations: list[Any] | None = None,
    on_close_route: str | None = None,
    on_close_payload: Any = None,
    on_late: Callable[[Any], Any] | None = None,
) -> Any:
    """An SDK session, or SessionTimeout within about a second of ``timeout``.

    ``creations`` collects the SDK's create requests, so a caller can tell
    whether one reached a worker. A create that reached a worker as the
    deadline passed is awaited a little longer; one that opens later still is
    closed (``on_late`` is called with it first), so nothing is left held.
    """
    creations = [] if creations is None else creations
    _CREATIONS.set(creations)
    task = asyncio.ensure_future(
        endpoint.session(
            cost=cost,
            lifetime=lifetime,
            on_close_route=on_close_route,
            on_close_payload=on_close_payload,
            timeout=timeout,
        )
    )
    try:
        await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return task.result()
    if create_sent(creations):
        await asyncio.wait({task}, timeout=SENT_CREATE_GRACE)
        if task.done():
            return task.result()
        task.add_done_callback(lambda done: _close_late(endpoint, done, on_late))
    else:
        task.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await task
    raise SessionTimeout(f"no worker took the session within {timeout:g}s")


def _close_late(endpoint: Any, task: asyncio.Future, on_late: Callable[[Any], Any] | None) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    session = task.result()
    log.info("closing session %s: it opened after its deadline", session.session_id)
    if on_late is not None:
        on_late(session)
    closing = asyncio.ensure_future(close_session(endpoint, session))
    pending = getattr(endpoint, "late_closes", None)
    if pending is not None:
        pending.add(closing)
        closing.add_done_callback(pending.discard)


async def close_session(endpoint: Any, session: Any) -> str | None:
    """Ends the session with /session/end; the error, or None when the worker no longer holds it."""
    try:
        await endpoint.close_session(session)
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        # The worker's 410: the session already ended (released, or its lease lapsed).
        return None if SESSION_GONE in message else message
    finally:
        session.open = False
    return None


async def workers_holding_a_session(endpoint: Any, timeout: float) -> int | None:
    """How many of the endpoint's workers carry load now, each one held session; None when the endpoint cannot say.

    Vast's own client reads them with ``POST <autoscaler>/get_endpoint_workers/``. It answers an endpoint not
    ready to be queried with an empty list, as it does an endpoint scaled to zero: both read as none held, which
    the ledger trusts only when it lasts a whole AckWait.
    """
    try:
        workers = await asyncio.wait_for(endpoint.get_workers(), timeout)
    except Exception:
        return None
    return sum(1 for worker in workers if getattr(worker, "cur_load", 0.0) > 0)


async def session_alive(endpoint: Any, session: Any) -> bool:
    """Whether the worker still holds the session (False also when the worker is gone)."""
    try:
        return bool(await endpoint.session_healthcheck(session))
    except Exception:
        return False
