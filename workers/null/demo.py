"""The whole queue loop on one machine: ``python -m workers.null.dispatcher --instance local --jobs 20``.

It starts an embedded nats-server (data in a temporary folder) and the local
stand-in with a consumer beside every worker, publishes the demo jobs (each
sleeps ``--job-seconds``, or its duration from ``--trace``), dispatches them
with the real dispatcher and SDK, and waits until every job is acked or
dead-lettered and the fleet is back at zero. ``--chaos K`` SIGKILLs K workers
(with their consumers) while they run jobs. A job neither acked nor
dead-lettered by ``--deadline`` is lost: exit 1. Ctrl-C stops everything it
started. The summary's first line reads::

    {done} of {total} jobs done, {failed} failed, {lost} lost, {twice} run twice

Imported only for the demo: it needs ``lib`` (the stand-in, the queue server).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from . import sdk
from .aio import stop_task, wait_any
from .cli import Interrupt, StartupError
from .dispatcher import (
    DEFAULT_ENDPOINT,
    LOCAL_API_KEY,
    Dispatcher,
    DispatchOptions,
    JobLog,
    connect_queue,
    find_endpoint,
    start_records,
)
from .ledger import DEAD_STATE, DONE_STATE, ENDED, Ledger

log = logging.getLogger("workers.null.demo")

# What each demo job runs: sleep for the seconds its body names.
JOB_SCRIPT = "import json, sys, time; time.sleep(float(json.load(sys.stdin)['seconds']))"
DEMO_STREAM = "demo"
CLAIM_TIMEOUT = 3.0  # a consumer whose session finds no job releases it after this long
DEMO_ACK_WAIT = 3.0  # short, so a killed worker's job comes back within seconds
SAMPLE_EVERY = 0.1
# The SDK client's longest pause between a waiting session's /route/ calls (its default is 5 s):
# short pauses keep a waiting job's wait close to the moment a worker frees up.
SDK_MAX_POLL_INTERVAL = 1.0


class TraceError(Exception):
    """A trace the demo cannot replay; the message names the row and the fix."""


@dataclass(frozen=True)
class DemoJob:
    id: str
    arrival: float  # seconds after the first job
    seconds: float


def demo_jobs(count: int, seconds: float) -> list[DemoJob]:
    return [DemoJob(f"demo-{n:04d}", 0.0, seconds) for n in range(1, count + 1)]


def load_trace(path: Path) -> list[DemoJob]:
    """Jobs from a CSV (with a header) or JSON-lines file of ``arrival`` (seconds or ISO 8601) and ``duration``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"--trace {path}: {exc.strerror}: give a readable file") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise TraceError(f"--trace {path}: empty: give one job per row (arrival, duration)")
    if lines[0].lstrip().startswith("{"):
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                raise TraceError(f"--trace {path} line {n}: not JSON: give one object per line") from None
            rows.append((n, row))
    else:
        reader = csv.DictReader(lines)
        rows = list(enumerate(reader, 2))
    jobs: list[DemoJob] = []
    origin: float | None = None
    last = -math.inf
    for n, row in rows:
        if not isinstance(row, dict) or "arrival" not in row or "duration" not in row:
            raise TraceError(f"--trace {path} row {n}: needs 'arrival' and 'duration' columns")
        arrival = _seconds_or_time(row["arrival"])
        try:
            duration = float(row["duration"])
        except (TypeError, ValueError):
            duration = math.nan
        if arrival is None or not math.isfinite(duration) or duration < 0:
            raise TraceError(
                f"--trace {path} row {n}: arrival {row['arrival']!r}, duration {row['duration']!r}: "
                "give seconds (or an ISO 8601 arrival) and a duration >= 0"
            )
        if origin is None:
            origin = arrival
        if arrival < last:
            raise TraceError(f"--trace {path} row {n}: arrival before the previous row's: sort the trace by arrival")
        last = arrival
        jobs.append(DemoJob(f"trace-{len(jobs) + 1:05d}", arrival - origin, duration))
    return jobs


