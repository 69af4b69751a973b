"""The examples docs/deploying.md points to, run: both consumers beside a real
worker, and the dispatcher through the real SDK against the local stand-in with
a consumer beside each worker it starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest

from lib.standin.autoscaler import LocalConfig, serve
from lib.standin.book import BookSettings
from lib.standin.fleet import FleetSettings
from lib.standin.process import ChildProcess
from lib.standin.recorder import RecordingAutoscaler, serving
from lib.standin.scaling import EndpointParams
from tests.helpers import RunningWorker, StartWorker, callbacks_for, open_session, side_by_side, status_of, wait_until
from workers.null.dispatch import sdk

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CONSUMERS = {
    "shell": [str(EXAMPLES / "consumer.sh")],
    "python": [sys.executable, str(EXAMPLES / "consumer.py")],
}


def consumer_available(kind: str) -> bool:
    return kind == "python" or (shutil.which("curl") is not None and shutil.which("jq") is not None)


async def with_each_consumer(check: Callable[[str], Awaitable[None]]) -> None:
    """Runs ``check(kind)`` for both consumer examples at once, each beside its own worker.

    Should the shell example lack curl or jq, the Python one still runs and
    the test is then reported as skipped, saying so.
    """
    kinds = [kind for kind in CONSUMERS if consumer_available(kind)]
    await side_by_side({f"the {kind} consumer": check(kind) for kind in kinds})
    if len(kinds) < len(CONSUMERS):
        pytest.skip(f"only the {', '.join(kinds)} consumer ran: the shell one needs curl and jq")


@dataclasses.dataclass
class Jobs:
    """A job runner and a requeue command for the consumers, driven through files.

    ``run_job.sh ID`` notes that it started, then waits for the test to write
    ``finish-ID`` ("ok" or anything else for a failure).
    """

    root: Path

    @classmethod
    def create(cls, root: Path) -> Jobs:
        root.mkdir()
        run = root / "run_job.sh"
        run.write_text(
            "#!/bin/sh\n"
            f'echo "$1" >> "{root}/started"\n'
            f'while [ ! -e "{root}/finish-$1" ]; do sleep 0.05; done\n'
            f'[ "$(cat "{root}/finish-$1")" = ok ]\n'
        )
        requeue = root / "requeue_job.sh"
        requeue.write_text(f'#!/bin/sh\necho "$1" >> "{root}/requeued"\n')
        for script in (run, requeue):
            script.chmod(0o755)
        return cls(root)

    @property
    def args(self) -> list[str]:
        return [str(self.root / "run_job.sh"), str(self.root / "requeue_job.sh")]

    def finish(self, job: str, outcome: str = "ok") -> None:
        (self.root / f"finish-{job}").write_text(outcome)

    def listed(self, name: str) -> list[str]:
        path = self.root / name
        return path.read_text().split() if path.exists() else []


@dataclasses.dataclass
class Beside:
    """A real worker, the job files and one example consumer running beside the worker."""

    worker: RunningWorker
    jobs: Jobs
    consumer: ChildProcess

    def explain(self) -> str:
        return f"consumer:\n{self.consumer.tail()}\n{self.worker.explain()}"


@asynccontextmanager
async def consumers() -> AsyncIterator:
    """Starts consumer processes on demand; stops each one and its process group on the way out."""
    started: list[ChildProcess] = []

    async def start(kind: str, control_port: int, jobs: Jobs, lease: float) -> ChildProcess:
        env = dict(os.environ, NULL_CONTROL_PORT=str(control_port), LEASE_SECONDS=str(lease), PYTHONUNBUFFERED="1")
        # The consumer loops forever by design; its group holds the job and the lease keeper too.
        consumer = ChildProcess([*CONSUMERS[kind], *jobs.args], env=env, tail_lines=None)
        started.append(consumer)
        return await consumer.start()

    try:
        yield start
    finally:
        for consumer in started:
            await consumer.stop(5.0)


@asynccontextmanager
async def consumer_beside(start_worker: StartWorker, kind: str, root: Path, lease: float) -> AsyncIterator[Beside]:
    """A new worker with the ``kind`` consumer beside it, over job files in ``root``; the consumer stops after."""
    worker = await start_worker()
    jobs = Jobs.create(root)
    async with consumers() as start:
        yield Beside(worker, jobs, await start(kind, worker.ports.control, jobs, lease))


async def held_session(http: aiohttp.ClientSession, worker: RunningWorker):
    return (await status_of(http, worker))["session"]


async def callback_of(autoscaler: RecordingAutoscaler, session_id: str, timeout: float, explain) -> dict:
    """The body of the on-close callback that names ``session_id``, once it arrives."""
    found = await autoscaler.wait_for(
        lambda: callbacks_for(autoscaler, session_id), timeout, lambda: f"the callback of {session_id}\n{explain()}"
    )
    return found[0].body


@pytest.mark.slow
async def test_consumer_keeps_the_lease_past_the_lifetime_and_releases_when_the_job_is_done(
    start_worker: StartWorker, autoscaler: RecordingAutoscaler, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A consumer runs the job named in the session, renews the lease past its 3 s lifetime while the job runs,
    and releases when it is done."""

    async def check(kind: str) -> None:
        async with consumer_beside(start_worker, kind, tmp_path / f"jobs-{kind}", lease=3) as beside:
            worker, jobs, consumer, explain = beside.worker, beside.jobs, beside.consumer, beside.explain
            opened_at = time.monotonic()
            session_id = await open_session(http, worker, worker.create_body(lifetime=3, job="job-7"))
            await wait_until(lambda: jobs.listed("started") == ["job-7"], 15, "the job to start", explain)
            # Half a lifetime past the first one: an unrenewed lease would have lapsed by then.
            while time.monotonic() - opened_at < 4.5:
                held = await held_session(http, worker)
                assert held is not None and held["session_id"] == session_id, (
                    f"the lease lapsed while the job ran\n{explain()}"
                )
                await asyncio.sleep(0.25)
            jobs.finish("job-7")
            callback = await callback_of(autoscaler, session_id, 10, explain)
            assert callback == {"job": "job-7", "session_id": session_id}
            assert await held_session(http, worker) is None
            await wait_until(lambda: "job job-7: done" in consumer.lines, 5, "the consumer's done line", explain)
        assert jobs.listed("requeued") == []
        await worker.process.wait_for_line(r"released by consumer \(/release\)", 5)

    await with_each_consumer(check)


