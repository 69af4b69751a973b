"""Take one job from the queue for each session the worker is reserved for: run it, ack it, release.

``python -m workers.null.consumer --queue URL -- COMMAND [ARGS]`` runs on the
instance beside the worker. For every session:

1. ``POST /claim`` on the worker's control server answers the moment a
   session is held (no polling);
2. exactly one job is claimed from the queue (none within ``--claim-timeout``:
   the session is released at once);
3. COMMAND runs with the job body on stdin and ``NULL_JOB_ID``,
   ``NULL_JOB_ATTEMPT`` and ``NULL_SESSION_ID`` in its environment (or a
   Python handler is called), while the queue's claim and the worker's lease
   are renewed every ack_wait / 3;
4. exit 0: ack (confirmed), then ``/release``; otherwise retry later, or
   dead-letter after ``--max-attempts``, then ``/release``. A lost lease
   stops the job and hands it back to the queue at once; a lost claim stops
   it and leaves it to the queue's redelivery: nothing is acked that this
   consumer no longer owns.

Each step is published as a job event on the queue server for the dispatcher.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import functools
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from aiohttp import web

from .aio import stop_task
from .cli import DefaultsShown
from .control_client import ControlClient, ControlUnavailable, HeldSession, LeaseGone, WorkerStopping
from .queues.base import (
    ABANDONED,
    CLAIMED,
    DEAD,
    DONE,
    FINISHED,
    RELEASED,
    RETRY,
    STARTED,
    Claim,
    JobEvent,
    NotOwned,
    Queue,
    QueueError,
    QueueUnavailable,
)
from .settings import DEFAULT_CONTROL_PORT

log = logging.getLogger("workers.null.consumer")  # also when run as __main__

DEFAULT_HEALTH_PORT = 18998
HEALTH_HOST = "127.0.0.1"
SESSION_WAIT = 30.0  # each /claim's timeout; the loop asks again at once
STOP_TIMEOUT = 5.0  # after SIGTERM to a stopped job's process group, before SIGKILL
EVENT_DRAIN = 2.0  # seconds to send the last job events when stopping
BACKOFF_FIRST = 0.2
BACKOFF_CAP = 5.0
T = TypeVar("T")


class ConsumerError(Exception):
    """Bad input found at start; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class JobContext:
    """What a handler is given: the job and the session it runs for.

    ``id`` is stable across redeliveries: key side effects by it, since a job
    can run more than once (a lost ack reply, a consumer killed after the work).
    """

    id: str
    body: bytes
    attempt: int  # 1 on the first delivery
    session_id: str
    enqueued_at: float | None = None

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding)

    def json(self) -> Any:
        return json.loads(self.body)

    def env(self) -> dict[str, str]:
        """The variables COMMAND gets."""
        return {"NULL_JOB_ID": self.id, "NULL_JOB_ATTEMPT": str(self.attempt), "NULL_SESSION_ID": self.session_id}


@dataclass(frozen=True)
class Result:
    ok: bool
    detail: str  # "exit 0", "exit 3", "killed by signal 9", "ValueError: ..."


# -- running one job ---------------------------------------------------------------------


class Run:
    """One job being run; ``wait`` gives its Result, ``stop`` ends it early."""

    what = "job"

    async def start(self) -> None:
        raise NotImplementedError

    async def wait(self) -> Result:
        raise NotImplementedError

    async def stop(self, timeout: float) -> None:
        raise NotImplementedError


