"""The consumer command beside real worker processes, over real NATS JetStream and Valkey servers.

The test plays the dispatcher: it publishes jobs, opens sessions on the
worker with signed grants, and reads the job events the consumer publishes.
Every COMMAND appends ``job attempt session`` to a runs file, so a job run
twice shows. Each test runs on both queue kinds at once (``on_each_queue``):
the two share only the recording autoscaler and the HTTP client, and each
mostly waits on leases and timeouts, so together they take about as long as one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lib.standin.process import ChildProcess
from tests.e2e.conftest import QUEUE_KINDS, queue_server, queue_url_for
from tests.helpers import RunningWorker, StartWorker, open_session, side_by_side, status_of
from tests.standin import process_gone
from workers.null.protocol import ABANDONED, CLAIMED, DEAD, DONE, FINISHED, RELEASED, RETRY, STARTED, JobEvent
from workers.null.queues.base import Queue

pytestmark = pytest.mark.slow

ACK_WAIT = 1.5  # the renewal window: renewals every 0.5 s
CLAIM_TIMEOUT = 1.0
LIFETIME = 30.0  # a session's own lifetime, past which only the consumer's renewals keep it
# A consumer process is up once it waits for a session: a Python start and a queue connect, slow on a busy machine.
START_TIMEOUT = 60.0


# -- the queue servers --------------------------------------------------------------------


@dataclass
class Dispatch:
    """The dispatcher's side of the queue: publish, depth, and the consumer's job events."""

    queue: Queue
    events: list[JobEvent] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, job_id: str, **behaviour: Any) -> None:
        await self.queue.publish(job_id, json.dumps(behaviour).encode())

    def of(self, job_id: str, kind: str | None = None) -> list[JobEvent]:
        return [e for e in self.events if e.job_id == job_id and (kind is None or e.kind == kind)]

    async def wait(self, predicate: Callable[[JobEvent], bool], timeout: float = 20.0, what: str = "") -> JobEvent:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [(e.kind, e.job_id, e.attempt, e.outcome) for e in self.events]
                raise AssertionError(f"no job event {what} within {timeout}s; seen: {seen}")
            self.arrived.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)

    async def wait_kind(self, kind: str, job_id: str, attempt: int | None = None, timeout: float = 20.0) -> JobEvent:
        return await self.wait(
            lambda e: e.kind == kind and e.job_id == job_id and (attempt is None or e.attempt == attempt),
            timeout,
            f"{kind} for {job_id} attempt {attempt}",
        )


@asynccontextmanager
async def dispatching(queue_url: str) -> AsyncIterator[Dispatch]:
    """The queue at ``queue_url`` set up, with a listener on its job events from the start."""
    from workers.null.queues import open_queue

    queue = open_queue(queue_url, ack_wait=ACK_WAIT, max_deliver=2)
    await queue.connect()
    await queue.setup()
    found = Dispatch(queue)
    feed = queue.events()
    await feed.start()  # subscribed before any job event is published

    async def listen() -> None:
        async for event in feed:
            found.events.append(event)
            found.arrived.set()

    listener = asyncio.ensure_future(listen())
    try:
        yield found
    finally:
        listener.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await listener
        await feed.aclose()
        await queue.close()


# -- the consumer process -----------------------------------------------------------------

JOB = """
    import json, os, sys, time
    body = json.loads(sys.stdin.read() or "{}")
    attempt = int(os.environ["NULL_JOB_ATTEMPT"])
    with open(os.environ["RUNS_FILE"], "a") as runs:
        runs.write(f"{os.environ['NULL_JOB_ID']} {attempt} {os.environ['NULL_SESSION_ID']} {os.getpid()}\\n")
    time.sleep(body.get("sleep", 0) if attempt == 1 else body.get("sleep_again", 0))
    sys.exit(body.get("exit", 0))
