"""The consumer's state machine against a fake of the worker's control server and an in-memory queue.

Both fakes record what the consumer did, in order, so each test checks the
lease mapping step by step; the end-to-end tests run the same paths against
real worker processes and real queue servers.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lib.standin.recorder import serving
from tests.helpers import usage_refused
from workers.null.consumer import Consumer, ConsumerOptions, JobContext
from workers.null.consumer.cli import main, split_command
from workers.null.consumer.control import ControlClient
from workers.null.consumer.runs import CommandRun, command_runs, handler_runs
from workers.null.protocol import ABANDONED, CLAIMED, DEAD, DONE, FINISHED, RELEASED, RETRY, STARTED, JobEvent
from workers.null.queues.base import Claim, Depth, Job, NotOwned, Queue, QueueUnavailable

WINDOW = 0.6  # ack_wait: renewals every 0.2 s


# -- fakes ---------------------------------------------------------------------------------


class FakeControl:
    """The worker's control routes, holding at most one session the test opens."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.held: str | None = None
        self.claimed: set[str] = set()
        self.gone: set[str] = set()  # sessions whose lease the test took away
        self._opened = asyncio.Event()
        self.stopping = False
        self.url = ""
        self.released_at: dict[str, float] = {}
        self.refuse_releases = 0  # answer this many /release calls with 500

    def open(self, session_id: str) -> None:
        self.held = session_id
        self._opened.set()

    def wake(self) -> None:
        """Ends a /claim still waiting, so the server can stop without waiting it out."""
        self._opened.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/claim", self._claim)
        app.router.add_post("/extend", self._extend)
        app.router.add_post("/release", self._release)
        return app

    def routes(self, session_id: str | None = None) -> list[str]:
        return [route for route, body in self.calls if session_id is None or body.get("session_id") == session_id]

    async def _claim(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("/claim", body))
        if self.stopping:
            return web.json_response({"error": "worker is stopping"}, status=503)
        if self.held is None:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._opened.wait(), body["timeout"])
        self._opened.clear()
        if self.held is None:
            return web.json_response({"session": None})
        self.claimed.add(self.held)
        session = {"session_id": self.held, "expires_in": 60.0, "lifetime": 60.0, "claimed": True}
        return web.json_response({"session": session})

    async def _extend(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("/extend", body))
        if body["session_id"] != self.held or body["session_id"] in self.gone:
            return web.json_response({"error": "session is not held"}, status=409)
        return web.json_response({"extended": True, "session_id": self.held, "expires_in": body["seconds"]})

    async def _release(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("/release", body))
        if self.refuse_releases:
            self.refuse_releases -= 1
            return web.json_response({"error": "internal"}, status=500)
        self.released_at[body["session_id"]] = time.monotonic()
        if body["session_id"] != self.held:
            return web.json_response({"released": False, "reason": "not held"})
        self.held = None
        return web.json_response({"released": True, "session_ids": [body["session_id"]]})


class MemoryClaim(Claim):
    def __init__(self, queue: MemoryQueue, job: Job):
        self.queue = queue
        self.job = job
        self._owned = True

    @property
    def owned(self) -> bool:
        return self._owned

    def lose(self) -> None:
        """The job went to another consumer, as when its AckWait ran out unrenewed."""
        self._owned = False

    def _check(self, verb: str) -> None:
        if not self._owned:
            self.queue.steps.append((f"{verb} refused", self.job.id, self.job.attempt))
            raise NotOwned(f"job {self.job.id} was handed to another consumer")

    async def keep_alive(self) -> None:
        self._check("keep_alive")
        self.queue.steps.append(("keep_alive", self.job.id, self.job.attempt))

    async def ack(self) -> None:
        self._check("ack")
        self.queue.steps.append(("ack", self.job.id, self.job.attempt))
        self.queue.acked_at[self.job.id] = time.monotonic()

    async def retry(self, delay: float) -> None:
        self._check("retry")
        self.queue.steps.append(("retry", self.job.id, self.job.attempt, delay))
        again = Job(self.job.id, self.job.body, self.job.attempt + 1)
        asyncio.get_running_loop().call_later(delay, self.queue.ready.put_nowait, again)

    async def give_up(self, reason: str) -> None:
        self._check("give_up")
        self.queue.steps.append(("give_up", self.job.id, self.job.attempt, reason))


