"""``python -m workers.null.dispatcher``: keep Vast sessions in step with a job queue, one session per job.

    python -m workers.null.dispatcher --queue nats://host:4222/jobs --endpoint NAME --instance prod
    python -m workers.null.dispatcher --queue URL setup        # create the stream and consumer when missing
    python -m workers.null.dispatcher --instance local --jobs 20   # the whole loop on this machine (demo.py)

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

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import sdk
from .aio import stop_task, wait_any
from .cli import (
    DefaultsShown,
    Interrupt,
    OneLineParser,
    StartupError,
    missing_api_key,
    non_negative,
    positive,
    refuse_first,
    run_command,
    short,
)
from .ledger import DEFAULT_MAX_SESSIONS, Attempt, Ledger, SessionRecord
from .queues.base import Queue, QueueError

log = logging.getLogger("workers.null.dispatcher")  # the command's logger, also when run as __main__
jobs_log = logging.getLogger("workers.null.dispatcher.jobs")  # one line per job step; quiet under the live view

INSTANCES = ("prod", "alpha", "candidate", "local")
DEFAULT_ENDPOINT = "null-pyworker"
LOCAL_API_KEY = "local"
SESSION_COST = 100.0  # one session fills one null worker
HEALTH_TIMEOUT = 3.0
CLOSE_TIMEOUT = 10.0
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
        self.failed: str | None = None  # a feed broke: the dispatcher cannot go on
        self.broken = asyncio.Event()
        self._loops: list[asyncio.Future[None]] = []
        self._feeds: list[Any] = []
        self._backoff = 0.0
        self._paused_until = 0.0
        self._checking: set[int] = set()
        self.first_job_seen: float | None = None

    # -- running ------------------------------------------------------------

    async def start(self) -> None:
        """Subscribes to both feeds before reading the queue's counts, so nothing falls between them."""
        jobs, events = self.queue.new_jobs(), self.queue.events()
        self._feeds = [jobs, events]
        await jobs.start()
        await events.start()
        self._loops = [
            asyncio.ensure_future(self._pump(jobs, self._on_job)),
            asyncio.ensure_future(self._pump(events, self._on_event)),
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
        for feed in self._feeds:
            with suppress(Exception):
                await feed.aclose()
        await asyncio.gather(*(stop_task(task) for task in list(self.session_tasks.values())))
        with suppress(Exception):
            closes = list(getattr(self.endpoint, "late_closes", ()))
            if closes:
                await asyncio.wait(closes, timeout=CLOSE_TIMEOUT)

    def _wake(self) -> None:
        self.changed.set()

    async def _pump(self, feed: Any, handle: Any) -> None:
        try:
            async for item in feed:
                handle(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed = f"the queue's push feed broke: {short(exc)}"
            log.error("%s", self.failed)
            self.broken.set()

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
            stops = [self.ended, self.broken] + ([hurry] if hurry is not None else [])
            await wait_any(stops, self.options.health_every)
            if hurry is not None and hurry.is_set():
                return False
            if self.broken.is_set():
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


# -- the job log ----------------------------------------------------------------


class JobLog:
    """One JSON line per attempt, written when its outcome is known."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file: IO[str] | None = None

    def open(self) -> None:
        if self.path is not None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, row: Attempt) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row.to_dict()) + "\n")
            self._file.flush()

    def close(self, ledger: Ledger | None = None) -> None:
        if self._file is None:
            return
        if ledger is not None:
            for row in ledger.unfinished():
                data = row.to_dict()
                data["outcome"] = "unfinished"
                self._file.write(json.dumps(data) + "\n")
        self._file.close()
        self._file = None


# -- the command ------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = DispatchOptions()
    parser = OneLineParser(
        prog="python -m workers.null.dispatcher",
        usage="%(prog)s --queue URL [--endpoint NAME] [--instance ...] [options] [run | setup]\n"
        "       %(prog)s --instance local --jobs N [--job-seconds S] [--chaos K] [--deadline S] [--trace FILE]",
        description=(
            "Open one Vast session per queued job, so the autoscaler runs exactly as many workers as there "
            "are jobs no worker took yet. setup: create the stream and its durable consumer (or group) when "
            "missing, then exit. With --instance local and --jobs or --trace: run the whole loop on this "
            "machine (an embedded nats-server, the local stand-in with a consumer beside every worker). "
            "Ctrl-C: open no more sessions, let running jobs finish, exit 0; a second Ctrl-C closes them now."
        ),
        formatter_class=DefaultsShown,
    )
    parser.add_argument("action", nargs="?", choices=("run", "setup"), default="run", help="what to do")
    parser.add_argument(
        "--queue", metavar="URL", help="nats://host:4222/STREAM or redis://host:6379/0?stream=jobs&group=null"
    )
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="the Vast endpoint's name")
    parser.add_argument(
        "--instance", choices=INSTANCES, default="prod", help="Vast autoscaler to use; local: the stand-in"
    )
    parser.add_argument(
        "--max-sessions", type=int, default=defaults.max_sessions, help="sessions (so workers) at most at once"
    )
    parser.add_argument(
        "--lifetime", type=float, default=defaults.lifetime, help="session lease in seconds; the consumer renews it"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help="seconds a session waits for a worker before it is asked again",
    )
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=30.0,
        help="the queue's claim window in seconds (setup, and lost-worker timing)",
    )
    parser.add_argument(
        "--max-attempts", type=int, default=5, help="deliveries of a job before it is dead-lettered (setup)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        help="seconds to keep trying to reach the queue server at start before exiting 2",
    )
    parser.add_argument(
        "--reconcile", type=float, default=defaults.reconcile_every, help="seconds between reads of the queue's counts"
    )
    parser.add_argument(
        "--health-every",
        type=float,
        default=defaults.health_every,
        help="seconds between checks that a worker still holds its session",
    )
    parser.add_argument("--job-log", type=Path, metavar="FILE", help="append one JSON line per job attempt here")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    parser.add_argument(
        "--local-port", type=int, default=8080, help="with --instance local (no --jobs): the stand-in's port"
    )
    parser.add_argument("--plain", action="store_true", help="log lines even on a terminal (no live view)")
    parser.add_argument("--verbose", action="store_true", help="also show the SDK's own log lines")
    demo = parser.add_argument_group("the local demo (--instance local)")
    demo.add_argument("--jobs", type=int, help="publish this many demo jobs and run them all")
    demo.add_argument("--job-seconds", type=float, default=2.0, help="seconds each demo job sleeps")
    demo.add_argument("--chaos", type=int, default=0, metavar="K", help="SIGKILL K workers (and consumers) mid-job")
    demo.add_argument(
        "--deadline", type=float, help="seconds until an unfinished job counts as lost (default: generous)"
    )
    demo.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="publish jobs at their arrival, each sleeping its duration (CSV or JSON lines)",
    )
    demo.add_argument("--cold-start", type=float, default=2.0, help="seconds the stand-in takes to provision a worker")
    demo.add_argument(
        "--inactivity-timeout", type=float, default=3.0, help="the stand-in's idle seconds before a worker stops"
    )
    demo.add_argument(
        "--fleet-log",
        type=Path,
        metavar="FILE",
        help="at the end, write each worker's phases over time and the stand-in's settings here (JSON)",
    )
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    demo = args.jobs is not None or args.trace is not None
    checks = [
        (args.max_sessions >= 1, f"--max-sessions {args.max_sessions}: give 1 or more"),
        (positive(args.lifetime), f"--lifetime {args.lifetime:g}: give seconds > 0"),
        (positive(args.timeout), f"--timeout {args.timeout:g}: give seconds > 0"),
        (positive(args.ack_wait), f"--ack-wait {args.ack_wait:g}: give seconds > 0"),
        (args.max_attempts >= 1, f"--max-attempts {args.max_attempts}: give 1 or more"),
        (positive(args.connect_timeout), f"--connect-timeout {args.connect_timeout:g}: give seconds > 0"),
        (positive(args.reconcile), f"--reconcile {args.reconcile:g}: give seconds > 0"),
        (positive(args.health_every), f"--health-every {args.health_every:g}: give seconds > 0"),
        (
            args.metrics_port is None or 0 <= args.metrics_port <= 65535,
            f"--metrics-port {args.metrics_port}: give a port 0-65535",
        ),
        (0 <= args.local_port <= 65535, f"--local-port {args.local_port}: give a port 0-65535"),
    ]
    if demo:
        checks += [
            (args.instance == "local", "--jobs and --trace run the local demo: add --instance local"),
            (args.action == "run", "setup takes --queue, not --jobs or --trace"),
            (args.queue is None, "the local demo starts its own queue: drop --queue (or drop --jobs/--trace)"),
            (args.jobs is None or args.jobs >= 1, f"--jobs {args.jobs}: give 1 or more"),
            (args.jobs is None or args.trace is None, "give --jobs or --trace, not both"),
            (
                non_negative(args.job_seconds),
                f"--job-seconds {args.job_seconds:g}: give seconds >= 0",
            ),
            (args.chaos >= 0, f"--chaos {args.chaos}: give 0 or more workers to kill"),
            (args.deadline is None or positive(args.deadline), f"--deadline {args.deadline}: give seconds > 0"),
            (
                non_negative(args.cold_start),
                f"--cold-start {args.cold_start:g}: give seconds >= 0",
            ),
            (
                non_negative(args.inactivity_timeout),
                f"--inactivity-timeout {args.inactivity_timeout:g}: give seconds >= 0",
            ),
        ]
    else:
        checks += [
            (
                args.queue is not None,
                "no --queue: pass --queue nats://host:4222/jobs (or --instance local --jobs N for the demo)",
            ),
            (args.chaos == 0, "--chaos is for the local demo: add --instance local --jobs N"),
            (args.fleet_log is None, "--fleet-log is for the local demo: add --instance local --jobs N"),
        ]
    refuse_first(parser, checks)


def options_from_args(args: argparse.Namespace) -> DispatchOptions:
    return DispatchOptions(
        max_sessions=args.max_sessions,
        lifetime=args.lifetime,
        timeout=args.timeout,
        reconcile_every=args.reconcile,
        health_every=args.health_every,
    )


def configure_logging(*, live: bool, verbose: bool) -> None:
    from .cli import configure_logging as base

    base(["workers.null.dispatcher", "workers.null.demo"], verbose=verbose)
    # sdk.make_client's subclass logs under its class name: every ended session's health check at ERROR.
    logging.getLogger("Client").setLevel(logging.INFO if verbose else logging.CRITICAL)
    if live:
        jobs_log.setLevel(logging.WARNING)
        logging.getLogger("lib").setLevel(logging.WARNING)


async def connect_queue(
    url: str, *, ack_wait: float, max_attempts: int, setup: bool, connect_timeout: float = CONNECT_TIMEOUT
) -> Queue:
    """A connected queue whose stream exists (created with ``setup``); StartupError (exit 2) otherwise."""
    from .queues import open_queue

    try:
        queue = open_queue(url, ack_wait=ack_wait, max_deliver=max_attempts, connect_timeout=connect_timeout)
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


async def find_endpoint(client: Any, name: str, stop: asyncio.Event) -> Any:
    try:
        return await sdk.find_endpoint(client, name, stop)
    except sdk.EndpointNotFound as exc:
        raise StartupError(f"{exc}: pass --endpoint NAME", code=2) from None
    except Exception as exc:
        raise StartupError(f"cannot list endpoints at {client.vast_web_url}: {short(exc)}", code=2) from None


async def dispatch_until_stopped(dispatcher: Dispatcher, interrupt: Interrupt) -> int:
    """Dispatches until a signal (or a broken feed); then drains, or closes everything on a second signal."""
    await wait_any([interrupt.event, dispatcher.broken], None)
    if dispatcher.broken.is_set():
        await dispatcher.close_all()
        return 1
    if await dispatcher.drain(hurry=interrupt.again):
        log.info("every session ended; stopping")
        return 0
    await dispatcher.close_all()
    return 1 if dispatcher.broken.is_set() else 128 + (interrupt.signum or signal.SIGINT)


async def run(args: argparse.Namespace, api_key: str) -> int:
    """The dispatcher against a queue and a Vast endpoint (or a stand-in already running)."""
    from .jobview import ViewTicker

    interrupt = Interrupt(
        first="stopping: no new sessions; running jobs finish first (Ctrl-C again closes their sessions now)",
        again="closing every session now",
    )
    interrupt.install()
    job_log = JobLog(args.job_log)
    ledger = None
    try:
        async with AsyncExitStack() as stack:
            queue = await connect_queue(
                args.queue,
                ack_wait=args.ack_wait,
                max_attempts=args.max_attempts,
                setup=args.action == "setup",
                connect_timeout=args.connect_timeout,
            )
            stack.push_async_callback(queue.close)
            if args.action == "setup":
                ready = f"AckWait {args.ack_wait:g}s, {args.max_attempts} attempts"
                print(f"{args.queue}: stream and consumer ready ({ready})")
                return 0
            url = None
            if args.instance == "local":
                url = f"http://127.0.0.1:{args.local_port}"
            client = sdk.make_client(api_key, args.instance, url)
            stack.push_async_callback(client.close)
            routing_stop = asyncio.Event()
            finished, endpoint = await interrupt.race(find_endpoint(client, args.endpoint, routing_stop))
            if not finished:
                return 0
            ledger, metrics = start_records(args, job_log, stack, args.ack_wait)
            dispatcher = Dispatcher(queue, endpoint, options_from_args(args), ledger, routing_stop=routing_stop)
            stack.push_async_callback(dispatcher.aclose)
            ticker = ViewTicker(ledger, live=_live(args), metrics=metrics)
            stack.push_async_callback(ticker.stop)
            await dispatcher.start()
            ticker.start()
            return await dispatch_until_stopped(dispatcher, interrupt)
    finally:
        job_log.close(ledger)
        interrupt.uninstall()


def start_records(args: argparse.Namespace, job_log: JobLog, stack: Any, ack_wait: float) -> tuple[Ledger, Any]:
    """Opens the job log, starts the metrics server if asked (stopped with ``stack``); a ledger writing to both."""
    from .jobview import Metrics

    try:
        job_log.open()
    except OSError as exc:
        raise StartupError(f"--job-log {args.job_log}: {exc.strerror}: give a writable file", code=2) from None
    metrics = Metrics.start(args.metrics_port, args.metrics_host) if args.metrics_port is not None else None
    if metrics is not None:
        stack.callback(metrics.stop)
    return Ledger(ack_wait=ack_wait, on_attempt=_recorder(job_log, metrics)), metrics


def _recorder(job_log: JobLog, metrics: Any) -> Any:
    def record(row: Attempt) -> None:
        job_log.write(row)
        if metrics is not None:
            metrics.attempt(row)

    return record


def _live(args: argparse.Namespace) -> bool:
    return not args.plain and sys.stdout.isatty()


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    demo = args.jobs is not None or args.trace is not None
    if demo or args.instance == "local":
        api_key = LOCAL_API_KEY
    else:
        api_key = (env.get("VAST_API_KEY") or "").strip()
        if not api_key and args.action == "run":
            return missing_api_key(parser.prog, args.instance, "--instance local --jobs 20")
    configure_logging(live=_live(args), verbose=args.verbose)
    if demo:
        from .demo import run_demo

        return run_command(parser.prog, run_demo(args))
    return run_command(parser.prog, run(args, api_key))


if __name__ == "__main__":
    sys.exit(main())