"""


@dataclass
class Consumers:
    queue_url: str
    tmp_path: Path
    runs_file: Path
    started: list[ChildProcess] = field(default_factory=list)

    async def start(self, worker_control_port: int, *flags: str) -> ChildProcess:
        script = self.tmp_path / "job.py"
        script.write_text(textwrap.dedent(JOB))
        args = [
            "-m", "workers.null.consumer",
            "--queue", self.queue_url,
            "--control-port", str(worker_control_port),
            "--health-port", "0",
            "--ack-wait", str(ACK_WAIT),
            "--claim-timeout", str(CLAIM_TIMEOUT),
            "--retry-delay", "0.2",
            "--max-attempts", "2",
            "--grace", "0.5",
            *flags,
            "--", sys.executable, str(script),
        ]  # fmt: skip
        env = {**os.environ, "RUNS_FILE": str(self.runs_file)}
        run = await ChildProcess.python(*args, env=env, tail_lines=None).start()
        self.started.append(run)
        await run.wait_for_line(r"waiting for a session", START_TIMEOUT)
        return run

    async def wait_runs(self, count: int, timeout: float = 10.0) -> list[tuple[str, int, str, int]]:
        """Waits until COMMAND has begun ``count`` runs (the started event can come before its first line)."""
        deadline = time.monotonic() + timeout
        while len(self.runs()) < count:
            assert time.monotonic() < deadline, f"fewer than {count} runs within {timeout}s: {self.runs()}"
            await asyncio.sleep(0.02)
        return self.runs()

    def runs(self) -> list[tuple[str, int, str, int]]:
        if not self.runs_file.exists():
            return []
        rows = [line.split() for line in self.runs_file.read_text().splitlines()]
        return [(job, int(attempt), session, int(pid)) for job, attempt, session, pid in rows]

    async def stop_all(self) -> None:
        for run in self.started:
            await run.stop(10.0)


@dataclass
class Rig:
    """One queue kind: its server, the dispatcher's side of its stream, consumers on it, workers beside them."""

    kind: str
    server: str
    dispatch: Dispatch = field(repr=False)
    consumers: Consumers = field(repr=False)
    start_worker: StartWorker = field(repr=False)


@pytest.fixture
async def rigs(start_worker: StartWorker, tmp_path: Path) -> AsyncIterator[list[Rig]]:
    """A rig of each queue kind, each with its own server started for this test."""
    async with AsyncExitStack() as stack:
        found = []
        for kind in QUEUE_KINDS:
            server = await stack.enter_async_context(queue_server(kind))
            url = queue_url_for(server, "jobs", group="null")
            dispatch = await stack.enter_async_context(dispatching(url))
            root = tmp_path / kind
            root.mkdir()
            consumers = Consumers(url, root, root / "runs.txt")
            stack.push_async_callback(consumers.stop_all)
            found.append(Rig(kind, server, dispatch, consumers, start_worker))
        yield found


async def on_each_queue(rigs: list[Rig], check: Callable[[Rig], Awaitable[None]]) -> None:
    """Runs ``check`` on every rig at once and waits for all of them; a failure names its queue kind."""
    await side_by_side({f"on {rig.kind}": check(rig) for rig in rigs})


# -- helpers ------------------------------------------------------------------------------


async def worker_session(http: aiohttp.ClientSession, worker: RunningWorker) -> dict | None:
    return (await status_of(http, worker))["session"]


async def wait_line(worker: RunningWorker, pattern: str, timeout: float = 15.0) -> str:
    return (await worker.process.wait_for_line(pattern, timeout))[0].string


# -- the lease mapping --------------------------------------------------------------------