def _die_with_parent() -> None:
    """In COMMAND's child: SIGKILL when the consumer dies, so no orphan runs beside the next job (Linux)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class CommandRun(Run):
    """COMMAND in its own process group, the body on its stdin."""

    def __init__(self, command: Sequence[str], job: JobContext, base_env: Mapping[str, str] | None = None):
        self.command = list(command)
        self.job = job
        self.env = {**(os.environ if base_env is None else base_env), **job.env()}
        self.proc: asyncio.subprocess.Process | None = None
        self._feeder: asyncio.Task | None = None

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"command pid {self.proc.pid}" if self.proc else "command"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._feeder = asyncio.ensure_future(self._feed())

    async def _feed(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        stdin = self.proc.stdin
        try:
            stdin.write(self.job.body)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command did not read its whole stdin: its choice
        finally:
            with suppress(BrokenPipeError, ConnectionResetError):
                stdin.close()

    async def wait(self) -> Result:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._feeder is not None:
            self._feeder.cancel()
            with suppress(asyncio.CancelledError):
                await self._feeder
        if code == 0:
            return Result(True, "exit 0")
        if code < 0:
            return Result(False, f"killed by signal {-code}")
        return Result(False, f"exit {code}")

    async def stop(self, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
        except asyncio.TimeoutError:
            log.warning(
                "job %s: %s ignored SIGTERM for %.1fs; killing its process group", self.job.id, self.what, timeout
            )
        self._signal_group(signal.SIGKILL)  # whatever it left running in its group, too
        await proc.wait()

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


Handler = Callable[[JobContext], Any]


class HandlerRun(Run):
    """A Python function: async ones run as a task, plain ones in a thread."""

    def __init__(self, handler: Handler, job: JobContext):
        self.handler = handler
        self.job = job
        self.task: asyncio.Future | None = None
        self.threaded = not _is_async(handler)

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"handler {_name_of(self.handler)}"

    async def start(self) -> None:
        if self.threaded:
            loop = asyncio.get_running_loop()
            self.task = asyncio.ensure_future(self._await_result(loop.run_in_executor(None, self.handler, self.job)))
        else:
            self.task = asyncio.ensure_future(self._await_result(self.handler(self.job)))

    @staticmethod
    async def _await_result(pending: Awaitable[Any]) -> Any:
        value = await pending
        while inspect.isawaitable(value):  # a plain function that returned a coroutine
            value = await value
        return value

    async def wait(self) -> Result:
        assert self.task is not None
        try:
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            if self.task.cancelled():
                return Result(False, "cancelled")
            raise
        except Exception as exc:
            log.warning("job %s: handler raised", self.job.id, exc_info=True)
            return Result(False, f"{type(exc).__name__}: {exc}")
        return Result(True, "returned")

    async def stop(self, timeout: float) -> None:
        if self.task is None or self.task.done():
            return
        if self.threaded:
            # A thread cannot be stopped from outside; the job's outcome is
            # decided without it. Run work that must stop as COMMAND instead.
            log.warning(
                "job %s: handler %s runs in a thread and cannot be stopped; leaving it",
                self.job.id,
                _name_of(self.handler),
            )
            return
        self.task.cancel()
        with suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(self.task, timeout)


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return inspect.iscoroutinefunction(fn)
    return inspect.iscoroutinefunction(type(fn).__call__)  # an object with an async __call__


def _name_of(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


RunFactory = Callable[[JobContext], Run]


def command_runs(command: Sequence[str]) -> RunFactory:
    return lambda job: CommandRun(command, job)


def handler_runs(handler: Handler) -> RunFactory:
    return lambda job: HandlerRun(handler, job)


def load_handler(spec: str) -> Handler:
    """``module:function`` (the function may be ``Class.method``-style dotted); raises ConsumerError."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConsumerError(f"--handler {spec!r} is not module:function: give e.g. --handler myjobs:run")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConsumerError(
            f"--handler {spec!r}: cannot import {module_name!r} ({exc}): run from the folder that holds it "
            "or put it on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConsumerError(f"--handler {spec!r}: {module_name!r} has no {attr!r}: name a function it defines")
        target = getattr(target, part)
    if not callable(target):
        raise ConsumerError(f"--handler {spec!r}: {attr!r} is not callable: name a function")
    return target


# -- options ------------------------------------------------------------------------------


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ConsumerOptions:
    claim_timeout: float = 5.0  # seconds to wait for a job once a session is held
    retry_delay: float = 10.0  # seconds before a failed job is delivered again
    max_attempts: int = 3  # the attempt that fails at this number is dead-lettered
    ack_wait: float | None = None  # the queue's renewal window; None: the queue's own
    grace: float = 8.0  # seconds a running job gets after SIGTERM (docker stop kills at 10)
    control_port: int = DEFAULT_CONTROL_PORT
    health_port: int | None = DEFAULT_HEALTH_PORT  # None: no health endpoint; 0: a free port
    name: str = field(default_factory=default_name)  # this consumer's name on the queue
    session_wait: float = SESSION_WAIT
    stop_timeout: float = STOP_TIMEOUT

    def problems(self) -> list[str]:
        """One line per bad value, naming the flag and the fix."""
        checks = (
            (_positive(self.claim_timeout), f"--claim-timeout {self.claim_timeout:g}: give seconds > 0"),
            (
                _finite(self.retry_delay) and self.retry_delay >= 0,
                f"--retry-delay {self.retry_delay:g}: give seconds >= 0",
            ),
            (self.max_attempts >= 1, f"--max-attempts {self.max_attempts}: give 1 or more"),
            (self.ack_wait is None or _positive(self.ack_wait), f"--ack-wait {self.ack_wait}: give seconds > 0"),
            (_finite(self.grace) and self.grace >= 0, f"--grace {self.grace:g}: give seconds >= 0"),
            (1 <= self.control_port <= 65535, f"--control-port {self.control_port}: give a port 1-65535"),
            (
                self.health_port is None or 0 <= self.health_port <= 65535,
                f"--health-port {self.health_port}: give a port 0-65535 (0: a free one)",
            ),
            (bool(self.name.strip()), "--name is empty: give this consumer a name, or leave the default"),
            (_positive(self.session_wait) and self.session_wait <= 300, "session wait: give seconds in (0, 300]"),
        )
        return [message for ok, message in checks if not ok]


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive(x: float) -> bool:
    return _finite(x) and x > 0