class MemoryQueue(Queue):
    """Jobs in a list; what the consumer did to them in ``steps``, the events it published in ``published``."""

    claim_type = MemoryClaim

    def __init__(self, ack_wait: float = WINDOW, max_deliver: int = 3, unreachable_for: int = 0):
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.ready: asyncio.Queue[Job] = asyncio.Queue()
        self.steps: list[tuple] = []
        self.published: list[JobEvent] = []
        self.claims: list[MemoryClaim] = []
        self.unreachable_for = unreachable_for
        self.connects = 0
        self.acked_at: dict[str, float] = {}
        self._event_arrived = asyncio.Event()

    async def connect(self) -> None:
        self.connects += 1
        if self.connects <= self.unreachable_for:
            raise QueueUnavailable("memory://jobs does not answer")

    async def close(self) -> None:
        pass

    async def setup(self) -> None:
        pass

    async def check(self) -> None:
        pass

    async def publish(self, job_id: str, body: bytes) -> bool:
        self.ready.put_nowait(Job(job_id, body, 1))
        return True

    async def claim(self, consumer: str, timeout: float) -> Claim | None:
        try:
            job = await asyncio.wait_for(self.ready.get(), timeout)
        except asyncio.TimeoutError:
            return None
        claim = self.claim_type(self, job)
        self.claims.append(claim)
        self.steps.append(("claim", job.id, job.attempt))
        return claim

    async def depth(self) -> Depth:
        return Depth(self.ready.qsize(), 0)

    async def publish_event(self, event: JobEvent) -> None:
        self.published.append(event)
        self._event_arrived.set()

    def events(self) -> AsyncIterator[JobEvent]:
        raise NotImplementedError("the consumer only publishes")

    def new_jobs(self) -> AsyncIterator[str]:
        raise NotImplementedError("the consumer only publishes")

    def kinds(self, job_id: str | None = None) -> list[tuple[str, str | None]]:
        return [(e.kind, e.outcome) for e in self.published if job_id is None or e.job_id == job_id]

    def verbs(self) -> list[str]:
        return [step[0] for step in self.steps if step[0] != "keep_alive"]

    async def wait_event(self, predicate: Callable[[JobEvent], bool], timeout: float = 10.0) -> JobEvent:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.published:
                if predicate(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such job event within {timeout}s; published: {self.kinds()}")
            self._event_arrived.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event_arrived.wait(), left)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def control() -> AsyncIterator[FakeControl]:
    fake = FakeControl()
    async with serving(fake.app()) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.wake()


class Running:
    def __init__(self, consumer: Consumer, task: asyncio.Task):
        self.consumer = consumer
        self.task = task

    async def stop(self, timeout: float = 10.0) -> None:
        self.consumer.stop()
        await asyncio.wait_for(asyncio.shield(self.task), timeout)


@pytest.fixture
async def start(control: FakeControl) -> AsyncIterator[Callable[..., Any]]:
    running: list[Running] = []

    async def start(queue: MemoryQueue, runs, **options: Any) -> Running:
        port = int(control.url.rsplit(":", 1)[1])
        opts = ConsumerOptions(
            **{
                "claim_timeout": 1.0,
                "retry_delay": 0.05,
                "health_port": None,
                "name": "t",
                "session_wait": 5.0,
                **options,
            }
        )
        consumer = Consumer(queue, runs, opts, control=ControlClient(port))
        run = Running(consumer, asyncio.ensure_future(consumer.run()))
        running.append(run)
        return run

    try:
        yield start
    finally:
        for run in running:
            if not run.task.done():
                run.consumer.stop()
                run.consumer.stop()
                with suppress(Exception):
                    await asyncio.wait_for(run.task, 10)


