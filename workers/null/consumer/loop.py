"""The consumer's session loop: for each session the worker holds, one job claimed, run, settled, then released.

Each step is published as a job event on the queue server for the dispatcher.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from random import random
from typing import Any, TypeVar

from aiohttp import web

from workers.null.aio import stop_task
from workers.null.consumer.control import ControlClient, ControlUnavailable, HeldSession, WorkerStopping
from workers.null.consumer.lease import Lease
from workers.null.consumer.options import BACKOFF_CAP, Backoff, ConsumerError, ConsumerOptions
from workers.null.consumer.runs import JobContext, Result, Run, RunFactory
from workers.null.protocol import (
    ABANDONED,
    CLAIMED,
    DEAD,
    DONE,
    FINISHED,
    RELEASED,
    RETRY,
    STARTED,
    JobEvent,
    retry_delay,
)
from workers.null.queues.base import Claim, NotOwned, Queue, QueueError, QueueUnavailable

log = logging.getLogger("workers.null.consumer")

HEALTH_HOST = "127.0.0.1"  # the worker beside it asks; nothing else need reach it
EVENT_DRAIN = 2.0  # seconds to send the last job events when stopping
T = TypeVar("T")
_STOPPED = object()


class Consumer:
    """The session loop; ``run()`` until ``stop()``. One session and one job at a time."""

    def __init__(
        self,
        queue: Queue,
        runs: RunFactory,
        options: ConsumerOptions | None = None,
        *,
        control: ControlClient | None = None,
        label: str = "",
    ):
        self.queue = queue
        self.runs = runs
        self.options = options or ConsumerOptions()
        self.control = control or ControlClient(self.options.control_port)
        self.label = label or "the queue"
        self.state = "starting"
        self.session_id: str | None = None
        self.job_id: str | None = None
        self.health_port: int | None = None
        self.jobs_done = 0
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop: no grace left
        self._events: asyncio.Queue[JobEvent | None] = asyncio.Queue()
        self._publisher: asyncio.Task | None = None
        self._quiet: set[str] = set()  # repeated warnings already logged once
        self._connected = False
        self._served: collections.deque[str] = collections.deque(maxlen=32)  # sessions already given a job

    # -- control --------------------------------------------------------------

    @property
    def window(self) -> float:
        return self.options.ack_wait or self.queue.ack_wait

    def stop(self) -> None:
        """Takes no new session; a running job gets ``grace`` seconds. A second call stops it now."""
        if self._stopping.is_set():
            if not self._hurry.is_set():
                log.info("stopping now: the running job gets no more grace")
            self._hurry.set()
            return
        log.info(
            "stopping: taking no new session%s",
            f", job {self.job_id} gets {self.options.grace:g}s" if self.job_id else "",
        )
        self._stopping.set()

    def _enter(self, state: str, message: str, *args: Any) -> None:
        self.state = state
        log.info(message, *args)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key in self._quiet:
            log.debug(message, *args)
        else:
            self._quiet.add(key)
            log.warning(message, *args)

    async def _unless_stopped(self, awaitable: Awaitable[T], *also: asyncio.Future) -> T | object:
        """The awaitable's result, or _STOPPED (having cancelled it) once stopping, or once one of ``also`` is done."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopper, *also}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                await stop_task(task)
        if task.cancelled():
            return _STOPPED
        return task.result()

    async def _sleep(self, seconds: float) -> bool:
        """Sleeps unless stopped first; False when stopped."""
        return await self._unless_stopped(asyncio.sleep(seconds)) is not _STOPPED

    # -- run ------------------------------------------------------------------

    async def run(self) -> None:
        async with self._health():
            try:
                if not await self._connect():
                    return
                self._publisher = asyncio.ensure_future(self._publish_events())
                await self._loop()
            finally:
                self.state = "stopped"
                await self._drain_events()
                with suppress(Exception):
                    await self.queue.close()
                await self.control.close()
        log.info("stopped after %d job(s) done", self.jobs_done)

    async def _connect(self) -> bool:
        self.state = "connecting to the queue"
        backoff = Backoff()
        while True:
            try:
                outcome = await self._unless_stopped(self._connect_once())
            except QueueUnavailable as exc:
                if backoff.tries == 0:
                    log.warning("queue unreachable: %s; retrying with backoff", exc)
                else:
                    log.debug("queue still unreachable: %s", exc)
                with suppress(Exception):
                    await self.queue.close()
                if not await self._sleep(backoff.next()):
                    return False
                continue
            if outcome is _STOPPED:
                return False
            self._connected = True
            log.info(
                "queue %s reachable%s: renewal window %.1fs, at most %d attempt(s) and %d deliveries per job",
                self.label,
                f" after {backoff.tries} retries" if backoff.tries else "",
                self.window,
                self.options.max_attempts,
                self.options.max_deliveries,
            )
            return True

    async def _connect_once(self) -> None:
        await self.queue.connect()
        await self.queue.check()

    async def _loop(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            if self.state != "waiting for a session":
                self._enter("waiting for a session", "waiting for a session on %s", self.control.base_url)
            try:
                held = await self._unless_stopped(self.control.claim(self.options.session_wait))
            except ControlUnavailable as exc:
                self._warn_once("control", "worker control server not answering (%s); retrying", exc)
                await self._sleep(backoff.next())
                continue
            except WorkerStopping:
                self._warn_once("stopping", "worker is stopping; waiting for it")
                await self._sleep(backoff.next())
                continue
            if held is _STOPPED:
                return
            if held is None:
                backoff.reset()
                continue
            assert isinstance(held, HeldSession)
            if held.session_id in self._served:
                # /claim answers a held session at once: this one's release did not land. One job per session.
                self._warn_once("served", "session %s already had its job; releasing it again", held.session_id)
                await self._release(held.session_id, None)
                await self._sleep(backoff.next())
                continue
            backoff.reset()
            self._quiet.clear()
            self._served.append(held.session_id)
            await self._serve(held)

    # -- one session --------------------------------------------------------

    async def _serve(self, held: HeldSession) -> None:
        sid = self.session_id = held.session_id
        self._enter("waiting for a job", "session %s claimed (lease %.1fs left)", sid, held.expires_in)
        lease = Lease(self.control, held, self.window)
        renewer = asyncio.ensure_future(lease.renew())
        watcher = asyncio.ensure_future(lease.watch())
        try:
            claim = await self._claim_job(lease)
            if claim is None:
                return
            lease.hold(claim)
            self.job_id = claim.job.id
            await self._run_job(claim, lease)
        finally:
            await stop_task(renewer)
            await stop_task(watcher)
            await self._release(sid, getattr(lease.claim, "job", None))
            self.session_id = self.job_id = None

    async def _claim_job(self, lease: Lease) -> Claim | None:
        sid = self.session_id
        try:
            claim = await self._unless_stopped(
                self.queue.claim(self.options.name, timeout=self.options.claim_timeout), lease.lost
            )
        except QueueError as exc:
            log.warning("session %s: claiming a job failed (%s); releasing", sid, exc)
            await self._sleep(BACKOFF_CAP / 5)  # a queue that errors at once must not spin the loop
            return None
        if claim is _STOPPED:
            why = lease.lost.result() if lease.lost.done() else "stopping"
            log.info("session %s: %s before a job came; releasing", sid, why)
            return None
        if claim is None:
            log.info("session %s: no job within %.1fs; releasing at once", sid, self.options.claim_timeout)
            return None
        assert isinstance(claim, Claim)
        return claim

    async def _run_job(self, claim: Claim, lease: Lease) -> None:
        job, sid = claim.job, self.session_id
        assert sid is not None
        self.emit(CLAIMED, job, sid)
        self._enter("running", "job %s attempt %d claimed for session %s", job.id, job.attempt, sid)
        # Ownership first: a lease that went, or a claim that cannot be vouched for, starts nothing.
        reason = str(lease.lost.result()) if lease.lost.done() else None
        if reason is None and not claim.owned:
            reason = "the claim ran out before the job could start"
        if reason is not None:
            detail = await self._hand_back(claim, f"{reason}; not started")
            self._outcome(claim, ABANDONED, detail)
            return
        ctx = JobContext(
            id=job.id,
            body=job.body,
            attempt=job.attempt,
            session_id=sid,
            enqueued_at=job.enqueued_at,
            failures=job.failures,
        )
        run = self.runs(ctx)
        started = time.monotonic()
        try:
            await run.start()
        except Exception as exc:  # e.g. COMMAND vanished since start-up
            await self._finish(claim, Result(False, f"could not start: {type(exc).__name__}: {exc}"), lease)
            return
        lease.running(run)
        self.emit(STARTED, job, sid)
        log.info("job %s attempt %d started (%s)", job.id, job.attempt, run.what)
        waiter = asyncio.ensure_future(run.wait())
        try:
            result = await self._await_job(waiter, lease, run)
        finally:
            if not waiter.done():
                waiter.cancel()
                with suppress(asyncio.CancelledError):
                    await waiter
        if result is None:
            return
        log.info("job %s attempt %d %s after %.2fs", job.id, job.attempt, result.detail, time.monotonic() - started)
        await self._finish(claim, result, lease)

    async def _await_job(self, waiter: asyncio.Future, lease: Lease, run: Run) -> Result | None:
        """The job's Result; None when it was stopped (lease lost, or stopping past the grace)."""
        job = lease.claim.job
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiter, lease.lost, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if waiter.done():
            return waiter.result()
        if not lease.lost.done():
            # Stopping: the job gets its grace, unless a second signal or a lost lease cuts it short.
            hurry = asyncio.ensure_future(self._hurry.wait())
            try:
                await asyncio.wait(
                    {waiter, lease.lost, hurry}, timeout=self.options.grace, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                hurry.cancel()
            if waiter.done():
                return waiter.result()
        if lease.lost.done():
            lost = lease.lost.result()
            log.warning("job %s attempt %d: %s; stopping it", job.id, job.attempt, lost)
            if lost.loss.of_claim:
                await run.kill()  # another consumer may have the job now: no grace
            else:
                await run.stop(self.options.stop_timeout)
            self._outcome(lease.claim, ABANDONED, await self._hand_back(lease.claim, str(lost)))
            return None
        log.info(
            "job %s attempt %d unfinished after %.1fs of grace; stopping it", job.id, job.attempt, self.options.grace
        )
        await run.stop(self.options.stop_timeout)
        self._outcome(lease.claim, ABANDONED, await self._hand_back(lease.claim, "consumer stopped"))
        return None

    async def _hand_back(self, claim: Claim, reason: str) -> str:
        """Gives an unfinished job back to the queue at once, while the claim is still ours; the outcome's detail.

        A claim that lapsed too is left to the queue's own redelivery after its ack wait.
        """
        try:
            await claim.hand_back()
            detail = f"{reason}; handed back at once"
        except QueueError as exc:
            detail = f"{reason}; hand-back failed ({exc}), left to the queue's redelivery"
        log.info("job %s attempt %d: %s", claim.job.id, claim.job.attempt, detail)
        return detail

    async def _finish(self, claim: Claim, result: Result, lease: Lease) -> None:
        """Ack, retry or dead-letter after the job ended; never settles a claim this consumer lost."""
        job = claim.job
        options = self.options
        try:
            if lease.lost.done() and lease.lost.result().loss.of_claim:
                raise NotOwned(str(lease.lost.result()))
            if not claim.owned:
                raise NotOwned(f"the claim was not renewed within {self.window:g}s")
            failures = job.failures + 1
            if result.ok:
                await claim.ack()
                self.jobs_done += 1
                log.info("job %s attempt %d acked", job.id, job.attempt)
                self._outcome(claim, DONE, result.detail)
            elif failures >= options.max_attempts:
                detail = f"{result.detail} (failure {failures} of --max-attempts {options.max_attempts})"
                await claim.give_up(detail)
                log.info("job %s dead-lettered after attempt %d: %s", job.id, job.attempt, detail)
                self._outcome(claim, DEAD, detail)
            else:
                delay = retry_delay(failures, options.retry_delay, options.retry_backoff, options.retry_max, random())
                await claim.retry(delay)
                log.info(
                    "job %s attempt %d failed (%s, failure %d of %d): delivered again in %.1fs",
                    job.id,
                    job.attempt,
                    result.detail,
                    failures,
                    options.max_attempts,
                    delay,
                )
                self._outcome(claim, RETRY, result.detail, retry_in=delay)
        except NotOwned as exc:
            log.warning("job %s attempt %d: not owned any more (%s); not acking it", job.id, job.attempt, exc)
            self._outcome(claim, ABANDONED, f"not owned: {exc}")
        except QueueError as exc:
            # A reply that never came: the job may or may not be done. Handlers keyed by job id make this safe.
            log.warning(
                "job %s attempt %d: the queue did not confirm (%s); left to its redelivery", job.id, job.attempt, exc
            )
            self._outcome(claim, ABANDONED, f"unconfirmed: {exc}")

    def _outcome(self, claim: Claim, outcome: str, detail: str, *, retry_in: float | None = None) -> None:
        assert self.session_id is not None
        self.emit(FINISHED, claim.job, self.session_id, outcome=outcome, detail=detail, retry_in=retry_in)

    async def _release(self, sid: str, job: Any) -> None:
        self.state = "releasing"
        try:
            released = await self.control.release(sid)
        except ControlUnavailable as exc:
            log.warning("session %s: release failed (%s); its lease will lapse", sid, exc)
            released = False
        else:
            if released:
                log.info("session %s released", sid)
            else:
                log.info("session %s was no longer held", sid)
        # Also for a session that got no job: the dispatcher counts it ended at once.
        self.emit(RELEASED, job, sid, detail="released" if released else "not held")

    # -- job events ---------------------------------------------------------

    def emit(
        self,
        kind: str,
        job: Any | None,
        session_id: str,
        *,
        outcome: str | None = None,
        detail: str = "",
        retry_in: float | None = None,
    ) -> None:
        """Queues a job event (``job`` None: a session that got no job); one task publishes them in order."""
        if not self.options.events:
            return
        job_id, attempt, failures = ("", 0, 0) if job is None else (job.id, job.attempt, job.failures)
        self._events.put_nowait(
            JobEvent(
                kind=kind,
                job_id=job_id,
                attempt=attempt,
                session_id=session_id,
                outcome=outcome,
                detail=detail,
                failures=failures,
                retry_in=retry_in,
            )
        )

    async def _publish_events(self) -> None:
        while True:
            event = await self._events.get()
            if event is None:
                return
            try:
                await self.queue.publish_event(event)
            except Exception as exc:
                self._warn_once("events", "job event %s for job %s not published: %s", event.kind, event.job_id, exc)

    async def _drain_events(self) -> None:
        if self._publisher is None:
            return
        self._events.put_nowait(None)
        try:
            await asyncio.wait_for(self._publisher, EVENT_DRAIN)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            log.warning("%d job event(s) not published before stopping", self._events.qsize())

    # -- health -------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """200 once the queue answered and while the loop runs; 503 before, so the worker is not
        marked ready while its consumer cannot take a job."""
        ok = self._connected and self.state != "stopped"
        body = {"ok": ok, "state": self.state, "session_id": self.session_id, "job_id": self.job_id}
        return (200 if ok else 503), body

    @asynccontextmanager
    async def _health(self) -> AsyncIterator[None]:
        port = self.options.health_port
        if port is None:
            yield
            return

        async def handle(request: web.Request) -> web.Response:
            status, body = self.health()
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_get("/health", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, HEALTH_HOST, port).start()
            except OSError as exc:
                raise ConsumerError(
                    f"health endpoint cannot listen on {HEALTH_HOST}:{port} ({exc.strerror or exc}): "
                    "pass --health-port with a free port"
                ) from None
            self.health_port = runner.addresses[0][1]
            log.info("health endpoint on http://%s:%d/health", HEALTH_HOST, self.health_port)
            yield
        finally:
            await runner.cleanup()
