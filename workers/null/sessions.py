"""The one reservation a null worker holds: open, renew, release, expire, report.

The framework keeps sessions in ``Backend.sessions`` and load in its metrics;
this desk uses that same state, so the framework's reports, delete-requests
and garbage collection stay true, and takes over the routes that change it:
they check grants and bodies, answer 4xx to bad input, and get every change
to the autoscaler at once instead of on the framework's one-second tick.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from vastai.serverless.server.lib.data_types import RequestMetrics, Session

from .requests import GrantVerifier, Refusal, finite, read_json, require_object
from .settings import Settings, http_url

log = logging.getLogger(__name__)

# One session is one worker: the session cost, the reported max_perf and the
# autoscaler's capacity unit are all this number.
SESSION_COST = 100.0
DEFAULT_LIFETIME = 60.0  # the SDK's and the framework's default
REPORT_INTERVAL = 1.0
REPORT_HEARTBEAT = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def refusals(route: str) -> Callable[[Handler], Handler]:
    """Turns a Refusal into its JSON answer and logs why."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(*args: Any) -> web.StreamResponse:
            # (request) for a function, (self, request) for a method.
            try:
                return await handler(*args)
            except Refusal as refusal:
                level = logging.DEBUG if refusal.status in (409, 410, 429) else logging.INFO
                log.log(level, "refused %s (%d): %s", route, refusal.status, refusal.detail or refusal.reason)
                response = web.json_response({"error": refusal.reason}, status=refusal.status)
                if refusal.close:
                    response.force_close()
                return response

        return guarded

    return wrap


async def wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Returns when ``event`` is set or ``timeout`` passes.

    Not ``wait_for``: before Python 3.12 it can swallow a cancellation that
    arrives as the event is set, and these loops must stop when cancelled.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


def _integer_or_absent(auth_data: dict[str, Any], name: str) -> int | None:
    value = auth_data.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise Refusal(422, f"auth_data.{name} must be an integer")
    return value