def script(tmp_path: Path, body: str) -> list[str]:
    """A Python COMMAND from source text."""
    path = tmp_path / f"job{len(list(tmp_path.iterdir()))}.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


async def finished(queue: MemoryQueue, job_id: str, timeout: float = 10.0) -> JobEvent:
    return await queue.wait_event(lambda e: e.kind == FINISHED and e.job_id == job_id, timeout)


async def released(queue: MemoryQueue, job_id: str, timeout: float = 10.0) -> JobEvent:
    return await queue.wait_event(lambda e: e.kind == RELEASED and e.job_id == job_id, timeout)


# -- the lease mapping ---------------------------------------------------------------------


async def test_done_job_is_acked_then_its_session_released(control, start, tmp_path):
    """Exit 0: claim, renewals, ack confirmed, then /release naming the session; events in that order."""
    queue = MemoryQueue()
    await queue.publish("j1", b"hello")
    out = tmp_path / "out"
    command = script(
        tmp_path,
        f"""
        import os, sys, time
        data = sys.stdin.buffer.read()
        time.sleep({WINDOW})
        env = [os.environ[name] for name in ("NULL_JOB_ID", "NULL_JOB_ATTEMPT", "NULL_SESSION_ID")]
        open({str(out)!r}, "w").write(" ".join([data.decode(), *env]))
    """,
    )
    await start(queue, command_runs(command))
    control.open("s1")
    await released(queue, "j1")
    assert out.read_text() == "hello j1 1 s1"
    assert queue.verbs() == ["claim", "ack"]
    assert queue.kinds("j1") == [(CLAIMED, None), (STARTED, None), (FINISHED, DONE), (RELEASED, None)]
    assert [e.session_id for e in queue.published] == ["s1"] * 4
    routes = control.routes("s1")
    assert routes[-1] == "/release" and routes.count("/release") == 1
    assert routes.count("/extend") >= 3, routes  # at once, then every window / 3 while it ran
    keep_alives = [s for s in queue.steps if s[0] == "keep_alive"]
    assert len(keep_alives) >= 2, queue.steps
    assert queue.acked_at["j1"] < control.released_at["s1"], "the ack must be confirmed before the release"


class SwallowingClaim(MemoryClaim):
    """Its first renewal stays in flight until cancelled and swallows that cancellation, as a library's wait_for
    can before Python 3.12; it touches ``renewing`` once in flight."""

    renewing: Path
    swallowed = 0

    async def keep_alive(self) -> None:
        await super().keep_alive()
        if type(self).swallowed:
            return
        self.renewing.touch()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            type(self).swallowed += 1  # the renewal carries on as if its request had just completed


async def test_session_is_released_even_if_a_renewal_swallowed_its_cancellation(control, start, tmp_path):
    """A job that ends while a renewal swallows its cancel still gets its /release: the renewer is cancelled again."""
    queue = MemoryQueue()
    queue.claim_type = SwallowingClaim
    SwallowingClaim.renewing = tmp_path / "renewing"
    await queue.publish("j1", b"")
    # The job ends once the renewal is in flight.
    wait_for_renewal = f"import os, time\nwhile not os.path.exists({str(SwallowingClaim.renewing)!r}): time.sleep(0.01)"
    await start(queue, command_runs([sys.executable, "-c", wait_for_renewal]))
    control.open("s1")
    await released(queue, "j1", timeout=8.0)
    assert SwallowingClaim.swallowed == 1
    assert control.routes("s1")[-1] == "/release"