async def test_job_is_run_renewed_acked_and_then_the_worker_released(rigs, http):
    """Claim, start, renewals past both the lease and AckWait, ack, release: events in order and one run only."""

    async def check(rig: Rig) -> None:
        start_worker, dispatch, consumers = rig.start_worker, rig.dispatch, rig.consumers
        worker = await start_worker()
        other = await start_worker()
        await consumers.start(worker.ports.control)
        await consumers.start(other.ports.control, "--claim-timeout", str(ACK_WAIT * 2))
        await dispatch.publish("j1", sleep=ACK_WAIT * 2)
        # A lease shorter than the job: only the consumer's /extend keeps it.
        session_id = await open_session(http, worker, worker.create_body(lifetime=1.0))
        await dispatch.wait_kind(STARTED, "j1")
        # Another worker asking while j1 runs past AckWait finds nothing: the claim was kept alive.
        await open_session(http, other, other.create_body(lifetime=LIFETIME))
        await wait_line(other, r"released by consumer", timeout=ACK_WAIT * 2 + 5)
        done = await dispatch.wait_kind(FINISHED, "j1")
        assert done.outcome == DONE, done
        await dispatch.wait_kind(RELEASED, "j1")
        kinds = [(e.kind, e.outcome) for e in dispatch.of("j1")]
        assert kinds == [(CLAIMED, None), (STARTED, None), (FINISHED, DONE), (RELEASED, None)]
        assert {e.session_id for e in dispatch.of("j1")} == {session_id}
        assert [r[:3] for r in consumers.runs()] == [("j1", 1, session_id)]
        line = await wait_line(worker, rf"session {re.escape(session_id)} released by consumer")
        held_for = float(re.search(r"after ([\d.]+)s", line).group(1))
        assert held_for >= ACK_WAIT * 2, line  # outlived its 1 s lifetime
        assert await worker_session(http, worker) is None
        depth = await dispatch.queue.depth()
        assert (depth.pending, depth.in_flight) == (0, 0)

    await on_each_queue(rigs, check)


async def test_no_job_within_claim_timeout_releases_the_worker_at_once(rigs, http):
    """An empty queue: the worker is released right after --claim-timeout, long before its lease would end."""

    async def check(rig: Rig) -> None:
        start_worker, dispatch, consumers = rig.start_worker, rig.dispatch, rig.consumers
        worker = await start_worker()
        await consumers.start(worker.ports.control)
        opened = time.monotonic()
        session_id = await open_session(http, worker, worker.create_body(lifetime=30.0))
        await wait_line(worker, rf"session {re.escape(session_id)} released by consumer", timeout=10)
        assert time.monotonic() - opened < CLAIM_TIMEOUT + 3
        released = await dispatch.wait_kind(RELEASED, "", 0)
        assert released.session_id == session_id
        assert [e.kind for e in dispatch.events] == [RELEASED], "only the release of a session that got no job"

    await on_each_queue(rigs, check)


async def test_poison_job_is_dead_lettered_after_max_attempts(rigs, http):
    """A job that always fails is retried once, dead-lettered on attempt 2, and not delivered again."""

    async def check(rig: Rig) -> None:
        start_worker, dispatch, consumers = rig.start_worker, rig.dispatch, rig.consumers
        worker = await start_worker()
        await consumers.start(worker.ports.control)
        await dispatch.publish("poison", exit=1)
        for attempt in (1, 2):
            await open_session(http, worker, worker.create_body(lifetime=LIFETIME))
            await dispatch.wait_kind(RELEASED, "poison", attempt)
        outcomes = [(e.attempt, e.outcome) for e in dispatch.of("poison", FINISHED)]
        assert outcomes == [(1, RETRY), (2, DEAD)]
        session_id = await open_session(http, worker, worker.create_body(lifetime=LIFETIME))
        await wait_line(worker, rf"session {re.escape(session_id)} released by consumer")
        assert [r[:2] for r in consumers.runs()] == [("poison", 1), ("poison", 2)]
        assert [(j.id, j.attempt) for j in await dispatch.queue.dead_letters()] == [("poison", 2)]
        depth = await dispatch.queue.depth()
        assert (depth.pending, depth.in_flight) == (0, 0)

    await on_each_queue(rigs, check)


# -- failures -----------------------------------------------------------------------------