@pytest.mark.slow
async def test_consumer_requeues_a_failed_job_and_still_releases_the_worker(
    start_worker: StartWorker, autoscaler: RecordingAutoscaler, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """When the job fails the consumer requeues it and releases the worker at once instead of holding it until
    the lease lapses."""

    async def check(kind: str) -> None:
        async with consumer_beside(start_worker, kind, tmp_path / f"jobs-{kind}", lease=60) as beside:
            worker, jobs, consumer, explain = beside.worker, beside.jobs, beside.consumer, beside.explain
            jobs.finish("job-8", "fail")
            session_id = await open_session(http, worker, worker.create_body(lifetime=60, job="job-8"))
            callback = await callback_of(autoscaler, session_id, 15, explain)
            assert callback == {"job": "job-8", "session_id": session_id}
            assert jobs.listed("requeued") == ["job-8"]
            await wait_until(
                lambda: "job job-8: failed, requeued" in consumer.lines, 5, "the consumer's failure line", explain
            )
        await worker.process.wait_for_line(r"released by consumer \(/release\)", 5)

    await with_each_consumer(check)


@pytest.mark.slow
async def test_a_killed_consumer_stops_renewing_and_the_lease_lapses(
    start_worker: StartWorker, autoscaler: RecordingAutoscaler, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """SIGKILL to the consumer mid-job ends its renewals, so the worker frees itself when the lease runs out."""

    async def check(kind: str) -> None:
        async with consumer_beside(start_worker, kind, tmp_path / f"jobs-{kind}", lease=3) as beside:
            worker, jobs, consumer, explain = beside.worker, beside.jobs, beside.consumer, beside.explain
            session_id = await open_session(http, worker, worker.create_body(lifetime=3, job="job-9"))
            await wait_until(lambda: jobs.listed("started") == ["job-9"], 15, "the job to start", explain)
            consumer.kill()  # the consumer only: its job and lease keeper are left behind
            killed_at = time.monotonic()
            callback = await callback_of(autoscaler, session_id, 15, explain)
            assert callback == {"job": "job-9", "session_id": session_id}
            assert time.monotonic() - killed_at <= 3 + 1 + 2, "the lease outlived the consumer by more than one lease"
            assert await held_session(http, worker) is None
        await worker.process.wait_for_line(r"expired after", 5)

    await with_each_consumer(check)


def load_dispatcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploying_dispatcher_example", EXAMPLES / "dispatcher.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
async def test_dispatcher_reserves_one_worker_per_job_and_learns_when_the_consumers_end_them(tmp_path: Path) -> None:
    """Through the SDK and the local stand-in, the dispatcher example reserves a worker for each of 3 jobs, the
    consumer beside each worker runs its job and releases it, and the dispatcher hears every session end."""

    dispatcher = load_dispatcher()
    jobs = Jobs.create(tmp_path / "jobs")
    names = ["job-a", "job-b", "job-c"]
    for name in names:
        jobs.finish(name)
    config = LocalConfig(
        port=0,
        fleet=FleetSettings(
            book=BookSettings(
                params=EndpointParams(
                    target_util=1.0, min_load=0, max_workers=3, max_queue_time=1, target_queue_time=0.5
                )
            ),
            provisioning_delay=0.0,
        ),
    )
    ended: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    async with AsyncExitStack() as stack:
        standin = await stack.enter_async_context(serve(config))
        callback_url = await stack.enter_async_context(serving(dispatcher.callback_app(ended, "/session-ended")))
        start = await stack.enter_async_context(consumers())
        attached: dict[int, ChildProcess] = {}

        async def attach_consumers() -> None:
            # What the template's on-start script does on Vast: a consumer beside each worker.
            while True:
                for inst in standin.fleet.live():
                    if inst.id not in attached and inst.ports is not None:
                        attached[inst.id] = await start("python", inst.ports.control, jobs, 60)
                await asyncio.sleep(0.05)

        attacher = asyncio.ensure_future(attach_consumers())

        def explain() -> str:
            return (
                "\n".join(f"consumer beside worker {i}:\n{c.tail()}" for i, c in attached.items())
                + "\n"
                + standin.fleet.summary()
            )

        try:
            client = sdk.make_client(config.api_key, "local", standin.url)
            stack.push_async_callback(client.close)
            endpoint = await client.get_endpoint(config.endpoint_name)
            try:
                sessions = await asyncio.wait_for(
                    dispatcher.dispatch(endpoint, names, f"{callback_url}/session-ended"), 90
                )
            except asyncio.TimeoutError:
                raise AssertionError(f"not every job got a worker within 90s\n{explain()}") from None
            assert sorted(sessions) == names and len({s.session_id for s in sessions.values()}) == 3
            try:
                outcomes = await asyncio.wait_for(dispatcher.wait_for_ends(endpoint, sessions, ended), 30)
            except asyncio.TimeoutError:
                raise AssertionError(f"not every session ended within 30s\n{explain()}") from None
        finally:
            attacher.cancel()
            with suppress(asyncio.CancelledError):
                await attacher
    assert outcomes == {name: "ended" for name in names}
    assert sorted(jobs.listed("started")) == names, "a job ran twice or not at all"
    assert jobs.listed("requeued") == []
    assert 1 <= len(attached) <= 3


@pytest.mark.slow
async def test_dispatcher_learns_of_a_lost_worker_from_the_sessions_health() -> None:
    """A worker killed with SIGKILL sends no callback; the dispatcher example hears of it from the session's health."""
    dispatcher = load_dispatcher()
    config = LocalConfig(
        port=0,
        fleet=FleetSettings(
            book=BookSettings(
                params=EndpointParams(
                    target_util=1.0, min_load=0, max_workers=1, max_queue_time=1, target_queue_time=0.5
                )
            ),
            provisioning_delay=0.0,
        ),
    )
    ended: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    async with AsyncExitStack() as stack:
        standin = await stack.enter_async_context(serve(config))
        callback_url = await stack.enter_async_context(serving(dispatcher.callback_app(ended, "/session-ended")))
        client = sdk.make_client(config.api_key, "local", standin.url)
        stack.push_async_callback(client.close)
        endpoint = await client.get_endpoint(config.endpoint_name)
        sessions = await asyncio.wait_for(dispatcher.dispatch(endpoint, ["job-a"], f"{callback_url}/session-ended"), 60)
        (worker,) = [inst for inst in standin.fleet.live() if inst.url == sessions["job-a"].url]
        os.killpg(worker.pid, signal.SIGKILL)
        started = time.monotonic()
        outcomes = await asyncio.wait_for(dispatcher.wait_for_ends(endpoint, sessions, ended, health_every=0.5), 20)
    assert outcomes == {"job-a": "worker lost"}
    assert ended.empty(), "a killed worker sent a callback"
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("name", ["dispatcher.py", "consumer.sh", "consumer.py"])
def test_deploying_guide_links_to_each_tested_example(name: str) -> None:
    """docs/deploying.md links to each example these tests run, so the guide shows the tested file, not a copy."""
    guide = (EXAMPLES.parent / "docs" / "deploying.md").read_text()
    assert f"](../examples/{name})" in guide, f"docs/deploying.md does not link to examples/{name}"