def _seconds_or_time(value: Any) -> float | None:
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except (TypeError, ValueError):
        pass
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def default_deadline(jobs: Sequence[DemoJob], args: argparse.Namespace) -> float:
    """Generous: every batch of jobs behind a cold start on a loaded machine, a lost worker's AckWait, and slack."""
    batches = math.ceil(len(jobs) / args.max_sessions)
    longest = max((j.seconds for j in jobs), default=0.0)
    return jobs[-1].arrival + batches * (longest + args.cold_start + 10.0) + 10 * DEMO_ACK_WAIT + 180.0


def consumer_command(queue_url: str, *, max_attempts: int = 5, ack_wait: float = DEMO_ACK_WAIT) -> tuple[str, ...]:
    """The consumer the stand-in runs beside every worker: each job sleeps the seconds its body names."""
    return (
        sys.executable, "-m", "workers.null.consumer",
        "--queue", queue_url,
        "--ack-wait", f"{ack_wait:g}",
        "--max-attempts", str(max_attempts),
        "--claim-timeout", f"{CLAIM_TIMEOUT:g}",
        "--retry-delay", "1",
        "--health-port", "0",
        "--", sys.executable, "-c", JOB_SCRIPT,
    )  # fmt: skip


# -- watching the fleet ----------------------------------------------------------------


@dataclass
class FleetSample:
    """When each instance existed (billed), and how many were live over time."""

    first_seen: dict[int, float] = field(default_factory=dict)
    last_seen: dict[int, float] = field(default_factory=dict)
    peak: int = 0
    peak_at: float | None = None
    first_worker_at: float | None = None
    zero_at: float | None = None  # back at zero after having had workers

    def take(self, fleet: Any, now: float) -> None:
        ids = set(fleet.instances)
        for iid in ids:
            self.first_seen.setdefault(iid, now)
            self.last_seen[iid] = now
        live = len(fleet.live())
        if ids and self.first_worker_at is None:
            self.first_worker_at = now
        if live > self.peak:
            self.peak, self.peak_at = live, now
        if ids:
            self.zero_at = None
        elif self.first_worker_at is not None and self.zero_at is None:
            self.zero_at = now

    def billed(self) -> float:
        return sum(self.last_seen[i] - self.first_seen[i] for i in self.first_seen)


async def sample_fleet(fleet: Any, sample: FleetSample) -> None:
    while True:
        sample.take(fleet, time.time())
        await asyncio.sleep(SAMPLE_EVERY)


def fleet_timeline(
    events: Sequence[tuple[float, str, tuple[Any, ...]]],
    issued: Sequence[tuple[float, Any]],
    urls: Mapping[int, str] | None = None,
) -> dict:
    """Each worker's phases with their start times, from the book's recorded events and commands.

    A worker is ``provisioning`` from its Provision, ``loading`` once its
    process runs (or from a Resume), ``ready`` at its first report with a
    capacity (the book's rule), ``stopping`` from its Stop, and then ``cold``
    (files kept) or ``gone``. ``urls``: each worker's URL, written beside it
    where known (the job log names a job's worker by it).
    """
    from lib.standin.book import Provision, Resume, Stop

    phases: dict[int, list[tuple[float, str]]] = {}
    keep: dict[int, bool] = {}

    def enter(worker_id: int, at: float, phase: str) -> None:
        phases.setdefault(worker_id, []).append((at, phase))

    def now_in(worker_id: int) -> str | None:
        seen = phases.get(worker_id)
        return seen[-1][1] if seen else None

    merged = sorted(
        [(at, 0, "command", command) for at, command in issued] + [(at, 1, name, args) for at, name, args in events],
        key=lambda item: (item[0], item[1]),
    )
    for at, _, name, what in merged:
        if name == "command":
            if isinstance(what, Provision):
                enter(what.worker_id, at, "provisioning")
            elif isinstance(what, Resume):
                enter(what.worker_id, at, "loading")
            elif isinstance(what, Stop) and now_in(what.worker_id) not in (None, "stopping"):
                keep[what.worker_id] = what.keep
                enter(what.worker_id, at, "stopping")
        elif name == "started" and now_in(what[0]) == "provisioning":
            enter(what[0], at, "loading")
        elif name == "report" and now_in(what[0].worker_id) == "loading":
            report = what[0]
            if report.max_perf > 0 and not report.error:
                enter(report.worker_id, at, "ready")
        elif name == "failed" and now_in(what[0]) in ("provisioning", "loading", "ready"):
            enter(what[0], at, "errored")
        elif name == "stopped" and now_in(what[0]) == "stopping":
            enter(what[0], at, "cold" if keep.get(what[0]) else "gone")
    return {
        "workers": [
            {
                "id": worker_id,
                **({"url": urls[worker_id]} if urls and worker_id in urls else {}),
                "phases": [[round(at, 6), phase] for at, phase in seen],
            }
            for worker_id, seen in sorted(phases.items())
        ]
    }