async def test_failed_job_is_retried_after_the_delay_then_released(control, start, tmp_path):
    """Nonzero exit before the last attempt: retry(--retry-delay), then /release."""
    queue = MemoryQueue()
    await queue.publish("j1", b"")
    await start(queue, command_runs(script(tmp_path, "raise SystemExit(3)")), retry_delay=0.25)
    control.open("s1")
    event = await finished(queue, "j1")
    assert (event.outcome, event.detail) == (RETRY, "exit 3")
    await released(queue, "j1")
    assert ("retry", "j1", 1, 0.25) in queue.steps
    assert control.routes("s1")[-1] == "/release"


async def test_poison_job_is_dead_lettered_on_the_last_attempt(control, start, tmp_path):
    """A job failing every time is retried until --max-attempts, then given up, never acked."""
    queue = MemoryQueue()
    await queue.publish("poison", b"")
    await start(queue, command_runs(script(tmp_path, "raise SystemExit(1)")), max_attempts=3)
    for n in range(1, 4):
        control.open(f"s{n}")
        await queue.wait_event(lambda e, n=n: e.kind == RELEASED and e.attempt == n)
    outcomes = [(e.attempt, e.outcome) for e in queue.published if e.kind == FINISHED]
    assert outcomes == [(1, RETRY), (2, RETRY), (3, DEAD)]
    assert queue.verbs() == ["claim", "retry", "claim", "retry", "claim", "give_up"]


async def test_job_past_max_attempts_is_dead_lettered_without_running(control, start, tmp_path):
    """A delivery whose attempt is already past --max-attempts is given up and never run."""
    queue = MemoryQueue()
    queue.ready.put_nowait(Job("old", b"", 5))
    marker = tmp_path / "ran"
    await start(queue, command_runs(script(tmp_path, f"open({str(marker)!r}, 'w')")), max_attempts=3)
    control.open("s1")
    event = await finished(queue, "old")
    assert event.outcome == DEAD
    assert not marker.exists()
    assert queue.kinds("old") == [(CLAIMED, None), (FINISHED, DEAD)]


async def test_no_job_within_claim_timeout_releases_at_once(control, start):
    """An empty queue: the session is released right after --claim-timeout, with only a released event naming no job."""
    queue = MemoryQueue()
    await start(queue, command_runs([sys.executable, "-c", "pass"]), claim_timeout=0.3)
    opened = time.monotonic()
    control.open("s1")
    deadline = time.monotonic() + 5
    while "/release" not in control.routes("s1"):
        assert time.monotonic() < deadline, control.calls
        await asyncio.sleep(0.02)
    assert 0.3 <= time.monotonic() - opened < 1.5
    event = await queue.wait_event(lambda e: e.kind == RELEASED)
    assert (event.job_id, event.attempt, event.session_id) == ("", 0, "s1")
    assert queue.published == [event], "an event other than the release of a session that got no job"


