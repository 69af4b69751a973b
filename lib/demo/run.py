"""The whole queue loop on one machine: ``python -m lib.demo --jobs 20``.

It starts an embedded nats-server (data in a temporary folder) and the local
stand-in with a consumer beside every worker, publishes the demo jobs (each
sleeps ``--job-seconds``, or its duration from ``--trace``), dispatches them
with the real dispatcher and SDK, and waits until every job is acked or
dead-lettered and the fleet is back at zero. ``--chaos K`` SIGKILLs K workers
(with their consumers) while they run jobs. A job neither acked nor
dead-lettered by ``--deadline`` is lost: exit 1. Ctrl-C stops everything it
started. The summary's first line reads::

    {done} of {total} jobs done, {failed} failed, {lost} lost, {twice} run twice
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Any

from lib.demo.fleet import FleetSample, open_fleet_log, sample_fleet, write_fleet_log
from lib.planner.trace import TraceError, load_trace
from lib.standin.autoscaler import LocalConfig, serve
from lib.standin.book import BookSettings
from lib.standin.fleet import FleetSettings
from lib.standin.queueservers import nats_server
from lib.standin.scaling import EndpointParams, LocalPolicy
from workers.null.aio import stop_task, wait_any
from workers.null.cli import Interrupt, StartupError
from workers.null.dispatch import sdk
from workers.null.dispatch.cli import is_live, start_records
from workers.null.dispatch.dispatcher import Dispatcher, DispatchOptions, connect_queue
from workers.null.dispatch.joblog import JobLog
from workers.null.dispatch.ledger import ENDED, Ledger
from workers.null.dispatch.summary import JobTally, in_seconds, tally_jobs
from workers.null.dispatch.view import ViewTicker
from workers.null.protocol import MAX_DELIVERIES

log = logging.getLogger("lib.demo")

# What each demo job runs: sleep for the seconds its body names.
JOB_SCRIPT = "import json, sys, time; time.sleep(float(json.load(sys.stdin)['seconds']))"
DEMO_STREAM = "demo"
CLAIM_TIMEOUT = 3.0  # a consumer whose session finds no job releases it after this long
DEMO_ACK_WAIT = 3.0  # short, so a killed worker's job comes back within seconds
# The SDK client's longest pause between a waiting session's /route/ calls (its default is 5 s):
# short pauses keep a waiting job's wait close to the moment a worker frees up.
SDK_MAX_POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class DemoJob:
    id: str
    arrival: float  # seconds after the first job
    seconds: float


def demo_jobs(count: int, seconds: float) -> list[DemoJob]:
    return [DemoJob(f"demo-{n:04d}", 0.0, seconds) for n in range(1, count + 1)]


def trace_jobs(path: Any) -> list[DemoJob]:
    """The jobs of a trace file (the planner's reader), each sleeping its duration; StartupError naming the fix."""
    try:
        trace = load_trace(path)
    except TraceError as exc:
        raise StartupError(f"--trace {exc}", code=2) from None
    # Replayed from the first job on: a trace that starts late does not keep the demo idle.
    origin = trace[0].arrival
    return [DemoJob(f"trace-{n:05d}", job.arrival - origin, job.duration) for n, job in enumerate(trace, 1)]


def default_deadline(jobs: Sequence[DemoJob], args: argparse.Namespace) -> float:
    """Generous: every batch of jobs behind a cold start on a loaded machine, a lost worker's AckWait, and slack."""
    batches = math.ceil(len(jobs) / args.max_sessions)
    longest = max((j.seconds for j in jobs), default=0.0)
    return jobs[-1].arrival + batches * (longest + args.cold_start + 10.0) + 10 * DEMO_ACK_WAIT + 180.0


def consumer_command(
    queue_url: str, *, max_attempts: int = 5, ack_wait: float = DEMO_ACK_WAIT, events: bool = True
) -> tuple[str, ...]:
    """The consumer the stand-in runs beside every worker: each job sleeps the seconds its body names."""
    quiet = () if events else ("--no-events",)
    return (
        sys.executable, "-m", "workers.null.consumer",
        "--queue", queue_url,
        "--ack-wait", f"{ack_wait:g}",
        "--max-attempts", str(max_attempts),
        "--claim-timeout", f"{CLAIM_TIMEOUT:g}",
        "--retry-delay", "1",
        "--health-port", "0",
        *quiet,
        "--", sys.executable, "-c", JOB_SCRIPT,
    )  # fmt: skip


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


@dataclass(frozen=True)
class DemoResult:
    jobs: JobTally
    peak: int
    billed: float
    to_peak: float | None
    to_zero: float | None
    killed: int
    chaos: int

    @property
    def code(self) -> int:
        return 1 if self.jobs.lost else 0

    def lines(self) -> list[str]:
        jobs = self.jobs
        share = f" ({jobs.busy / self.billed:.0%} busy)" if self.billed > 0 else ""
        lines = [
            jobs.jobs_line(),
            f"peak workers: {self.peak}; sessions asked for: {jobs.asked}",
            f"billed worker-seconds: {self.billed:.1f}, busy worker-seconds: {jobs.busy:.1f}{share}",
            jobs.wait_line(),
            f"workers 0 -> {self.peak} in {in_seconds(self.to_peak)}, back to 0 after {in_seconds(self.to_zero)}",
        ]
        if self.chaos:
            lines.append(f"chaos: {self.killed} of {self.chaos} workers killed mid-job")
        return lines


def summarize(
    ledger: Ledger, jobs: Sequence[DemoJob], published: dict[str, float], sample: FleetSample, killed: int, chaos_k: int
) -> DemoResult:
    origin = sample.first_worker_at
    start = min(published.values()) if published else None
    return DemoResult(
        jobs=tally_jobs(ledger, [job.id for job in jobs], published),
        peak=sample.peak,
        billed=sample.billed(),
        to_peak=None if origin is None or sample.peak_at is None else sample.peak_at - origin,
        to_zero=None if origin is None or sample.zero_at is None else sample.zero_at - (start or origin),
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
    jobs = trace_jobs(args.trace) if args.trace is not None else demo_jobs(args.jobs, args.job_seconds)
    deadline = args.deadline if args.deadline is not None else default_deadline(jobs, args)
    interrupt = Interrupt(
        first="interrupted: stopping every worker, consumer and the queue server",
        again="still stopping; each worker gets a few seconds before SIGKILL",
    )
    interrupt.install()
    job_log = JobLog(args.job_log)
    fleet_log = open_fleet_log(args.fleet_log)
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
            queue = await connect_queue(queue_url, ack_wait=DEMO_ACK_WAIT, max_deliveries=MAX_DELIVERIES, setup=True)
            stack.push_async_callback(queue.close)
            settings = FleetSettings(
                book=BookSettings(
                    params=EndpointParams(max_workers=args.max_sessions, inactivity_timeout=args.inactivity_timeout),
                    policy=LocalPolicy(scale_down_delay=0.5),
                    # A held /route/ call must end well inside the SDK's 10 s request timeout, also on a
                    # loaded machine; a timed-out route fails the whole session in the SDK.
                    route_hold=4.0,
                ),
                provisioning_delay=args.cold_start,
                consumer=consumer_command(queue_url),
                claim_deadline=10.0,
                stop_grace=6.0,
            )
            config = LocalConfig(fleet=settings, endpoint_name=sdk.DEFAULT_ENDPOINT, api_key=sdk.LOCAL_API_KEY, port=0)
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
            client = sdk.make_client(sdk.LOCAL_API_KEY, "local", standin.url, max_poll_interval=SDK_MAX_POLL_INTERVAL)
            stack.push_async_callback(client.close)
            routing_stop = asyncio.Event()
            endpoint = await sdk.find_endpoint(client, sdk.DEFAULT_ENDPOINT, routing_stop)
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
            live = is_live(args)
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
            finished = await _until(lambda: publisher.done() and all_settled(ledger, jobs), deadline, interrupt)
            if publisher.done() and publisher.exception() is not None:
                raise StartupError(f"publishing the demo jobs failed: {publisher.exception()}")
            if interrupt.is_set:
                return 128 + (interrupt.signum or signal.SIGINT)
            if not finished:
                log.warning("deadline of %.0fs passed with jobs unfinished; stopping", deadline)
            else:
                await dispatcher.drain(hurry=interrupt.event)
                limit = args.inactivity_timeout + settings.book.policy.scale_down_delay + settings.stop_grace + 20.0
                log.info("every job settled; waiting for the fleet to scale back to zero")
                back = await _until(lambda: not fleet.instances, limit, interrupt)
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
                    write_fleet_log(fleet_log, fleet, _standin_settings(settings), _run_settings(args))
        interrupt.uninstall()
    for line in result.lines():
        print(line, flush=True)
    return result.code if sample.zero_at is not None or result.lost else 1


def _standin_settings(settings: FleetSettings) -> dict[str, Any]:
    return {
        "provisioning_delay": settings.provisioning_delay,
        "route_hold": settings.book.route_hold,
        "scale_down_delay": settings.book.policy.scale_down_delay,
        "stop_grace": settings.stop_grace,
        **asdict(settings.book.params),  # the endpoint's parameters, under Vast's names
    }


def _run_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_sessions": args.max_sessions, "sdk_max_poll_interval": SDK_MAX_POLL_INTERVAL}


async def _until(predicate: Any, timeout: float, interrupt: Interrupt) -> bool:
    """Waits (checking every tenth of a second) until ``predicate()``; False on timeout or interrupt."""
    end = time.monotonic() + timeout
    stops = [interrupt.event]
    while not predicate():
        left = end - time.monotonic()
        if left <= 0 or any(e.is_set() for e in stops):
            return False
        await wait_any(stops, min(left, 0.1))
    return True


async def _cancel(task: asyncio.Future[Any]) -> None:
    await stop_task(task)
