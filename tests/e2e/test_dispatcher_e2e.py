"""The dispatcher and the whole loop: a real nats-server, real workers and consumers under the stand-in, the SDK."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest

from lib.standin.autoscaler import serve
from lib.standin.process import ChildProcess
from lib.standin.queueservers import nats_server
from tests.standin import explain, fast_config, process_gone, sdk_client, wait_fleet
from workers.null import sdk
from workers.null.demo import consumer_command
from workers.null.dispatcher import Dispatcher, DispatchOptions
from workers.null.ledger import Ledger
from workers.null.queues import open_queue
from workers.null.queues.base import FINISHED, STARTED

SUMMARY = re.compile(r"^(\d+) of (\d+) jobs done, (\d+) failed, (\d+) lost, (\d+) run twice$")
ACK_WAIT = 3.0


@asynccontextmanager
async def queue_loop(**standin: Any) -> AsyncIterator[tuple[str, Any, Any]]:
    """A nats-server with the stream set up, and a stand-in running a consumer beside every worker."""
    async with nats_server() as nats_url:
        url = f"{nats_url}/jobs"
        queue = open_queue(url, ack_wait=ACK_WAIT, max_deliver=5)
        await queue.connect()
        try:
            await queue.setup()
            config = fast_config(
                consumer=consumer_command(url, ack_wait=ACK_WAIT), claim_deadline=10.0, route_hold=4.0, **standin
            )
            async with serve(config) as local:
                yield url, queue, local
        finally:
            await queue.close()


async def publish(queue: Any, n: int, seconds: float, prefix: str = "job") -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    for job_id in ids:
        await queue.publish(job_id, json.dumps({"seconds": seconds}).encode())
    return ids


def dispatcher(*args: str) -> ChildProcess:
    """``python -m workers.null.dispatcher *args``, every output line kept."""
    return ChildProcess.python("-m", "workers.null.dispatcher", *args, tail_lines=None)


def summary_of(run: ChildProcess) -> tuple[int, ...]:
    found = run.matches(SUMMARY.pattern)
    assert found, f"no summary line; output:\n{run.tail()}"
    return tuple(int(x) for x in found[-1].groups())


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (by /proc parent links)."""
    import os

    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                found.append(child)
                frontier.append(child)
    return found


@pytest.mark.slow
async def test_ten_jobs_behind_a_3s_cold_start_ask_for_exactly_ten_sessions():
    """Ten jobs while workers take 3 s to start: exactly ten sessions and ten workers, never more, all done."""
    async with queue_loop(provisioning_delay=3.0, max_workers=20) as (_url, queue, local):
        client = sdk_client(local)
        try:
            stop = asyncio.Event()
            endpoint = await sdk.find_endpoint(client, local.config.endpoint_name, stop)
            ledger = Ledger(ack_wait=ACK_WAIT)
            options = DispatchOptions(max_sessions=20, reconcile_every=0.5, health_every=1.0)
            dispatcher = Dispatcher(queue, endpoint, options, ledger, routing_stop=stop)
            await dispatcher.start()
            try:
                ids = await publish(queue, 10, 0.0)
                deadline = time.monotonic() + 120
                while not all(ledger.jobs.get(i) and ledger.jobs[i].state == "done" for i in ids):
                    assert ledger.peak_alive <= 10, f"{ledger.peak_alive} sessions at once\n{explain(local.fleet)}"
                    assert time.monotonic() < deadline, f"jobs not done: {ledger.jobs}\n{explain(local.fleet)}"
                    await asyncio.sleep(0.1)
                assert ledger.asked == 10, [s.end for s in ledger.sessions.values()]
                assert ledger.peak_alive == 10
                assert len(local.fleet.created) == 10, explain(local.fleet)
                assert ledger.twice == 0
                assert await dispatcher.drain()
            finally:
                await dispatcher.aclose()
        finally:
            await client.close()


@pytest.mark.slow
async def test_a_killed_dispatcher_leaks_nothing_and_a_restarted_one_opens_no_session_for_running_jobs():
    """SIGKILL the dispatcher mid-job: its jobs finish, a restarted one asks for nothing more, SIGTERM exits 0."""
    async with queue_loop(provisioning_delay=0.2, max_workers=4, inactivity_timeout=1.0) as (url, queue, local):
        events = queue.events()
        await events.start()
        seen: list[Any] = []

        async def collect() -> None:
            async for event in events:
                seen.append(event)

        collector = asyncio.ensure_future(collect())
        port = local.url.rsplit(":", 1)[1]
        flags = ["--queue", url, "--instance", "local", "--local-port", port, "--plain", "--max-sessions", "3"]
        flags += ["--ack-wait", str(ACK_WAIT), "--health-every", "1", "--reconcile", "1"]
        first = await dispatcher(*flags).start()
        second = dispatcher(*flags)
        try:
            await first.wait_for_line(r"dispatching:", 30)
            ids = await publish(queue, 3, 5.0)
            deadline = time.monotonic() + 90
            while sum(1 for e in seen if e.kind == STARTED) < 3:
                assert time.monotonic() < deadline, f"jobs did not start\n{first.tail()}\n{explain(local.fleet)}"
                await asyncio.sleep(0.1)
            first.send_signal(signal.SIGKILL)
            await first.wait(10)
            await second.start()
            await second.wait_for_line(r"dispatching: 0 job\(s\) waiting", 30)
            while sum(1 for e in seen if e.kind == FINISHED and e.outcome == "done") < 3:
                assert time.monotonic() < deadline, f"jobs did not finish\n{second.tail()}\n{explain(local.fleet)}"
                await asyncio.sleep(0.1)
            assert not second.matches(r"asking for"), second.tail()
            assert len(local.fleet.created) == 3, explain(local.fleet)
            assert sorted(e.job_id for e in seen if e.kind == STARTED) == sorted(ids)
            second.send_signal(signal.SIGTERM)
            assert await second.wait(30) == 0, second.tail()
            await wait_fleet(local.fleet, lambda f: not f.instances, 40, "the fleet back at zero")
        finally:
            collector.cancel()
            with suppress(asyncio.CancelledError):
                await collector
            await events.aclose()
            await first.stop(10.0)
            await second.stop(10.0)