async def chaos(fleet: Any, ledger: Ledger, kills: int, killed: list[int], min_run: float) -> None:
    """SIGKILLs ``kills`` workers, each while its handler runs, one at a time."""
    rng = random.Random()
    while len(killed) < kills:
        await asyncio.sleep(0.1)
        now = time.time()
        by_url = {inst.url: inst.id for inst in fleet.instances.values() if inst.url}
        candidates = []
        for job in ledger.jobs.values():
            row = job.current
            if row is None or row.outcome is not None or row.started is None or now - row.started < min_run:
                continue
            session = row.session
            if session is not None and session.alive and by_url.get(session.url) not in (None, *killed):
                candidates.append((by_url[session.url], job.id))
        if not candidates:
            continue
        iid, job_id = rng.choice(candidates)
        if fleet.kill(iid):
            killed.append(iid)
            log.warning("chaos: killed worker %d (and its consumer) while it ran job %s", iid, job_id)
        await asyncio.sleep(0.3)


# -- the summary ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


@dataclass
class DemoResult:
    total: int
    done: int
    failed: int
    lost: int
    twice: int
    peak: int
    billed: float
    busy: float
    waits: list[float]
    to_peak: float | None
    to_zero: float | None
    asked: int
    killed: int
    chaos: int

    @property
    def code(self) -> int:
        return 1 if self.lost else 0

    def lines(self) -> list[str]:
        def sec(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}s"

        share = f" ({self.busy / self.billed:.0%} busy)" if self.billed > 0 else ""
        lines = [
            f"{self.done} of {self.total} jobs done, {self.failed} failed, {self.lost} lost, {self.twice} run twice",
            f"peak workers: {self.peak}; sessions asked for: {self.asked}",
            f"billed worker-seconds: {self.billed:.1f}, busy worker-seconds: {self.busy:.1f}{share}",
            f"queue wait (publish to handler start): p50 {sec(percentile(self.waits, 50))}, "
            f"p95 {sec(percentile(self.waits, 95))}",
            f"workers 0 -> {self.peak} in {sec(self.to_peak)}, back to 0 after {sec(self.to_zero)}",
        ]
        if self.chaos:
            lines.append(f"chaos: {self.killed} of {self.chaos} workers killed mid-job")
        return lines


def summarize(
    ledger: Ledger, jobs: Sequence[DemoJob], published: dict[str, float], sample: FleetSample, killed: int, chaos_k: int
) -> DemoResult:
    done = failed = lost = 0
    waits: list[float] = []
    busy = 0.0
    for job in jobs:
        record = ledger.jobs.get(job.id)
        state = record.state if record else None
        if state == DONE_STATE:
            done += 1
        elif state == DEAD_STATE:
            failed += 1
        else:
            lost += 1
        if record is None:
            continue
        starts = [row.started for row in record.attempts.values() if row.started is not None]
        if starts and job.id in published:
            waits.append(max(0.0, min(starts) - published[job.id]))
        for row in record.attempts.values():
            if row.started is not None and row.finished is not None:
                busy += row.finished - row.started
    twice = sum(1 for job in jobs if job.id in ledger.jobs and ledger.jobs[job.id].starts > 1)
    origin = sample.first_worker_at
    start = min(published.values()) if published else None
    return DemoResult(
        total=len(jobs),
        done=done,
        failed=failed,
        lost=lost,
        twice=twice,
        peak=sample.peak,
        billed=sample.billed(),
        busy=busy,
        waits=waits,
        to_peak=None if origin is None or sample.peak_at is None else sample.peak_at - origin,
        to_zero=None if origin is None or sample.zero_at is None else sample.zero_at - (start or origin),
        asked=ledger.asked,
        killed=killed,
        chaos=chaos_k,
    )