async def test_consumer_killed_mid_job_lets_the_lease_lapse_and_the_job_is_redelivered(rigs, http):
    """SIGKILL of the consumer mid-job: its COMMAND dies too, the worker's lease lapses, the job runs again."""

    async def check(rig: Rig) -> None:
        start_worker, dispatch, consumers = rig.start_worker, rig.dispatch, rig.consumers
        worker = await start_worker()
        first = await consumers.start(worker.ports.control)
        await dispatch.publish("j1", sleep=60)
        session_id = await open_session(http, worker, worker.create_body(lifetime=30.0))
        await consumers.wait_runs(1)
        killed_at = time.monotonic()
        first.killpg()
        await wait_line(worker, rf"session {re.escape(session_id)} expired", timeout=ACK_WAIT + 5)
        assert time.monotonic() - killed_at < ACK_WAIT + 3  # the lease was the window, not the 30 s lifetime
        pid = consumers.runs()[0][3]
        deadline = time.monotonic() + 5
        while not process_gone(pid):
            assert time.monotonic() < deadline, "the job's process outlived its consumer"
            await asyncio.sleep(0.05)
        await consumers.start(worker.ports.control)
        await open_session(http, worker, worker.create_body(lifetime=LIFETIME))
        again = await dispatch.wait_kind(FINISHED, "j1", 2, timeout=ACK_WAIT + 15)
        assert again.outcome == DONE
        assert [r[:2] for r in consumers.runs()] == [("j1", 1), ("j1", 2)]

    await on_each_queue(rigs, check)