async def test_lease_gone_stops_the_job_and_does_not_ack(control, start, tmp_path):
    """/extend answering 409 stops COMMAND's process group and hands the job back at once: no ack."""
    queue = MemoryQueue()
    await queue.publish("j1", b"")
    pid_file = tmp_path / "pid"
    command = script(
        tmp_path,
        f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """,
    )
    await start(queue, command_runs(command))
    control.open("s1")
    await queue.wait_event(lambda e: e.kind == STARTED)
    control.gone.add("s1")
    event = await finished(queue, "j1")
    assert event.outcome == ABANDONED and "lease gone" in event.detail and "handed back at once" in event.detail
    assert queue.verbs() == ["claim", "retry"]
    pid = int(pid_file.read_text())
    from tests.standin import process_gone

    assert process_gone(pid)
    await released(queue, "j1")


async def test_claim_not_owned_stops_the_job_and_never_acks(control, start, tmp_path):
    """keep_alive raising NotOwned stops the job; the consumer neither acks nor hands it back, and releases."""
    queue = MemoryQueue()
    await queue.publish("j1", b"")
    await start(queue, command_runs(script(tmp_path, "import time; time.sleep(60)")))
    control.open("s1")
    await queue.wait_event(lambda e: e.kind == STARTED)
    queue.claims[0].lose()
    event = await finished(queue, "j1")
    assert event.outcome == ABANDONED and "not owned" in event.detail
    await released(queue, "j1")
    assert "ack" not in queue.verbs() and "retry" not in queue.verbs()
    assert control.routes("s1")[-1] == "/release"


async def test_claim_lost_at_ack_time_is_not_acked(control, start, tmp_path):
    """A job that succeeds after its claim went elsewhere is not acked: ownership is checked first."""
    queue = MemoryQueue(ack_wait=30.0)  # no renewal lands between the loss and the end
    await queue.publish("j1", b"")
    gate = tmp_path / "go"
    await start(
        queue,
        command_runs(
            script(
                tmp_path,
                f"""
        import os, time
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
    """,
            )
        ),
    )
    control.open("s1")
    await queue.wait_event(lambda e: e.kind == STARTED)
    queue.claims[0].lose()
    gate.write_text("")
    event = await finished(queue, "j1")
    assert event.outcome == ABANDONED and "not owned" in event.detail
    assert ("ack", "j1", 1) not in queue.steps
    await released(queue, "j1")


async def test_session_whose_release_failed_gets_no_second_job(control, start, tmp_path):
    """A release that did not land leaves the session held; the consumer releases it again, not taking a job."""
    queue = MemoryQueue()
    await queue.publish("j1", b"")
    await queue.publish("j2", b"")
    control.refuse_releases = 1
    await start(queue, command_runs([sys.executable, "-c", "pass"]))
    control.open("s1")
    await finished(queue, "j1")
    deadline = time.monotonic() + 5
    while control.held is not None:
        assert time.monotonic() < deadline, control.calls
        await asyncio.sleep(0.02)
    assert control.routes("s1").count("/release") == 2
    assert [s[1] for s in queue.steps if s[0] == "claim"] == ["j1"]
    control.open("s2")
    await finished(queue, "j2")


# -- stopping ------------------------------------------------------------------------------


async def test_stop_lets_a_job_finish_within_grace_then_acks_and_exits(control, start, tmp_path):
    """SIGTERM during a job that ends within --grace: it is acked, the session released, the loop ends."""
    queue = MemoryQueue()
    await queue.publish("j1", b"")
    gate = tmp_path / "go"
    consumer_run = await start(
        queue,
        command_runs(
            script(
                tmp_path,
                f"""
        import os, time
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
    """,
            )
        ),
        grace=10.0,
    )
    control.open("s1")
    await queue.wait_event(lambda e: e.kind == STARTED)
    consumer_run.consumer.stop()
    await asyncio.sleep(0)
    gate.write_text("")
    await asyncio.wait_for(consumer_run.task, 10)
    assert queue.kinds("j1")[-2:] == [(FINISHED, DONE), (RELEASED, None)]
    assert control.routes()[-1] == "/release"


async def test_stop_past_grace_stops_the_job_hands_it_back_and_releases(control, start, tmp_path):
    """SIGTERM during a job that outlasts --grace: the job is stopped, retried at once, the session released."""
    queue = MemoryQueue()
    await queue.publish("j1", b"")
    run = await start(queue, command_runs(script(tmp_path, "import time; time.sleep(60)")), grace=0.3)
    control.open("s1")
    await queue.wait_event(lambda e: e.kind == STARTED)
    stopped_at = time.monotonic()
    run.consumer.stop()
    await asyncio.wait_for(run.task, 10)
    assert time.monotonic() - stopped_at < 5
    assert ("retry", "j1", 1, 0) in queue.steps
    event = next(e for e in queue.published if e.kind == FINISHED)
    assert event.outcome == ABANDONED and "stopped" in event.detail
    assert control.routes("s1")[-1] == "/release"


async def test_stop_while_waiting_for_a_job_releases_the_session(control, start):
    """SIGTERM while the queue is empty: the wait ends, the session is released, nothing is claimed."""
    queue = MemoryQueue()
    run = await start(queue, command_runs([sys.executable, "-c", "pass"]), claim_timeout=30.0)
    control.open("s1")
    deadline = time.monotonic() + 5
    while run.consumer.state != "waiting for a job":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await run.stop()
    assert control.routes("s1")[-1] == "/release"
    assert queue.steps == []


async def test_stop_while_waiting_for_a_session_exits_at_once(control, start):
    """SIGTERM with no session: the blocking /claim is abandoned and the loop ends promptly."""
    queue = MemoryQueue()
    run = await start(queue, command_runs([sys.executable, "-c", "pass"]))
    deadline = time.monotonic() + 5
    while not control.routes():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    began = time.monotonic()
    await run.stop()
    assert time.monotonic() - began < 1.0


# -- start-up and loops --------------------------------------------------------------------


async def test_unreachable_queue_is_retried_with_backoff(control, start, caplog):
    """A queue that does not answer at first is retried; one warning line, then the loop runs."""
    queue = MemoryQueue(unreachable_for=3)
    await queue.publish("j1", b"")
    caplog.set_level("INFO", logger="workers.null.consumer")
    await start(queue, command_runs([sys.executable, "-c", "pass"]))
    control.open("s1")
    await finished(queue, "j1")
    assert queue.connects == 4
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warnings) == 1


async def test_unreachable_control_server_is_retried(start, tmp_path):
    """No worker answering yet: /claim is retried until one comes up on the control port."""
    from lib.standin.process import free_port

    port = free_port()
    fake = FakeControl()
    queue = MemoryQueue()
    await queue.publish("j1", b"")
    opts = ConsumerOptions(claim_timeout=1.0, health_port=None, name="t", session_wait=5.0)
    consumer = Consumer(queue, command_runs([sys.executable, "-c", "pass"]), opts, control=ControlClient(port))
    task = asyncio.ensure_future(consumer.run())
    try:
        await asyncio.sleep(0.5)  # let it fail against a closed port a few times
        assert not task.done()
        runner = web.AppRunner(fake.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            fake.open("s1")
            await finished(queue, "j1")
        finally:
            consumer.stop()
            await asyncio.wait_for(task, 10)
            fake.wake()
            await runner.cleanup()
    finally:
        if not task.done():
            task.cancel()
    assert queue.kinds("j1")[2] == (FINISHED, DONE)


async def test_worker_stopping_is_waited_out(control, start):
    """/claim answering 503 keeps the consumer alive and asking, without a session."""
    control.stopping = True
    queue = MemoryQueue()
    run = await start(queue, command_runs([sys.executable, "-c", "pass"]))
    deadline = time.monotonic() + 5
    while control.routes().count("/claim") < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert not run.task.done()


async def test_health_endpoint_is_503_until_the_queue_answers_then_200(control, start):
    """GET /health is 503 while the queue is unreachable, 200 once the loop runs, and gone after it stopped."""
    queue = MemoryQueue(unreachable_for=10**6)
    run = await start(queue, command_runs([sys.executable, "-c", "pass"]), health_port=0)
    deadline = time.monotonic() + 5
    while run.consumer.health_port is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{run.consumer.health_port}/health"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 503
            assert (await resp.json())["state"] == "connecting to the queue"
        queue.unreachable_for = 0
        deadline = time.monotonic() + 5
        while True:
            async with http.get(url) as resp:
                if resp.status == 200:
                    assert (await resp.json())["state"] == "waiting for a session"
                    break
            assert time.monotonic() < deadline, "health never turned 200"
            await asyncio.sleep(0.05)
        await run.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(url):
                pass


# -- handlers ------------------------------------------------------------------------------


async def test_async_handler_gets_the_job_and_is_acked(control, start):
    """An async handler is awaited with a JobContext; returning is success."""
    queue = MemoryQueue()
    await queue.publish("j1", b'{"n": 2}')
    seen: list[JobContext] = []

    async def handler(job: JobContext) -> None:
        seen.append(job)

    await start(queue, handler_runs(handler))
    control.open("s1")
    assert (await finished(queue, "j1")).outcome == DONE
    assert seen[0].json() == {"n": 2} and (seen[0].id, seen[0].attempt, seen[0].session_id) == ("j1", 1, "s1")


async def test_sync_handler_that_raises_is_retried(control, start):
    """A plain handler runs in a thread; an exception is a failed attempt, named in the event."""
    queue = MemoryQueue()
    await queue.publish("j1", b"")

    def handler(job: JobContext) -> None:
        raise ValueError(f"bad job {job.id}")

    await start(queue, handler_runs(handler))
    control.open("s1")
    event = await finished(queue, "j1")
    assert (event.outcome, event.detail) == (RETRY, "ValueError: bad job j1")


async def test_async_handler_is_cancelled_when_the_lease_is_gone(control, start):
    """A lost lease cancels a running async handler."""
    queue = MemoryQueue()
    await queue.publish("j1", b"")
    cancelled = asyncio.Event()

    async def handler(job: JobContext) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await start(queue, handler_runs(handler))
    control.open("s1")
    await queue.wait_event(lambda e: e.kind == STARTED)
    control.gone.add("s1")
    assert (await finished(queue, "j1")).outcome == ABANDONED
    assert cancelled.is_set()


async def test_command_run_stops_its_whole_process_group(tmp_path):
    """Stopping COMMAND signals its process group, so a child it started is stopped too."""
    child_pid = tmp_path / "child"
    command = script(
        tmp_path,
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(child_pid)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """,
    )
    run = CommandRun(command, JobContext("j", b"", 1, "s"))
    await run.start()
    deadline = time.monotonic() + 10
    while not child_pid.exists() or not child_pid.read_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await run.stop(2.0)
    from tests.standin import process_gone

    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 5
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"child {pid} still running"
        await asyncio.sleep(0.02)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--queue", "nats://127.0.0.1:4222/jobs"], "no COMMAND"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--", "/no/such/program"], "not an executable"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--handler", "nosuchmodule_x:run"], "cannot import"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--handler", "json:nosuch"], "has no"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--handler", "json"], "not module:function"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--handler", "json:dumps", "--", "true"], "both --handler"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--claim-timeout", "0", "--", "true"], "--claim-timeout"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--max-attempts", "0", "--", "true"], "--max-attempts"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--retry-delay", "-1", "--", "true"], "--retry-delay"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--ack-wait", "nan", "--", "true"], "--ack-wait"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--grace", "-1", "--", "true"], "--grace"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--control-port", "70000", "--", "true"], "--control-port"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--health-port", "-5", "--", "true"], "--health-port"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--claim-timeout", "soon", "--", "true"], "invalid float"),
        (["--", "true"], "--queue"),
        (["--queue", "nats://127.0.0.1:4222/jobs", "--bogus", "--", "true"], "unrecognized"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    """Each kind of bad flag or COMMAND: exit 2 with one line naming it, no traceback."""
    line = usage_refused(capsys, lambda: sys.exit(main(argv, env={})))  # main returns 2 or exits with it
    assert needle in line, line


def test_bad_control_port_in_the_environment_is_one_line_and_exit_2(capsys):
    """NULL_CONTROL_PORT that is not a port: exit 2 naming the variable."""
    assert main(["--queue", "nats://127.0.0.1:4222/jobs", "--", "true"], env={"NULL_CONTROL_PORT": "x"}) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "NULL_CONTROL_PORT" in err


def test_split_command_keeps_the_commands_own_flags():
    """Everything after the first -- belongs to COMMAND, including its own --flags and a second --."""
    flags, command = split_command(["--queue", "u", "--", "prog", "--queue", "--", "x"])
    assert flags == ["--queue", "u"] and command == ["prog", "--queue", "--", "x"]
