"""The dispatcher and the whole loop: a real nats-server, real workers and consumers under the stand-in, the SDK."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest

from lib.demo.run import consumer_command
from lib.standin.autoscaler import serve
from lib.standin.process import ChildProcess
from lib.standin.queueservers import nats_server
from tests.standin import explain, fast_config, sdk_client, wait_fleet
from workers.null.dispatch import sdk
from workers.null.dispatch.dispatcher import Dispatcher, DispatchOptions
from workers.null.dispatch.ledger import Ledger
from workers.null.protocol import FINISHED, STARTED
from workers.null.queues import Depth, open_queue

ACK_WAIT = 3.0


@asynccontextmanager
async def queue_loop(events: bool = True, **standin: Any) -> AsyncIterator[tuple[str, Any, Any]]:
    """A nats-server with the stream set up, and a stand-in running a consumer beside every worker."""
    async with nats_server() as nats_url:
        url = f"{nats_url}/jobs"
        queue = open_queue(url, ack_wait=ACK_WAIT, max_deliver=5)
        await queue.connect()
        try:
            await queue.setup()
            config = fast_config(
                consumer=consumer_command(url, ack_wait=ACK_WAIT, events=events),
                claim_deadline=10.0,
                route_hold=4.0,
                **standin,
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
async def test_without_events_the_jobs_of_workers_killed_at_the_queues_tail_still_run():
    """Consumers that publish no events; both workers, holding the queue's last two jobs, are SIGKILLed mid-job.
    The dispatcher finds the two jobs from the queue's counts and the endpoint's workers, and they run to done."""
    async with queue_loop(events=False, provisioning_delay=0.2, max_workers=4, inactivity_timeout=1.0) as (
        _url,
        queue,
        local,
    ):
        client = sdk_client(local)
        try:
            stop = asyncio.Event()
            endpoint = await sdk.find_endpoint(client, local.config.endpoint_name, stop)
            ledger = Ledger(ack_wait=ACK_WAIT)
            options = DispatchOptions(max_sessions=4, reconcile_every=0.5, health_every=1.0)
            dispatcher = Dispatcher(queue, endpoint, options, ledger, routing_stop=stop)
            await dispatcher.start()
            try:
                await publish(queue, 2, 4.0)
                deadline = time.monotonic() + 90
                while (await queue.depth()).in_flight < 2 or len(local.fleet.instances) < 2:
                    assert time.monotonic() < deadline, f"jobs not claimed\n{explain(local.fleet)}"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # both jobs are running
                for iid in list(local.fleet.instances):
                    assert local.fleet.kill(iid), explain(local.fleet)
                while (depth := await queue.depth()) != Depth(0, 0):
                    assert time.monotonic() < deadline, f"{depth}: jobs stranded\n{explain(local.fleet)}"
                    await asyncio.sleep(0.2)
                assert await queue.dead_letters() == []
                assert len(local.fleet.created) >= 4, explain(local.fleet)
                # No consumer published an event: the ledger never heard of an attempt.
                assert all(not job.attempts for job in ledger.jobs.values()), ledger.jobs
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