class SessionDesk:
    def __init__(self, settings: Settings, backend: Any, *, started_at: float | None = None):
        self.settings = settings
        self.backend = backend
        self.metrics = backend.metrics
        self.verifier = GrantVerifier(settings.url, lambda: backend._pubkey, unsecured=settings.unsecured)
        self.ready = False
        self.stopping = False
        self.started_at = time.time() if started_at is None else started_at
        self._report_now = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._lease_changed = asyncio.Event()
        self._callbacks: set[asyncio.Task] = set()
        self._framework_update_handler = backend.pyworker_update_handler
        self._framework_model_loaded = self.metrics._model_loaded
        self._framework_model_errored = self.metrics._model_errored

    # -- wiring -----------------------------------------------------------

    def install(self) -> None:
        """Points the framework's routes, hooks and report loop at this desk."""
        backend, metrics = self.backend, self.metrics
        backend.max_sessions = 1
        backend.session_create_handler = self.handle_create
        backend.session_end_handler = self.handle_end
        backend.session_get_handler = self.handle_get
        backend.session_health_handler = self.handle_health
        backend.pyworker_update_handler = self.handle_update
        # The framework's /session/end and its 5-second garbage collector call
        # this; owning it keeps one close path with prompt reports.
        backend._Backend__close_session = self._close_for_framework
        metrics._send_metrics_loop = self.report_loop
        metrics._model_loaded = self._on_model_loaded
        metrics._model_errored = self._on_model_errored

    # -- state --------------------------------------------------------------

    def held(self) -> Any | None:
        return next(iter(self.backend.sessions.values()), None)

    def status(self) -> dict[str, Any]:
        session = self.held()
        error = self.metrics.model_metrics.error_msg
        return {
            "ready": self.ready and not error and not self.stopping,
            "error": error or None,
            "worker_url": self.settings.url,
            "session": None if session is None else self.describe(session),
        }

    def describe(self, session: Any) -> dict[str, Any]:
        now = time.time()
        metrics = self.backend.session_metrics.get(session.session_id)
        return {
            "session_id": session.session_id,
            "cost": metrics.workload if metrics is not None else None,
            "created_at": session.created_at,
            "age": round(now - session.created_at, 3),
            "lifetime": session.lifetime,
            "expires_in": round(max(0.0, session.expiration - now), 3),
            "on_close_payload": session.on_close_payload,
        }

    # -- reports ------------------------------------------------------------

    def report_soon(self) -> None:
        self.metrics.update_pending = True
        self._report_now.set()

    async def send_report(self) -> None:
        async with self._send_lock:
            await self.metrics._Metrics__send_metrics_and_reset()

    async def report_loop(self) -> None:
        """The framework's report loop, woken at once by any change."""
        self._report_now.set()  # announce the worker as soon as it runs
        while True:
            await wait_event(self._report_now, REPORT_INTERVAL)
            woken = self._report_now.is_set()
            self._report_now.clear()
            stale = time.time() - self.metrics.last_metric_update >= REPORT_HEARTBEAT
            if woken or self.metrics.update_pending or stale:
                await self.send_report()

    def _on_model_loaded(self, max_throughput: float) -> None:
        # Whatever the cache or a benchmark said: capacity is one session.
        self._framework_model_loaded(max_throughput=SESSION_COST)
        self.ready = True
        log.info(
            "ready in %.2fs: max_perf %.1f, worker %s, control 127.0.0.1:%d",
            time.time() - self.started_at,
            SESSION_COST,
            self.settings.url,
            self.settings.control_port,
        )
        self.report_soon()

    def _on_model_errored(self, message: str) -> None:
        if self.ready and self.settings.backend_health_url:
            # Once ready, only the framework's health check reports errors, and
            # it passes on the bare client error.
            message = f"consumer health check {self.settings.backend_health_url} failed: {message}"
        self._framework_model_errored(message)
        log.error("worker errored: %s", message)
        self.report_soon()

    # -- opening ------------------------------------------------------------

    @refusals("/session/create")
    async def handle_create(self, request: web.Request) -> web.Response:
        body = require_object(await read_json(request), "body")
        auth_data = require_object(body.get("auth_data"), "auth_data")
        cost = finite(auth_data.get("cost"))
        if cost is None or cost < 0:
            raise Refusal(422, "auth_data.cost must be a finite number >= 0")
        request_idx = _integer_or_absent(auth_data, "request_idx")
        reqnum = _integer_or_absent(auth_data, "reqnum")
        payload = require_object(body.get("payload"), "payload")
        lifetime = self._lifetime(payload)
        on_close_route = payload.get("on_close_route")
        if on_close_route is not None and not http_url(on_close_route):
            raise Refusal(422, "payload.on_close_route must be an absolute http(s) URL or null")
        # Kept even without a callback: /status hands it to the consumer.
        on_close_payload = payload.get("on_close_payload")
        self.verifier.check(auth_data)
        return await self._open(auth_data, cost, request_idx, reqnum, lifetime, on_close_route, on_close_payload)

    def _lifetime(self, payload: dict[str, Any]) -> float:
        if "lifetime" not in payload:
            return DEFAULT_LIFETIME
        lifetime = finite(payload["lifetime"])
        if lifetime is None or lifetime <= 0:
            raise Refusal(422, "payload.lifetime must be a finite number of seconds > 0")
        if lifetime > self.settings.max_lifetime:
            raise Refusal(
                422,
                f"payload.lifetime {lifetime:g}s is above this worker's cap of {self.settings.max_lifetime:g}s "
                "(NULL_MAX_LIFETIME); keep the session alive by renewing it instead",
            )
        return lifetime

    async def _open(
        self, auth_data, cost, request_idx, reqnum, lifetime, on_close_route, on_close_payload
    ) -> web.Response:
        now = time.time()
        request_metrics = RequestMetrics(
            request_idx=request_idx,
            reqnum=reqnum,
            workload=cost,
            status="SessionActive",
            is_session=True,
            entered_queue_at=now,
            work_started_at=now,
        )
        if not self.ready or self.stopping:
            self.metrics._request_reject(request_metrics)
            self.report_soon()
            state = "stopping" if self.stopping else "not ready yet"
            raise Refusal(429, f"worker is {state}")
        async with self.backend._sessions_lock:
            if self.backend.sessions:
                self.metrics._request_reject(request_metrics)
                self.report_soon()
                raise Refusal(429, "worker is reserved: it holds a session")
            session = Session(
                session_id=secrets.token_urlsafe(12),
                lifetime=lifetime,
                expiration=now + lifetime,
                auth_data=auth_data,
                on_close_route=on_close_route,
                on_close_payload=on_close_payload,
                request_idx=request_idx or 0,
                created_at=now,
            )
            self.backend.sessions[session.session_id] = session
            self.backend.session_metrics[session.session_id] = request_metrics
            self.metrics._request_start(request_metrics)
        self.report_soon()
        self._lease_changed.set()
        log.info("session %s opened: cost %g, lifetime %gs", session.session_id, cost, lifetime)
        return web.json_response({"session_id": session.session_id, "expiration": session.expiration}, status=201)

    # -- routes that name a session -------------------------------------------

    async def _named_session(self, request: web.Request) -> Any:
        body = require_object(await read_json(request), "body")
        session_id = body.get("session_id")
        session_auth = body.get("session_auth")
        if not isinstance(session_id, str) or not session_id:
            raise Refusal(422, "session_id must be a non-empty string")
        if not isinstance(session_auth, dict):
            raise Refusal(422, "session_auth must be the session's grant (a JSON object)")
        session = self.backend.sessions.get(session_id)
        if session is None:
            return None
        if session.auth_data != session_auth:
            raise Refusal(401, "session_auth does not match the session's grant")
        return session

    @refusals("/session/end")
    async def handle_end(self, request: web.Request) -> web.Response:
        session = await self._named_session(request)
        if session is None or not await self.close(session.session_id, "dispatcher (/session/end)"):
            raise Refusal(410, "no such session: it ended or expired")
        return web.json_response({"ended": True, "removed_session": session.session_id})

    @refusals("/session/get")
    async def handle_get(self, request: web.Request) -> web.Response:
        session = await self._named_session(request)
        if session is None:
            raise Refusal(410, "no such session: it ended or expired")
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
    async def handle_health(self, request: web.Request) -> web.Response:
        session = await self._named_session(request)
        return web.json_response({"ok": session is not None})

    @refusals("/ping")
    async def handle_ping(self, request: web.Request) -> web.Response:
        """A signed no-op; with a session_id it renews that session's lease."""
        body = require_object(await read_json(request), "body")
        auth_data = require_object(body.get("auth_data"), "auth_data")
        require_object(body.get("payload"), "payload")
        session_id = body.get("session_id")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise Refusal(422, "session_id must be a non-empty string or null")
        self.verifier.check(auth_data)
        if session_id is None:
            return web.json_response({"ok": True, "ready": self.status()["ready"]})
        session = self.backend.sessions.get(session_id)
        if session is None:
            raise Refusal(410, "invalid session: it ended or expired")
        if session.auth_data != auth_data:
            raise Refusal(401, "auth_data does not match the session's grant")
        expires_in = self.renew(session, session.lifetime, shorten=False)
        return web.json_response({"ok": True, "session_id": session_id, "expires_in": expires_in})

    @refusals("/pyworker/update")
    async def handle_update(self, request: web.Request) -> web.StreamResponse:
        # With no MASTER_TOKEN the framework accepts an empty token from anyone.
        if not self.backend.mtoken:
            raise Refusal(403, "updates are disabled: MASTER_TOKEN is not set")
        return await self._framework_update_handler(request)

    # -- leases -------------------------------------------------------------

    def renew(self, session: Any, seconds: float, *, shorten: bool = True) -> float:
        """Lease to now + ``seconds``, capped; returns the seconds it now has left.

        A dispatcher's keep-alive passes ``shorten=False`` so it never cuts a
        lease the consumer extended; the consumer's own ``/extend`` sets it.
        """
        now = time.time()
        expiration = now + min(seconds, self.settings.max_lifetime)
        if shorten or expiration > session.expiration:
            session.expiration = expiration
            self._lease_changed.set()
        return round(session.expiration - now, 3)

    async def extend(self, seconds: float | None) -> dict[str, Any] | None:
        session = self.held()
        if session is None:
            return None
        granted = self.renew(session, session.lifetime if seconds is None else seconds)
        log.debug("session %s lease renewed for %.0fs", session.session_id, granted)
        return {"extended": True, "session_id": session.session_id, "expires_in": granted}

    async def expiry_loop(self) -> None:
        """Ends each session the moment its lease lapses (the framework looks every 5 s)."""
        while True:
            self._lease_changed.clear()
            now = time.time()
            for session_id, session in list(self.backend.sessions.items()):
                if session.expiration <= now:
                    await self.close(session_id, "lease expiry")
            deadlines = [s.expiration for s in self.backend.sessions.values()]
            timeout = max(0.0, min(deadlines) - time.time()) if deadlines else None
            await wait_event(self._lease_changed, timeout)

    # -- closing ------------------------------------------------------------

    async def release(self, by: str, only: str | None = None) -> list[str]:
        released = []
        for session_id in [only] if only is not None else list(self.backend.sessions):
            if await self.close(session_id, by):
                released.append(session_id)
        return released

    async def _close_for_framework(self, session_id: str) -> bool:
        session = self.backend.sessions.get(session_id)
        lapsed = session is not None and session.expiration <= time.time()
        return await self.close(session_id, "lease expiry" if lapsed else "the framework")

    async def close(self, session_id: str, by: str) -> bool:
        """Ends a session once: load drops, the report goes out, the callback is sent."""
        async with self.backend._sessions_lock:
            session = self.backend.sessions.pop(session_id, None)
            if session is None:
                return False
            request_metrics = self.backend.session_metrics.pop(session_id, None)
            session.requests.clear()
        if request_metrics is not None:
            self.metrics._request_success(request_metrics)
            self.metrics._request_end(request_metrics)
        self.report_soon()
        self._lease_changed.set()
        held_for = time.time() - session.created_at
        if by == "lease expiry":
            log.info("session %s expired after %.1fs: its lease was not renewed", session_id, held_for)
        else:
            log.info("session %s released by %s after %.1fs", session_id, by, held_for)
        if session.on_close_route:
            # Delivered beside the release: a slow callback target must not
            # keep the worker looking reserved.
            task = asyncio.ensure_future(self.backend._Backend__run_session_on_close(session))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
        return True

    async def shutdown(self, deadline: float) -> None:
        """Ends the held session and gets its report and callback out before ``deadline``."""
        self.stopping = True
        await self.release("shutdown")

        async def flush() -> None:
            await self.send_report()
            if self._callbacks:
                await asyncio.gather(*self._callbacks, return_exceptions=True)
            if self.metrics.model_metrics.requests_deleting:
                await self.metrics._Metrics__send_delete_requests_and_reset()

        try:
            await asyncio.wait_for(flush(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("stopping before the last report or on-close callback was delivered")