class KillOnRelease:
    """Sits on the consumer's control port: forwards to the worker, but SIGKILLs the consumer at /release."""

    def __init__(self, worker_control: str):
        self.worker_control = worker_control
        self.victim: ChildProcess | None = None
        self.killed = asyncio.Event()
        self.http: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{route:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/release":
            assert self.victim is not None
            self.victim.killpg()
            self.killed.set()
            raise web.HTTPServiceUnavailable()
        assert self.http is not None
        async with self.http.request(
            request.method, self.worker_control + request.path, data=await request.read(),
            headers={"Content-Type": "application/json"},
        ) as resp:  # fmt: skip
            return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")


async def test_ack_then_crash_before_release_runs_nothing_twice_and_the_lease_frees_the_worker(rigs, http):
    """The consumer dies between its ack and its /release: the job is not redelivered, the worker frees itself."""

    async def check(rig: Rig) -> None:
        start_worker, dispatch, consumers = rig.start_worker, rig.dispatch, rig.consumers
        from lib.standin.recorder import serving

        worker = await start_worker()
        proxy = KillOnRelease(worker.control)
        async with AsyncExitStack() as stack:
            proxy.http = await stack.enter_async_context(aiohttp.ClientSession())
            url = await stack.enter_async_context(serving(proxy.app()))
            proxy.victim = await consumers.start(int(url.rsplit(":", 1)[1]))
            await dispatch.publish("j1")
            session_id = await open_session(http, worker, worker.create_body(lifetime=30.0))
            await asyncio.wait_for(proxy.killed.wait(), 20)
            await wait_line(worker, rf"session {re.escape(session_id)} expired", timeout=ACK_WAIT + 5)
        # The lease lapsed a window after the last renewal, so AckWait has passed too: a fresh consumer
        # would be handed the job now, had the ack not held.
        await consumers.start(worker.ports.control)
        second = await open_session(http, worker, worker.create_body(lifetime=LIFETIME))
        await wait_line(worker, rf"session {re.escape(second)} released by consumer")
        assert [r[:2] for r in consumers.runs()] == [("j1", 1)]
        assert [e.outcome for e in dispatch.of("j1", FINISHED)] == [DONE]
        depth = await dispatch.queue.depth()
        assert (depth.pending, depth.in_flight) == (0, 0)

    await on_each_queue(rigs, check)


async def test_lease_ended_by_the_dispatcher_stops_the_job_without_ack(rigs, http):
    """/session/end mid-job makes /extend answer 409: the job is stopped, not acked, and runs again later."""

    async def check(rig: Rig) -> None:
        start_worker, dispatch, consumers = rig.start_worker, rig.dispatch, rig.consumers
        worker = await start_worker()
        await consumers.start(worker.ports.control)
        await dispatch.publish("j1", sleep=60)
        body = worker.create_body(lifetime=LIFETIME)
        session_id = await open_session(http, worker, body)
        await consumers.wait_runs(1)
        end = {"session_id": session_id, "session_auth": body["auth_data"]}
        async with http.post(worker.url + "/session/end", json=end) as resp:
            assert resp.status == 200, await resp.text()
        stopped = await dispatch.wait_kind(FINISHED, "j1", 1, timeout=ACK_WAIT + 5)
        assert stopped.outcome == ABANDONED and "lease" in stopped.detail, stopped
        assert process_gone(consumers.runs()[0][3])
        await open_session(http, worker, worker.create_body(lifetime=LIFETIME))
        again = await dispatch.wait_kind(FINISHED, "j1", 2, timeout=ACK_WAIT + 15)
        assert again.outcome == DONE

    await on_each_queue(rigs, check)


async def test_sigterm_mid_job_hands_it_back_releases_and_exits_0(rigs, http):
    """SIGTERM past --grace: the job is stopped and handed back at once, the worker released, exit 0."""

    async def check(rig: Rig) -> None:
        start_worker, dispatch, consumers = rig.start_worker, rig.dispatch, rig.consumers
        worker = await start_worker()
        first = await consumers.start(worker.ports.control, "--ack-wait", "20")
        await dispatch.publish("j1", sleep=60)
        session_id = await open_session(http, worker, worker.create_body(lifetime=LIFETIME))
        await dispatch.wait_kind(STARTED, "j1")
        first.send_signal(signal.SIGTERM)
        assert await first.wait(15) == 0, first.tail()
        await wait_line(worker, rf"session {re.escape(session_id)} released by consumer")
        stopped = dispatch.of("j1", FINISHED)
        assert [e.outcome for e in stopped] == [ABANDONED], stopped
        # Handed back, not left to the 20 s AckWait: the next session gets it at once.
        await consumers.start(worker.ports.control, "--ack-wait", "20")
        handed_back = time.monotonic()
        await open_session(http, worker, worker.create_body(lifetime=LIFETIME))
        again = await dispatch.wait_kind(FINISHED, "j1", 2, timeout=15)
        assert again.outcome == DONE and time.monotonic() - handed_back < 10

    await on_each_queue(rigs, check)


# -- bad input and start-up ---------------------------------------------------------------


async def test_missing_stream_is_retried_until_it_exists(rigs, http):
    """A queue server without the stream: one line saying so, health 503, and the loop starts once it exists."""
    from workers.null.queues import open_queue

    async def check(rig: Rig) -> None:
        queue_url = queue_url_for(rig.server, "fresh", group="null")  # a stream nobody has set up
        worker = await rig.start_worker()
        script = rig.consumers.tmp_path / "job.py"
        script.write_text(textwrap.dedent(JOB))
        run = await ChildProcess.python(
            "-m", "workers.null.consumer", "--queue", queue_url, "--control-port", str(worker.ports.control),
            "--health-port", "0", "--ack-wait", str(ACK_WAIT), "--", sys.executable, str(script), tail_lines=None,
        ).start()  # fmt: skip
        try:
            [match] = await run.wait_for_line(r"health endpoint on (http://\S+)", 20)
            await run.wait_for_line(r"queue unreachable", 20)
            async with http.get(match.group(1)) as resp:
                assert resp.status == 503
            queue = open_queue(queue_url, ack_wait=ACK_WAIT, max_deliver=2)
            await queue.connect()
            try:
                await queue.setup()
            finally:
                await queue.close()
            await run.wait_for_line(r"waiting for a session", START_TIMEOUT)
            async with http.get(match.group(1)) as resp:
                assert resp.status == 200
            assert len(run.matches(r"queue unreachable")) == 1
        finally:
            await run.stop(10.0)

    await on_each_queue(rigs, check)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://127.0.0.1:4222/jobs", "unknown scheme"),
        ("nats://127.0.0.1:4222/a/b", "more than one part"),
        ("redis://127.0.0.1:6379/x", "not a number"),
        ("nats://127.0.0.1:4222/jobs?bogus=1", "unknown parameter"),
        ("not a url", "no scheme"),
    ],
)
async def test_bad_queue_url_is_one_line_and_exit_2(url, needle):
    """A --queue URL the consumer cannot use: one line naming it, exit 2, no traceback."""
    argv = ["-m", "workers.null.consumer", "--queue", url, "--", sys.executable, "-c", "pass"]
    run = await ChildProcess.python(*argv, tail_lines=None).start()
    try:
        assert await run.wait(20) == 2, run.tail()
        assert len(run.lines) == 1 and needle in run.lines[0].lower(), run.tail()
    finally:
        await run.stop(10.0)