class Backoff:
    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP):
        self.first, self.cap, self.tries = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2**self.tries))
        self.tries += 1
        return delay

    def reset(self) -> None:
        self.tries = 0


_STOPPED = object()


# -- the loop -----------------------------------------------------------------------------


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
                "queue %s reachable%s: renewal window %.1fs, at most %d attempt(s) per job",
                self.label,
                f" after {backoff.tries} retries" if backoff.tries else "",
                self.window,
                self.options.max_attempts,
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
        lease = Lease(self, held)
        renewer = asyncio.ensure_future(lease.renew())
        try:
            claim = await self._claim_job(lease)
            if claim is None:
                return
            lease.claim = claim
            lease.claim_until = time.monotonic() + self.window
            self.job_id = claim.job.id
            await self._run_job(claim, lease)
        finally:
            await stop_task(renewer)
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
        if job.attempt > self.options.max_attempts:
            detail = f"attempt {job.attempt} is past --max-attempts {self.options.max_attempts}"
            await self._finish(claim, Result(False, detail), lease)
            return
        if lease.lost.done():  # the lease went while the job was being fetched: hand it back unstarted
            reason = lease.lost.result()
            with suppress(QueueError):
                await claim.retry(0)
            log.warning("job %s attempt %d: %s before it started; handed back", job.id, job.attempt, reason)
            self._outcome(claim, ABANDONED, f"{reason}; handed back unstarted")
            return
        ctx = JobContext(id=job.id, body=job.body, attempt=job.attempt, session_id=sid, enqueued_at=job.enqueued_at)
        run = self.runs(ctx)
        started = time.monotonic()
        try:
            await run.start()
        except Exception as exc:  # e.g. COMMAND vanished since start-up
            await self._finish(claim, Result(False, f"could not start: {type(exc).__name__}: {exc}"), lease)
            return
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
            reason = lease.lost.result()
            log.warning("job %s attempt %d: %s; stopping it", job.id, job.attempt, reason)
            await run.stop(self.options.stop_timeout)
            self._outcome(lease.claim, ABANDONED, await self._hand_back(lease.claim, reason))
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
            await claim.retry(0)
            detail = f"{reason}; handed back at once"
        except QueueError as exc:
            detail = f"{reason}; hand-back failed ({exc}), left to the queue's redelivery"
        log.info("job %s attempt %d: %s", claim.job.id, claim.job.attempt, detail)
        return detail

    async def _finish(self, claim: Claim, result: Result, lease: Lease) -> None:
        """Ack, retry or dead-letter after the job ended; never acks a claim this consumer lost."""
        job = claim.job
        try:
            if result.ok:
                if lease.lost.done():
                    reason = lease.lost.result()
                    if isinstance(reason, str) and reason.startswith("claim"):
                        raise NotOwned(reason)
                if time.monotonic() > lease.claim_until or not claim.owned:
                    raise NotOwned(f"the claim was not renewed within {self.window:g}s")
                await claim.ack()
                self.jobs_done += 1
                log.info("job %s attempt %d acked", job.id, job.attempt)
                self._outcome(claim, DONE, result.detail)
            elif job.attempt >= self.options.max_attempts:
                await claim.give_up(result.detail)
                log.info("job %s dead-lettered after attempt %d: %s", job.id, job.attempt, result.detail)
                self._outcome(claim, DEAD, result.detail)
            else:
                await claim.retry(self.options.retry_delay)
                log.info(
                    "job %s attempt %d handed back for a retry in %gs", job.id, job.attempt, self.options.retry_delay
                )
                self._outcome(claim, RETRY, result.detail)
        except NotOwned as exc:
            log.warning("job %s attempt %d: not owned any more (%s); not acking it", job.id, job.attempt, exc)
            self._outcome(claim, ABANDONED, f"not owned: {exc}")
        except QueueError as exc:
            # A reply that never came: the job may or may not be done. Handlers keyed by job id make this safe.
            log.warning(
                "job %s attempt %d: the queue did not confirm (%s); left to its redelivery", job.id, job.attempt, exc
            )
            self._outcome(claim, ABANDONED, f"unconfirmed: {exc}")

    def _outcome(self, claim: Claim, outcome: str, detail: str) -> None:
        assert self.session_id is not None
        self.emit(FINISHED, claim.job, self.session_id, outcome=outcome, detail=detail)

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
        self, kind: str, job: Any | None, session_id: str, *, outcome: str | None = None, detail: str = ""
    ) -> None:
        """Queues a job event (``job`` None: a session that got no job); one task publishes them in order."""
        job_id, attempt = ("", 0) if job is None else (job.id, job.attempt)
        self._events.put_nowait(
            JobEvent(kind=kind, job_id=job_id, attempt=attempt, session_id=session_id, outcome=outcome, detail=detail)
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


class Lease:
    """The session's lease and the job's claim, renewed together every window / 3."""

    def __init__(self, consumer: Consumer, held: HeldSession):
        self.consumer = consumer
        self.session_id = held.session_id
        self.lease_until = time.monotonic() + held.expires_in
        self.claim: Claim | None = None
        self.claim_until = math.inf
        # Set to the reason once the lease or the claim is gone.
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def _lose(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)

    async def renew(self) -> None:
        consumer = self.consumer
        window = consumer.window
        while not self.lost.done():
            now = time.monotonic()
            try:
                left = await consumer.control.extend(self.session_id, window)
                self.lease_until = time.monotonic() + left
            except LeaseGone as exc:
                self._lose(f"lease gone ({exc})")
                return
            except ControlUnavailable as exc:
                if now >= self.lease_until:
                    self._lose(f"lease lapsed: the control server did not answer ({exc})")
                    return
                log.warning("session %s: lease renewal failed (%s); trying again", self.session_id, exc)
            if self.claim is not None:
                try:
                    await self.claim.keep_alive()
                    self.claim_until = now + window
                except NotOwned as exc:
                    self._lose(f"claim not owned any more ({exc})")
                    return
                except QueueError as exc:
                    if time.monotonic() >= self.claim_until:
                        self._lose(f"claim lapsed: the queue did not answer ({exc})")
                        return
                    log.warning("job %s: claim renewal failed (%s); trying again", self.claim.job.id, exc)
            await asyncio.sleep(window / 3)


# -- entry points -------------------------------------------------------------------------


def _open(url: str, ack_wait: float | None, max_attempts: int) -> Queue:
    from .queues import open_queue

    kwargs: dict[str, Any] = {"max_deliver": max_attempts}
    if ack_wait is not None:
        kwargs["ack_wait"] = ack_wait
    return open_queue(url, **kwargs)


async def serve(queue: Queue, runs: RunFactory, options: ConsumerOptions, *, label: str = "") -> int:
    """Runs the consumer until SIGTERM or SIGINT (a second one: no grace); 0 when it stopped cleanly."""
    consumer = Consumer(queue, runs, options, label=label)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, consumer.stop)
    try:
        await consumer.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def run_consumer(
    queue: str,
    handler: Handler | None = None,
    *,
    command: Sequence[str] | None = None,
    claim_timeout: float = ConsumerOptions.claim_timeout,
    retry_delay: float = ConsumerOptions.retry_delay,
    max_attempts: int = ConsumerOptions.max_attempts,
    ack_wait: float | None = None,
    grace: float = ConsumerOptions.grace,
    control_port: int | None = None,
    health_port: int | None = DEFAULT_HEALTH_PORT,
    name: str | None = None,
) -> int:
    """Consumes jobs from the queue at ``queue`` until SIGTERM or Ctrl-C; returns the exit code.

    Exactly one of ``handler`` (called with a JobContext, sync or async; it
    succeeds by returning and fails by raising) and ``command`` (argv; the
    body on stdin, exit 0 is success) says how a job runs. Raises
    ConsumerError, naming the problem, on bad input.
    """
    if (handler is None) == (command is None):
        raise ConsumerError("give exactly one of a handler and a command")
    if command is not None:
        command = list(command)
        _check_command(command)
    options = ConsumerOptions(
        claim_timeout=claim_timeout,
        retry_delay=retry_delay,
        max_attempts=max_attempts,
        ack_wait=ack_wait,
        grace=grace,
        control_port=control_port_from_env(os.environ) if control_port is None else control_port,
        health_port=health_port,
        name=name or default_name(),
    )
    problems = options.problems()
    if problems:
        raise ConsumerError(problems[0])
    try:
        q = _open(queue, ack_wait, max_attempts)
    except QueueError as exc:
        raise ConsumerError(str(exc)) from None
    runs = handler_runs(handler) if handler is not None else command_runs(command or [])
    return asyncio.run(serve(q, runs, options, label=_redact(queue)))