# -- running -----------------------------------------------------------------------------


async def publish_jobs(queue: Any, jobs: Sequence[DemoJob], published: dict[str, float]) -> None:
    """Publishes each job at its arrival (seconds after the first)."""
    start = time.monotonic()
    for job in jobs:
        delay = start + job.arrival - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        published[job.id] = time.time()
        await queue.publish(job.id, json.dumps({"seconds": job.seconds}).encode())
    log.info("published %d job(s)", len(jobs))


def all_settled(ledger: Ledger, jobs: Sequence[DemoJob]) -> bool:
    return all(job.id in ledger.jobs and ledger.jobs[job.id].state in ENDED for job in jobs)


async def run_demo(args: argparse.Namespace) -> int:
    from lib.standin.autoscaler import LocalConfig, serve
    from lib.standin.fleet import FleetSettings
    from lib.standin.queueservers import nats_server
    from lib.standin.scaling import EndpointParams, LocalPolicy

    from .jobview import ViewTicker

    try:
        jobs = load_trace(args.trace) if args.trace is not None else demo_jobs(args.jobs, args.job_seconds)
    except TraceError as exc:
        raise StartupError(str(exc), code=2) from None
    deadline = args.deadline if args.deadline is not None else default_deadline(jobs, args)
    interrupt = Interrupt(
        first="interrupted: stopping every worker, consumer and the queue server",
        again="still stopping; each worker gets a few seconds before SIGKILL",
    )
    interrupt.install()
    job_log = JobLog(args.job_log)
    fleet_log = _open_fleet_log(args.fleet_log)
    ledger: Ledger | None = None
    fleet: Any = None
    published: dict[str, float] = {}
    sample = FleetSample()
    killed: list[int] = []
    result: DemoResult | None = None
    try:
        async with AsyncExitStack() as stack:
            store = tempfile.mkdtemp(prefix="null-demo-nats-")
            stack.callback(shutil.rmtree, store, True)
            nats_url = await stack.enter_async_context(nats_server(store))
            queue_url = f"{nats_url}/{DEMO_STREAM}"
            queue = await connect_queue(queue_url, ack_wait=DEMO_ACK_WAIT, max_attempts=args.max_attempts, setup=True)
            stack.push_async_callback(queue.close)
            settings = FleetSettings(
                params=EndpointParams(max_workers=args.max_sessions, inactivity_timeout=args.inactivity_timeout),
                policy=LocalPolicy(scale_down_delay=0.5),
                provisioning_delay=args.cold_start,
                consumer=consumer_command(queue_url, max_attempts=args.max_attempts),
                claim_deadline=10.0,
                stop_grace=6.0,
                # A held /route/ call must end well inside the SDK's 10 s request timeout, also on a
                # loaded machine; a timed-out route fails the whole session in the SDK.
                route_hold=4.0,
            )
            config = LocalConfig(fleet=settings, endpoint_name=DEFAULT_ENDPOINT, api_key=LOCAL_API_KEY, port=0)
            standin = await stack.enter_async_context(serve(config))
            fleet = standin.fleet
            if fleet_log is not None:
                fleet.book.events, fleet.book.issued = [], []
            log.info(
                "queue %s; stand-in %s; each worker runs: %s",
                queue_url,
                standin.url,
                shlex.join(settings.consumer or ()),
            )
            client = sdk.make_client(LOCAL_API_KEY, "local", standin.url, max_poll_interval=SDK_MAX_POLL_INTERVAL)
            stack.push_async_callback(client.close)
            routing_stop = asyncio.Event()
            endpoint = await find_endpoint(client, DEFAULT_ENDPOINT, routing_stop)
            ledger, metrics = start_records(args, job_log, stack, DEMO_ACK_WAIT)
            options = DispatchOptions(
                max_sessions=args.max_sessions,
                lifetime=args.lifetime,
                timeout=args.timeout,
                reconcile_every=min(args.reconcile, 2.0),
                health_every=min(args.health_every, 1.0),
                gone_confirm=0.5,
            )
            dispatcher = Dispatcher(queue, endpoint, options, ledger, routing_stop=routing_stop)
            stack.push_async_callback(dispatcher.aclose)
            live = not args.plain and sys.stdout.isatty()
            ticker = ViewTicker(ledger, live=live, metrics=metrics, workers=lambda: len(fleet.live()))
            stack.push_async_callback(ticker.stop)
            await dispatcher.start()
            ticker.start()
            sampler = asyncio.ensure_future(sample_fleet(fleet, sample))
            stack.push_async_callback(_cancel, sampler)
            publisher = asyncio.ensure_future(publish_jobs(queue, jobs, published))
            stack.push_async_callback(_cancel, publisher)
            if args.chaos:
                min_run = min(0.5, max(0.05, min(j.seconds for j in jobs) / 3))
                killer = asyncio.ensure_future(chaos(fleet, ledger, args.chaos, killed, min_run))
                stack.push_async_callback(_cancel, killer)
            log.info("%d job(s) to run; a job not done within %.0fs counts as lost (--deadline)", len(jobs), deadline)
            finished = await _until(
                lambda: publisher.done() and all_settled(ledger, jobs), deadline, interrupt, dispatcher
            )
            if dispatcher.failed:
                raise StartupError(dispatcher.failed)
            if publisher.done() and publisher.exception() is not None:
                raise StartupError(f"publishing the demo jobs failed: {publisher.exception()}")
            if interrupt.is_set:
                return 128 + (interrupt.signum or signal.SIGINT)
            if not finished:
                log.warning("deadline of %.0fs passed with jobs unfinished; stopping", deadline)
            else:
                await dispatcher.drain(hurry=interrupt.event)
                limit = args.inactivity_timeout + settings.policy.scale_down_delay + settings.stop_grace + 20.0
                log.info("every job settled; waiting for the fleet to scale back to zero")
                back = await _until(lambda: not fleet.instances, limit, interrupt, None)
                sample.take(fleet, time.time())
                if interrupt.is_set:
                    return 128 + (interrupt.signum or signal.SIGINT)
                if not back:
                    log.warning("the fleet did not scale back to zero within %.0fs", limit)
            await ticker.stop()
            result = summarize(ledger, jobs, published, sample, len(killed), args.chaos)
    finally:
        job_log.close(ledger)
        if fleet_log is not None:
            with fleet_log:
                if fleet is not None:
                    _write_fleet_log(fleet_log, fleet, settings, args)
        interrupt.uninstall()
    for line in result.lines():
        print(line, flush=True)
    return result.code if sample.zero_at is not None or result.lost else 1