@pytest.mark.slow
async def test_the_demo_with_chaos_runs_every_job_once_to_done_and_prints_the_summary(tmp_path):
    """--chaos 1: a worker SIGKILLed mid-job; its job is redelivered, done again and acked once; exit 0."""
    job_log = tmp_path / "jobs.jsonl"
    argv = ["--instance", "local", "--jobs", "3", "--job-seconds", "2", "--chaos", "1", "--max-sessions", "3"]
    argv += ["--cold-start", "0.2", "--inactivity-timeout", "1", "--plain", "--job-log", str(job_log)]
    run = await dispatcher(*argv).start()
    try:
        code = await run.wait(150)
        done, total, failed, lost, twice = summary_of(run)
        assert (code, done, total, failed, lost) == (0, 3, 3, 0, 0), run.tail()
        assert twice <= 1
        assert run.matches(r"chaos: 1 of 1 workers killed"), run.tail()
        assert run.matches(r"back to 0 after \d"), run.tail()
        rows = [json.loads(line) for line in job_log.read_text().splitlines()]
        by_job: dict[str, list[str]] = {}
        for row in rows:
            by_job.setdefault(row["job_id"], []).append(row["outcome"])
        assert all(outcomes.count("done") == 1 for outcomes in by_job.values()), rows
        assert any("lost" in outcomes or "abandoned" in outcomes for outcomes in by_job.values()), rows
    finally:
        await run.stop(10.0)


@pytest.mark.slow
async def test_a_job_unfinished_by_the_deadline_is_lost_and_the_demo_exits_1():
    """A job still running at --deadline counts as lost: the summary says so and the exit code is 1."""
    argv = ["--instance", "local", "--jobs", "1", "--job-seconds", "60", "--deadline", "2", "--plain"]
    run = await dispatcher(*argv, "--cold-start", "0").start()
    try:
        assert await run.wait(60) == 1, run.tail()
        assert summary_of(run) == (0, 1, 0, 1, 0)
    finally:
        await run.stop(10.0)


@pytest.mark.slow
async def test_ctrl_c_in_the_demo_leaves_no_worker_consumer_or_nats_server_running():
    """Ctrl-C while jobs run stops every worker, consumer, job and the nats-server, and exits 130."""
    argv = ["--instance", "local", "--jobs", "2", "--job-seconds", "60", "--plain", "--cold-start", "0"]
    run = await dispatcher(*argv).start()
    try:
        await run.wait_for_line(r"job \S+ attempt 1 started", 90, count=2)
        assert run.proc is not None
        started = children_of(run.proc.pid)
        assert len(started) >= 5, started  # nats-server, 2 workers, 2 consumers (and their jobs)
        run.send_signal(signal.SIGINT)
        assert await run.wait(40) == 130, run.tail()
        left = [pid for pid in started if not process_gone(pid)]
        assert not left, f"still running: {left}\n{run.tail()}"
    finally:
        await run.stop(10.0)


async def test_setup_creates_the_stream_and_without_it_the_dispatcher_exits_2_naming_setup():
    """A missing stream: one line naming the setup step, exit 2; setup creates it; an unreachable server exits 2."""
    from lib.standin.process import free_port

    async with nats_server() as nats_url:
        url = f"{nats_url}/fresh"
        missing = await dispatcher("--queue", url, "--instance", "local").start()
        assert await missing.wait(30) == 2, missing.tail()
        assert missing.matches(r"setup"), missing.tail()
        made = await dispatcher("--queue", url, "setup").start()
        assert await made.wait(30) == 0, made.tail()
        queue = open_queue(url, ack_wait=ACK_WAIT, max_deliver=5)
        await queue.connect()
        try:
            await queue.check()
        finally:
            await queue.close()
    nowhere = f"nats://127.0.0.1:{free_port()}/jobs"
    gone = await dispatcher("--queue", nowhere, "--connect-timeout", "1", "setup").start()
    assert await gone.wait(30) == 2, gone.tail()
    assert len([line for line in gone.lines if line.strip()]) == 1, gone.tail()
    assert gone.matches(r"cannot reach NATS at nats://127\.0\.0\.1:\d+ within 1s"), gone.tail()
