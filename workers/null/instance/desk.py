"""The worker's desk, on the instance: its one reservation (open, claim, renew, release, expire, report).

The framework keeps sessions in ``Backend.sessions`` and load in its metrics;
this desk uses that same state, so the framework's reports, delete-requests
and garbage collection stay true, and gets every change to the autoscaler at
once instead of on the framework's one-second tick. The routes that change it
(``routes.py`` and ``control.py``) parse and verify what they are sent, then
call the desk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import secrets
import time
from typing import Any

from vastai.serverless.server.lib.data_types import RequestMetrics, Session

from workers.null.aio import wait_any
from workers.null.instance import framework
from workers.null.instance.bodies import CreateRequest, Refusal
from workers.null.instance.settings import Settings
from workers.null.protocol import SESSION_COST

log = logging.getLogger(__name__)

REPORT_INTERVAL = 1.0
# A consumer that claims sessions is taken for gone (or frozen) when it has not called the control
# server for this long while the worker holds no session and no /claim waits: the worker then takes
# no session and its health check fails, so the autoscaler routes elsewhere and replaces it.
CONSUMER_GRACE = 10.0
REPORT_HEARTBEAT = 10.0
# Grants that end without a session are reported finished under these statuses;
# only the framework's "Rejected" (busy) makes the autoscaler route again.
UNUSED = "Unused"
REFUSED = "Refused"


class Ending(enum.Enum):
    """Who or what ended a session; the value is how the log names it."""

    CONSUMER = "consumer (/release)"
    DISPATCHER = "dispatcher (/session/end)"
    LEASE_EXPIRY = "lease expiry"
    CLAIM_DEADLINE = "the claim deadline"
    FRAMEWORK = "the framework"
    SHUTDOWN = "shutdown"


class SessionDesk:
    def __init__(self, settings: Settings, backend: Any, *, started_at: float | None = None):
        self.settings = settings
        self.backend = backend
        self.metrics = backend.metrics
        self.ready = False
        self.stopping = False
        self.started_at = time.time() if started_at is None else started_at
        self.originals: framework.Originals | None = None
        self._report_now = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._lease_changed = asyncio.Event()
        self._held = asyncio.Event()  # set while a session is held
        self._stopped = asyncio.Event()
        self._claimed: set[str] = set()
        self._jobs: dict[str, str] = {}  # session id -> the job its consumer named in /extend
        self._claims_waiting = 0
        self._consumer_seen: float | None = None  # monotonic; None until a consumer first claimed
        self._callbacks: set[asyncio.Task] = set()
        # The sessions the claim deadline released, newest last, for /status.
        self.unclaimed_releases: list[str] = []

    # -- state --------------------------------------------------------------

    def held(self) -> Any | None:
        return next(iter(self.backend.sessions.values()), None)

    def holds(self, session_id: str) -> bool:
        return session_id in self.backend.sessions

    def status(self) -> dict[str, Any]:
        session = self.held()
        error = self.metrics.model_metrics.error_msg
        return {
            "ready": self.ready and not error and not self.stopping,
            "error": error or None,
            "worker_url": self.settings.url,
            "session": None if session is None else self.describe(session),
            "claim_deadline": self.settings.claim_deadline,
            "released_unclaimed": len(self.unclaimed_releases),
            "consumer": self.consumer_state(),
        }

    # -- the consumer ---------------------------------------------------------

    def consumer_seen(self, *, claimed: bool = False) -> None:
        """A consumer called. Only a ``/claim`` starts the judging: a consumer that only releases is never judged."""
        if claimed or self._consumer_seen is not None:
            self._consumer_seen = time.monotonic()

    def consumer_gone(self) -> str | None:
        """Why no consumer can take a session now (None: one can, or none ever claimed).

        A consumer that never calls /claim (it takes jobs and calls /release only)
        is never judged: the worker then behaves as before any claim.
        """
        if self._consumer_seen is None or self._claims_waiting or self.held() is not None:
            return None
        quiet = time.monotonic() - self._consumer_seen
        if quiet < CONSUMER_GRACE:
            return None
        return f"no consumer has called the control server for {quiet:.0f}s (gone or frozen)"

    def consumer_state(self) -> dict[str, Any]:
        seen = self._consumer_seen
        return {
            "claims_waiting": self._claims_waiting,
            "seen_ago": None if seen is None else round(time.monotonic() - seen, 3),
            "gone": self.consumer_gone(),
        }

    def describe(self, session: Any) -> dict[str, Any]:
        now = time.time()
        metrics = self.backend.session_metrics.get(session.session_id)
        claimed = session.session_id in self._claimed
        deadline = self._claim_deadline(session)
        return {
            "session_id": session.session_id,
            "cost": metrics.workload if metrics is not None else None,
            "created_at": session.created_at,
            "age": round(now - session.created_at, 3),
            "lifetime": session.lifetime,
            "expires_in": round(max(0.0, session.expiration - now), 3),
            "on_close_payload": session.on_close_payload,
            "claimed": claimed,
            "job_id": self._jobs.get(session.session_id),
            "claim_deadline_in": None if deadline is None else round(max(0.0, deadline - now), 3),
        }

    # -- reports ------------------------------------------------------------

    def report_soon(self) -> None:
        self.metrics.update_pending = True
        self._report_now.set()

    async def send_report(self) -> None:
        async with self._send_lock:
            await framework.send_report(self.metrics)

    async def report_loop(self) -> None:
        """The framework's report loop, woken at once by any change."""
        self._report_now.set()  # announce the worker as soon as it runs
        while True:
            await wait_any([self._report_now], REPORT_INTERVAL)
            woken = self._report_now.is_set()
            self._report_now.clear()
            stale = time.time() - self.metrics.last_metric_update >= REPORT_HEARTBEAT
            if woken or self.metrics.update_pending or stale:
                await self.send_report()

    def on_model_loaded(self, max_throughput: float) -> None:
        # Whatever the cache or a benchmark said: capacity is one session.
        assert self.originals is not None
        self.originals.model_loaded(max_throughput=SESSION_COST)
        self.ready = True
        log.info(
            "ready in %.2fs: max_perf %.1f, worker %s, control 127.0.0.1:%d",
            time.time() - self.started_at,
            SESSION_COST,
            self.settings.url,
            self.settings.control_port,
        )
        self.report_soon()

    def on_model_errored(self, message: str) -> None:
        assert self.originals is not None
        if self.ready and self.settings.backend_health_url:
            # Once ready, only the framework's health check reports errors, and
            # it passes on the bare client error.
            message = f"consumer health check {self.settings.backend_health_url} failed: {message}"
        elif self.ready:
            gone = self.consumer_gone()
            message = f"consumer gone: {gone}" if gone else message
        self.originals.model_errored(message)
        log.error("worker errored: %s", message)
        self.report_soon()

    def grant_ended(self, request_idx: int | None, *, used: bool) -> None:
        """Reports at once a verified grant that ends without a session, so it stops counting as load.

        ``used``: the grant was served (a bare /ping); otherwise it was refused for
        its body, which the autoscaler must not take as busy and route again.
        """
        if request_idx is None:
            return
        now = time.time()
        request = RequestMetrics(
            request_idx=request_idx,
            reqnum=request_idx,
            workload=0.0,
            status="Started",
            entered_queue_at=now,
            work_started_at=now,
        )
        if used:
            framework.open_request(self.metrics, request)
            framework.finish_request(self.metrics, request)
            request.status = UNUSED
        else:
            framework.refuse_request(self.metrics, request, REFUSED)
        self.report_soon()

    # -- opening ------------------------------------------------------------

    def _session_metrics(self, create: CreateRequest, now: float) -> RequestMetrics:
        return RequestMetrics(
            request_idx=create.request_idx,
            reqnum=create.reqnum,
            workload=SESSION_COST,
            status="SessionActive",
            is_session=True,
            entered_queue_at=now,
            work_started_at=now,
        )

    async def open(self, create: CreateRequest) -> Any:
        """Holds a session for ``create``'s verified grant; a 429 Refusal when the worker cannot."""
        now = time.time()
        request_metrics = self._session_metrics(create, now)
        if not self.ready or self.stopping:
            framework.reject_request(self.metrics, request_metrics)
            self.report_soon()
            state = "stopping" if self.stopping else "not ready yet"
            raise Refusal(429, f"worker is {state}")
        gone = self.consumer_gone()
        if gone is not None:
            framework.reject_request(self.metrics, request_metrics)
            self.report_soon()
            raise Refusal(429, f"worker takes no session: {gone}")
        async with framework.sessions_lock(self.backend):
            if self.backend.sessions:
                framework.reject_request(self.metrics, request_metrics)
                self.report_soon()
                raise Refusal(429, "worker is reserved: it holds a session")
            session = Session(
                session_id=secrets.token_urlsafe(12),
                lifetime=create.lifetime,
                expiration=now + create.lifetime,
                auth_data=create.auth_data,
                on_close_route=create.on_close_route,
                on_close_payload=create.on_close_payload,
                request_idx=create.request_idx or 0,
                created_at=now,
            )
            self.backend.sessions[session.session_id] = session
            self.backend.session_metrics[session.session_id] = request_metrics
            framework.open_request(self.metrics, request_metrics)
        self._held.set()
        self.report_soon()
        self._lease_changed.set()
        log.info("session %s opened: cost %g, lifetime %gs", session.session_id, create.cost, create.lifetime)
        return session

    # -- claims -------------------------------------------------------------

    async def claim(self, timeout: float) -> Any | None:
        """The held session, waiting up to ``timeout`` for one; it counts as claimed from now."""
        if self.stopping:
            raise Refusal(503, "worker is stopping")
        self.consumer_seen(claimed=True)
        if self.held() is None:
            self._claims_waiting += 1
            try:
                await wait_any([self._held, self._stopped], timeout)
            finally:
                self._claims_waiting -= 1
                self.consumer_seen(claimed=True)
        if self.stopping:
            raise Refusal(503, "worker is stopping")
        session = self.held()
        if session is not None:
            self.mark_claimed(session.session_id)
        return session

    def mark_claimed(self, session_id: str) -> None:
        if session_id in self.backend.sessions and session_id not in self._claimed:
            self._claimed.add(session_id)
            self._lease_changed.set()
            log.info("session %s claimed", session_id)

    def _claim_deadline(self, session: Any) -> float | None:
        if self.settings.claim_deadline is None or session.session_id in self._claimed:
            return None
        return session.created_at + self.settings.claim_deadline

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

    def extend(
        self, session_id: str | None, seconds: float | None, *, job_id: str | None = None
    ) -> dict[str, Any] | None:
        self.consumer_seen()
        session = self.held() if session_id is None else self.backend.sessions.get(session_id)
        if session is None:
            return None
        self.mark_claimed(session.session_id)
        if job_id is not None and self._jobs.get(session.session_id) != job_id:
            self._jobs[session.session_id] = job_id
            log.info("session %s runs job %s", session.session_id, job_id)
        granted = self.renew(session, session.lifetime if seconds is None else seconds)
        log.debug("session %s lease renewed for %.0fs", session.session_id, granted)
        return {"extended": True, "session_id": session.session_id, "expires_in": granted}

    async def expiry_loop(self) -> None:
        """Ends each session the moment its lease lapses, or its claim deadline passes unclaimed.

        The framework looks for lapsed leases every 5 s; this looks at each deadline.
        """
        while True:
            self._lease_changed.clear()
            now = time.time()
            deadlines = []
            for session_id, session in list(self.backend.sessions.items()):
                claim_by = self._claim_deadline(session)
                if session.expiration <= now:
                    await self.close(session_id, Ending.LEASE_EXPIRY)
                elif claim_by is not None and claim_by <= now:
                    self.unclaimed_releases.append(session_id)
                    del self.unclaimed_releases[:-100]
                    log.warning(
                        "session %s released: no consumer claimed it within NULL_CLAIM_DEADLINE %gs",
                        session_id,
                        self.settings.claim_deadline,
                    )
                    await self.close(session_id, Ending.CLAIM_DEADLINE)
                else:
                    deadlines += [session.expiration] + ([claim_by] if claim_by is not None else [])
            timeout = max(0.0, min(deadlines) - time.time()) if deadlines else None
            await wait_any([self._lease_changed], timeout)

    # -- closing ------------------------------------------------------------

    async def release(self, by: Ending, only: str | None = None) -> list[str]:
        released = []
        for session_id in [only] if only is not None else list(self.backend.sessions):
            if await self.close(session_id, by):
                released.append(session_id)
        return released

    async def close_for_framework(self, session_id: str) -> bool:
        session = self.backend.sessions.get(session_id)
        lapsed = session is not None and session.expiration <= time.time()
        return await self.close(session_id, Ending.LEASE_EXPIRY if lapsed else Ending.FRAMEWORK)

    async def close(self, session_id: str, by: Ending) -> bool:
        """Ends a session once: load drops, the report goes out, the callback is sent."""
        async with framework.sessions_lock(self.backend):
            session = self.backend.sessions.pop(session_id, None)
            if session is None:
                return False
            request_metrics = self.backend.session_metrics.pop(session_id, None)
            session.requests.clear()
            if not self.backend.sessions:
                self._held.clear()
        self._claimed.discard(session_id)
        self._jobs.pop(session_id, None)
        if request_metrics is not None:
            framework.finish_request(self.metrics, request_metrics)
        self.report_soon()
        self._lease_changed.set()
        held_for = time.time() - session.created_at
        if by is Ending.LEASE_EXPIRY:
            log.info("session %s expired after %.1fs: its lease was not renewed", session_id, held_for)
        else:
            log.info("session %s released by %s after %.1fs", session_id, by.value, held_for)
        if session.on_close_route:
            # Delivered beside the release: a slow callback target must not
            # keep the worker looking reserved.
            task = asyncio.ensure_future(framework.run_on_close(self.backend, _with_own_id(session)))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
        return True

    async def shutdown(self, deadline: float) -> None:
        """Ends the held session and gets its report and callback out before ``deadline``."""
        self.stopping = True
        self._stopped.set()
        await self.release(Ending.SHUTDOWN)

        async def flush() -> None:
            await self.send_report()
            if self._callbacks:
                await asyncio.gather(*self._callbacks, return_exceptions=True)
            await framework.send_finished(self.metrics)

        try:
            await asyncio.wait_for(flush(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("stopping before the last report or on-close callback was delivered")

    async def cancel_callbacks(self) -> None:
        for task in list(self._callbacks):
            task.cancel()


def _with_own_id(session: Any) -> Any:
    """The session as the callback sees it: a ``session_id`` key of the payload never hides the session's id."""
    payload = session.on_close_payload
    if isinstance(payload, dict) and payload.get("session_id", session.session_id) != session.session_id:
        return dataclasses.replace(session, on_close_payload={**payload, "session_id": session.session_id})
    return session