def _open_fleet_log(path: Path | None) -> IO[str] | None:
    if path is None:
        return None
    try:
        return open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by run_demo
    except OSError as exc:
        raise StartupError(f"--fleet-log {path}: {exc.strerror}: give a writable file", code=2) from None


def _write_fleet_log(out: IO[str], fleet: Any, settings: Any, args: argparse.Namespace) -> None:
    """The fleet's timeline and the stand-in's settings it ran under, as one JSON document."""
    data = {
        "standin": {
            "provisioning_delay": settings.provisioning_delay,
            "route_hold": settings.route_hold,
            "scale_down_delay": settings.policy.scale_down_delay,
            "stop_grace": settings.stop_grace,
            **asdict(settings.params),  # the endpoint's parameters, under Vast's names
        },
        "max_sessions": args.max_sessions,
        "sdk_max_poll_interval": SDK_MAX_POLL_INTERVAL,
        **fleet_timeline(fleet.book.events or [], fleet.book.issued or [], fleet.urls),
    }
    out.write(json.dumps(data, indent=1) + "\n")


async def _until(predicate: Any, timeout: float, interrupt: Interrupt, dispatcher: Dispatcher | None) -> bool:
    """Waits (checking every tenth of a second) until ``predicate()``; False on timeout or interrupt."""
    end = time.monotonic() + timeout
    stops = [interrupt.event] + ([dispatcher.broken] if dispatcher is not None else [])
    while not predicate():
        left = end - time.monotonic()
        if left <= 0 or any(e.is_set() for e in stops):
            return False
        await wait_any(stops, min(left, 0.1))
    return True


async def _cancel(task: asyncio.Future[Any]) -> None:
    await stop_task(task)