def _check_command(command: Sequence[str]) -> None:
    if not command:
        raise ConsumerError("no COMMAND: give one after --, e.g. -- python job.py, or pass --handler module:function")
    if shutil.which(command[0]) is None:
        raise ConsumerError(f"COMMAND {command[0]!r} is not an executable file or on PATH: give its path or install it")


def control_port_from_env(env: Mapping[str, str]) -> int:
    raw = (env.get("NULL_CONTROL_PORT") or "").strip()
    if not raw:
        return DEFAULT_CONTROL_PORT
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConsumerError(
            f"NULL_CONTROL_PORT={raw!r} is not a port number (1-65535): set it to the worker's control port or unset it"
        )
    return port


def _redact(url: str) -> str:
    """The URL without a password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return url


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = ConsumerOptions(name="HOST-PID")
    parser = OneLineParser(
        prog="python -m workers.null.consumer",
        usage="%(prog)s --queue URL [options] (-- COMMAND [ARGS] | --handler module:function)",
        description=(
            "For each session the worker beside it is reserved for, take one job from the queue, run it, "
            "ack it (or retry / dead-letter it), then release the worker. SIGTERM: no new session, the "
            "running job gets --grace seconds, exit 0."
        ),
        formatter_class=DefaultsShown,
    )
    parser.add_argument(
        "--queue", required=True, metavar="URL", help="nats://host:4222/STREAM or redis://host:6379/0?stream=S&group=G"
    )
    parser.add_argument(
        "--handler", metavar="MODULE:FUNCTION", help="call this Python function with each job instead of COMMAND"
    )
    parser.add_argument(
        "--claim-timeout",
        type=float,
        default=defaults.claim_timeout,
        help="seconds to wait for a job once a session is held; none: release at once",
    )
    parser.add_argument(
        "--retry-delay", type=float, default=defaults.retry_delay, help="seconds before a failed job is delivered again"
    )
    parser.add_argument(
        "--max-attempts", type=int, default=defaults.max_attempts, help="a job failing on this attempt is dead-lettered"
    )
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=None,
        help="the queue's claim window in seconds, as the dispatcher set it (default: the queue's own)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace,
        help="seconds a running job gets after SIGTERM before it is stopped and handed back",
    )
    parser.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="the worker's control port (default: NULL_CONTROL_PORT, else 18999)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=defaults.health_port,
        help="serve GET /health on 127.0.0.1 at this port for BACKEND_HEALTH_URL (0: a free port, logged)",
    )
    parser.add_argument("--name", default=None, help="this consumer's name on the queue (default: HOST-PID)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(our flags, COMMAND) split at the first ``--``."""
    argv = list(argv)
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s consumer %(levelname)s %(message)s"
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = build_arg_parser()
    flags, command = split_command(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(flags)
    try:
        if args.handler and command:
            raise ConsumerError("both --handler and a COMMAND: give one of them")
        if args.handler:
            runs = handler_runs(load_handler(args.handler))
        else:
            _check_command(command)
            runs = command_runs(command)
        options = ConsumerOptions(
            claim_timeout=args.claim_timeout,
            retry_delay=args.retry_delay,
            max_attempts=args.max_attempts,
            ack_wait=args.ack_wait,
            grace=args.grace,
            control_port=control_port_from_env(env) if args.control_port is None else args.control_port,
            health_port=args.health_port,
            name=args.name if args.name is not None else default_name(),
        )
        problems = options.problems()
        if problems:
            parser.error(problems[0])
        try:
            queue = _open(args.queue, args.ack_wait, args.max_attempts)
        except QueueError as exc:
            raise ConsumerError(str(exc)) from None
        configure_logging(args.verbose)
        return asyncio.run(serve(queue, runs, options, label=_redact(args.queue)))
    except ConsumerError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop took over SIGINT: nothing was claimed yet
        return 0


__all__ = [
    "Consumer",
    "ConsumerError",
    "ConsumerOptions",
    "JobContext",
    "Result",
    "run_consumer",
    "serve",
]

if __name__ == "__main__":
    sys.exit(main())
