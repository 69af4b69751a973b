"""The dispatcher: keeps Vast sessions in step with a job queue, one session per job.

For every job no session covers it asks the autoscaler for one session
(``endpoint.session(cost=100, lifetime=...)``); a consumer beside the worker
that gets it takes one job, runs it, acks it and releases the worker. How
many to open is ``ledger.to_open``; what the dispatcher knows comes by push:
the queue's new-job feed and the consumers' job events. The queue's counts
are read only as a backstop (every ``--reconcile`` seconds, and when a lost
worker's job is due back), and a worker is asked about a session only to
learn that it was lost: a killed worker sends no callback.

Leases stay short and the consumer renews them, so a dispatcher that dies
leaks nothing; one restarted picks up from the queue's counts, and jobs in
flight never get a second session.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from workers.null.aio import stop_task, wait_any
from workers.null.cli import Interrupt, StartupError, short
from workers.null.dispatch import sdk
from workers.null.dispatch.ledger import DEFAULT_MAX_SESSIONS, Ledger, SessionRecord
from workers.null.protocol import SESSION_COST
from workers.null.queues import open_queue
from workers.null.queues.base import GAP, Queue, QueueError

log = logging.getLogger("workers.null.dispatcher")
jobs_log = logging.getLogger("workers.null.dispatcher.jobs")  # one line per job step; quiet under the live view

HEALTH_TIMEOUT = 3.0
CLOSE_TIMEOUT = 10.0
FEED_RETRY_FIRST = 1.0  # first pause before a broken push feed is reopened (doubles, to FEED_RETRY_MAX)
FEED_RETRY_MAX = 30.0
CONNECT_TIMEOUT = 5.0  # seconds to reach the queue server at start (a server still starting gets that long)


@dataclass(frozen=True)
class DispatchOptions:
    max_sessions: int = DEFAULT_MAX_SESSIONS
    lifetime: float = 60.0  # the session's lease; the consumer renews it every lifetime/3
    timeout: float = 600.0  # seconds a session may wait for a worker; then it is asked for again
    reconcile_every: float = 10.0  # read the queue's counts this often (a backstop)
    health_every: float = 5.0  # ask each reserved session's worker whether it still holds it
    gone_confirm: float = 1.0  # a session a worker no longer holds: wait this long for its events
    error_backoff: float = 2.0  # first pause after a session could not be asked for (doubles, to 30 s)


class Dispatcher:
    """Opens sessions as the ledger says, and feeds the ledger what the queue and the SDK tell."""

    def __init__(
        self,
        queue: Queue,
        endpoint: Any,
        options: DispatchOptions,
        ledger: Ledger,
        *,
        routing_stop: asyncio.Event,
    ):
        self.queue = queue
        self.endpoint = endpoint
        self.options = options
        self.ledger = ledger
        self.routing_stop = routing_stop  # set: the guarded endpoint routes no more creates
        self.stopping = False
        self.sdk_sessions: dict[int, Any] = {}
        self.creations: dict[int, list[Any]] = {}
        self.session_tasks: dict[int, asyncio.Future[None]] = {}
        self.changed = asyncio.Event()  # the ledger changed: see whether to open sessions
        self.ended = asyncio.Event()  # a session ended
        self.reconcile_now = asyncio.Event()  # read the queue's counts at once
        self.rewait = asyncio.Event()  # a lost job's due time was added: recompute the reconcile wait
        self._loops: list[asyncio.Future[None]] = []
        self._backoff = 0.0
        self._paused_until = 0.0
        self._checking: set[int] = set()
        self.first_job_seen: float | None = None

    # -- running ------------------------------------------------------------

    async def start(self) -> None:
        """Subscribes to both feeds before reading the queue's counts, so nothing falls between them."""
        jobs, events = self.queue.new_jobs(), self.queue.events()
        await jobs.start()
        await events.start()
        self._loops = [
            asyncio.ensure_future(self._pump(jobs, self.queue.new_jobs, self._on_job)),
            asyncio.ensure_future(self._pump(events, self.queue.events, self._on_event)),
            asyncio.ensure_future(self._reconcile_loop()),
            asyncio.ensure_future(self._health_loop()),
            asyncio.ensure_future(self._open_loop()),
        ]
        await self.reconcile()
        log.info(
            "dispatching: %d job(s) waiting in the queue, up to %d session(s) at once",
            self.ledger.pending,
            self.options.max_sessions,
        )

    async def aclose(self) -> None:
        await asyncio.gather(*(stop_task(task) for task in self._loops))
        await asyncio.gather(*(stop_task(task) for task in list(self.session_tasks.values())))
        with suppress(Exception):
            closes = list(getattr(self.endpoint, "late_closes", ()))
            if closes:
                await asyncio.wait(closes, timeout=CLOSE_TIMEOUT)

    def _wake(self) -> None:
        self.changed.set()

    async def _pump(self, feed: Any, reopen: Any, handle: Any) -> None:
        """Hands each pushed item on. A ``GAP`` (the feed was cut off and is back) means something pushed meanwhile
        may be missing, so the counts are read at once. A feed that fails is reopened with backoff; until then the
        counts, read every ``--reconcile`` seconds, keep the sessions right, only slower."""
        pause = FEED_RETRY_FIRST
        while True:
            try:
                async for item in feed:
                    if item is GAP:
                        log.info("the queue's feed was cut off and is back: reading the queue's counts now")
                        self.reconcile_now.set()
                    else:
                        handle(item)
                    pause = FEED_RETRY_FIRST
                raise QueueError("the feed ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "the queue's push feed broke (%s); reading the counts every %gs, reopening it in %gs",
                    short(exc),
                    self.options.reconcile_every,
                    pause,
                )
            finally:
                with suppress(Exception):
                    await feed.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, FEED_RETRY_MAX)
            self.reconcile_now.set()
            try:
                feed = reopen()
                await feed.start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("the queue's push feed could not be reopened: %s", short(exc))
                feed = _FailedFeed(exc)

    def _on_job(self, job_id: str) -> None:
        if self.first_job_seen is None:
            self.first_job_seen = time.time()
        self.ledger.job_published(job_id)
        self._wake()

    def _on_event(self, ev: Any) -> None:
        due = len(self.ledger.due)
        self.ledger.event(ev)
        rec = self.ledger.by_sid.get(ev.session_id)
        where = f"session {rec.key}" if rec else f"session {ev.session_id}"
        outcome = f" {ev.outcome}" if ev.outcome else ""
        jobs_log.info("job %s attempt %d %s%s (%s)", ev.job_id or "-", ev.attempt, ev.kind, outcome, where)
        if rec is not None and not rec.alive:
            self.ended.set()
        if len(self.ledger.due) != due:
            self.rewait.set()
        self._wake()

    # -- opening sessions -------------------------------------------------------

    async def _open_loop(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            if self.stopping:
                continue
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
                if self.stopping:
                    continue
            n = self.ledger.to_open(self.options.max_sessions)
            if n <= 0:
                continue
            led = self.ledger
            log.info(
                "asking for %d session(s): %d job(s) pending, %d session(s) unclaimed, %d alive",
                n,
                led.pending,
                led.unclaimed,
                led.alive,
            )
            for _ in range(n):
                rec = led.session_asked()
                self.session_tasks[rec.key] = asyncio.ensure_future(self._session(rec))

    async def _session(self, rec: SessionRecord) -> None:
        creations = self.creations.setdefault(rec.key, [])
        try:
            try:
                session = await sdk.open_session(
                    self.endpoint,
                    cost=SESSION_COST,
                    lifetime=self.options.lifetime,
                    timeout=self.options.timeout,
                    creations=creations,
                )
            except sdk.SessionTimeout:
                self._end(rec, "timed out")
                log.info(
                    "session %d: no worker within %gs; asking again if still needed", rec.key, self.options.timeout
                )
                return
            except asyncio.CancelledError:
                self._end(rec, "not opened (stopping)")
                raise
            except sdk.Interrupted:
                self._end(rec, "not opened (stopping)")
                return
            except Exception as exc:
                if self.stopping:
                    self._end(rec, "not opened (stopping)")
                    return
                self._end(rec, f"failed: {short(exc)}")
                now = time.monotonic()
                if now >= self._paused_until:  # failures together count once
                    self._backoff = min(30.0, self._backoff * 2 or self.options.error_backoff)
                    self._paused_until = now + self._backoff
                log.warning("session %d: could not be opened (%s); pausing %gs", rec.key, short(exc), self._backoff)
                return
            self._backoff = 0.0
            self.sdk_sessions[rec.key] = session
            self.ledger.session_reserved(rec, str(session.session_id), str(session.url))
            jobs_log.info(
                "session %d reserved on %s after %.1fs (session %s)",
                rec.key,
                session.url,
                rec.reserved_at - rec.asked_at,
                session.session_id,
            )
            if not rec.alive:
                self.ended.set()
            self._wake()
        finally:
            self.creations.pop(rec.key, None)
            self.session_tasks.pop(rec.key, None)

    def _end(self, rec: SessionRecord, how: str) -> None:
        self.ledger.session_ended(rec, how)
        self.sdk_sessions.pop(rec.key, None)
        self.ended.set()
        self._wake()

    # -- the backstops ----------------------------------------------------------

    async def reconcile(self, tries: int = 20) -> bool:
        """Reads the queue's counts at a moment no push arrives; False when none was quiet enough."""
        self.ledger.workers_seen(await sdk.workers_holding_a_session(self.endpoint, HEALTH_TIMEOUT))
        for _ in range(tries):
            version = self.ledger.version
            try:
                depth = await self.queue.depth()
            except QueueError as exc:
                log.warning("reading the queue's counts failed: %s", exc)
                return False
            if self.ledger.version == version:
                self.ledger.depth_seen(depth)
                self._wake()
                return True
            await asyncio.sleep(0.05)
        return False

    async def _reconcile_loop(self) -> None:
        next_read = time.monotonic() + self.options.reconcile_every
        while True:
            wait = next_read - time.monotonic()
            due = self.ledger.next_due()
            if due is not None:
                # The queue hands a lost worker's job back AckWait after its last renewal.
                wait = min(wait, due - time.time() + 0.2)
            self.rewait.clear()
            await wait_any([self.reconcile_now, self.rewait], wait)
            if self.rewait.is_set() and not self.reconcile_now.is_set():
                continue
            self.reconcile_now.clear()
            if self.ledger.tick():
                log.info("a lost worker's job is due back from the queue: asking for a session")
                self._wake()
            await self.reconcile()
            next_read = time.monotonic() + self.options.reconcile_every

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_every)
            for rec in list(self.ledger.sessions.values()):
                session = self.sdk_sessions.get(rec.key)
                if rec.alive and session is not None and rec.key not in self._checking:
                    self._checking.add(rec.key)
                    asyncio.ensure_future(self._check(rec, session))

    async def _check(self, rec: SessionRecord, session: Any) -> None:
        try:
            try:
                alive = await asyncio.wait_for(sdk.session_alive(self.endpoint, session), HEALTH_TIMEOUT)
            except asyncio.TimeoutError:
                alive = False
            if alive or not rec.alive:
                return
            # Its consumer may have released it a moment ago: give the events time to arrive.
            await asyncio.sleep(self.options.gone_confirm)
            if not rec.alive:
                return
            self.ledger.session_gone(rec)
            self.sdk_sessions.pop(rec.key, None)
            if rec.end == "lost":
                log.warning(
                    "session %d: its worker %s is gone while running job %s; the queue hands the job back "
                    "within %gs (AckWait)",
                    rec.key,
                    rec.url,
                    rec.job_id,
                    self.ledger.ack_wait,
                )
            else:
                jobs_log.info("session %d ended without a job", rec.key)
            self.ended.set()
            self.rewait.set()
            self._wake()
        finally:
            self._checking.discard(rec.key)

    # -- stopping ---------------------------------------------------------------

    async def drain(self, hurry: asyncio.Event | None = None) -> bool:
        """Opens no more sessions, lets running jobs finish; True when every session ended before ``hurry``."""
        self.stopping = True
        self.routing_stop.set()
        for key, task in list(self.session_tasks.items()):
            if not sdk.create_sent(self.creations.get(key, [])):
                task.cancel()
        # A reserved session no consumer took a job on yet starts nothing: close it.
        idle = [r for r in self.ledger.sessions.values() if r.alive and r.reserved and r.job_id is None]
        await asyncio.gather(*(self._close(r) for r in idle))
        running = self.ledger.alive
        if running:
            log.info(
                "stopping: %d session(s) still running a job; they finish first (Ctrl-C again closes them now)",
                running,
            )
        while self.ledger.alive:
            self.ended.clear()
            stops = [self.ended] + ([hurry] if hurry is not None else [])
            await wait_any(stops, self.options.health_every)
            if hurry is not None and hurry.is_set():
                return False
        return True

    async def close_all(self) -> None:
        """Closes every session at once; a running job is handed back by its consumer."""
        self.stopping = True
        self.routing_stop.set()
        for task in list(self.session_tasks.values()):
            task.cancel()
        await asyncio.gather(*(self._close(r) for r in list(self.ledger.sessions.values()) if r.alive))

    async def _close(self, rec: SessionRecord) -> None:
        session = self.sdk_sessions.get(rec.key)
        if session is None:
            if not rec.reserved:
                self._end(rec, "not opened (stopping)")
            return
        try:
            error = await asyncio.wait_for(sdk.close_session(self.endpoint, session), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            error = f"no answer in {CLOSE_TIMEOUT:g}s"
        if error:
            log.warning(
                "session %d: closing failed (%s); its lease lapses within %gs", rec.key, error, self.options.lifetime
            )
        self._end(rec, "closed")


async def connect_queue(
    url: str, *, ack_wait: float, max_deliveries: int, setup: bool, connect_timeout: float = CONNECT_TIMEOUT
) -> Queue:
    """A connected queue whose stream exists (created with ``setup``); StartupError (exit 2) otherwise."""
    try:
        queue = open_queue(url, ack_wait=ack_wait, max_deliver=max_deliveries, connect_timeout=connect_timeout)
    except QueueError as exc:
        raise StartupError(str(exc), code=2) from None
    try:
        await queue.connect()
    except QueueError as exc:
        raise StartupError(str(exc), code=2) from None
    try:
        if setup:
            await queue.setup()
        else:
            await queue.check()
    except QueueError as exc:
        await queue.close()
        raise StartupError(str(exc), code=2) from None
    return queue


async def dispatch_until_stopped(dispatcher: Dispatcher, interrupt: Interrupt) -> int:
    """Dispatches until a signal; then drains, or closes everything on a second signal."""
    await interrupt.event.wait()
    if await dispatcher.drain(hurry=interrupt.again):
        log.info("every session ended; stopping")
        return 0
    await dispatcher.close_all()
    return 128 + (interrupt.signum or signal.SIGINT)


class _FailedFeed:
    """A feed that could not be reopened: it fails at once, so the pump waits and tries again."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __aiter__(self) -> _FailedFeed:
        return self

    async def __anext__(self) -> Any:
        raise self.error

    async def aclose(self) -> None:
        pass
