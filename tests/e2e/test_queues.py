"""Every step of the lease mapping, against a real nats-server and a real valkey-server.

Each test runs on both servers at once (``on_each_server``): most of them wait
out an AckWait or a claim timeout, so both take about as long as one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from lib.standin.process import free_port
from tests.e2e.conftest import QUEUE_KINDS, OpenQueue
from tests.helpers import side_by_side
from workers.null.protocol import CLAIMED, DONE, FINISHED, JobEvent
from workers.null.queues import Depth, NotOwned, QueueUnavailable, open_queue

# Short, as the tests that wait for a claim to lapse (or to see that nothing
# comes back) wait a few of these; the renewal test keeps a longer one, so a
# renewal every third of it has room on a loaded machine.
ACK_WAIT = 0.5
RENEWED_ACK_WAIT = 1.0


async def on_each_server(opens: dict[str, OpenQueue], check: Callable[[OpenQueue], Awaitable[None]]) -> None:
    """Runs ``check`` with each server's queue opener at once; a failure names its server."""
    await side_by_side({f"on {kind}": check(open_) for kind, open_ in opens.items()})
    if set(opens) != set(QUEUE_KINDS):  # only valkey-server can be missing: see open_test_queues
        pytest.skip(f"ran on {', '.join(opens)} only: no valkey-server for this interpreter")


async def wait_depth(queue, expected: Depth, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (depth := await queue.depth()) != expected:
        assert time.monotonic() < deadline, f"depth stayed {depth}, expected {expected}"
        await asyncio.sleep(0.02)


async def test_claim_takes_exactly_one_job_and_prefetches_nothing(open_test_queues: dict[str, OpenQueue]):
    """A claim takes one job and leaves the second pending for the next consumer."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue()
        await queue.publish("a", b"body-a")
        await queue.publish("b", b"body-b")
        first = await queue.claim("c1", timeout=2)
        assert first is not None and (first.job.id, first.job.body, first.job.attempt) == ("a", b"body-a", 1)
        assert await queue.depth() == Depth(pending=1, in_flight=1)
        second = await queue.claim("c2", timeout=2)
        assert second is not None and second.job.id == "b"
        assert await queue.claim("c3", timeout=0.2) is None

    await on_each_server(open_test_queues, check)


async def test_keep_alive_prevents_redelivery_past_ack_wait(open_test_queues: dict[str, OpenQueue]):
    """A claim renewed every ack_wait/3 is not handed to another consumer, even long past ack_wait."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue(ack_wait=RENEWED_ACK_WAIT)
        await queue.publish("a", b"")
        claim = await queue.claim("c1", timeout=2)
        assert claim is not None
        rival = asyncio.ensure_future(queue.claim("c2", timeout=2.5 * RENEWED_ACK_WAIT))
        while not rival.done():
            await claim.keep_alive()
            await asyncio.wait([rival], timeout=RENEWED_ACK_WAIT / 3)
        assert rival.result() is None
        await claim.ack()
        assert await queue.depth() == Depth(0, 0)

    await on_each_server(open_test_queues, check)


async def test_lapsed_claim_is_redelivered_and_the_stale_one_acks_nothing(open_test_queues: dict[str, OpenQueue]):
    """Without renewal the job goes to another consumer with attempt 2; the stale claim's ack raises NotOwned."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue(ack_wait=ACK_WAIT)
        await queue.publish("a", b"x")
        stale = await queue.claim("c1", timeout=2)
        assert stale is not None and stale.owned
        started = time.monotonic()
        fresh = await queue.claim("c2", timeout=3 * ACK_WAIT)
        assert fresh is not None and (fresh.job.id, fresh.job.attempt) == ("a", 2)
        assert time.monotonic() - started >= ACK_WAIT * 0.8
        assert not stale.owned
        with pytest.raises(NotOwned):
            await stale.ack()
        with pytest.raises(NotOwned):
            await stale.keep_alive()
        assert await queue.depth() == Depth(pending=0, in_flight=1)
        await fresh.ack()
        assert await queue.depth() == Depth(0, 0)

    await on_each_server(open_test_queues, check)


async def test_ack_removes_the_job(open_test_queues: dict[str, OpenQueue]):
    """An acked job is gone: depth 0 and never delivered again, even after ack_wait."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue(ack_wait=ACK_WAIT)
        await queue.publish("a", b"")
        claim = await queue.claim("c1", timeout=2)
        assert claim is not None
        await claim.ack()
        assert not claim.owned
        assert await queue.depth() == Depth(0, 0)
        assert await queue.claim("c2", timeout=1.5 * ACK_WAIT) is None
        with pytest.raises(NotOwned):
            await claim.ack()

    await on_each_server(open_test_queues, check)


async def test_retry_comes_back_after_the_delay_and_not_before(open_test_queues: dict[str, OpenQueue]):
    """A job handed back with retry(delay) is not delivered before the delay and is after it, as attempt 2."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue(ack_wait=5.0)
        await queue.publish("a", b"x")
        claim = await queue.claim("c1", timeout=2)
        assert claim is not None
        delay = 1.5
        await claim.retry(delay)
        handed_back = time.monotonic()
        assert await queue.claim("c2", timeout=delay * 0.5) is None
        again = await queue.claim("c2", timeout=delay * 3)
        assert again is not None and (again.job.id, again.job.attempt, again.job.body) == ("a", 2, b"x")
        assert time.monotonic() - handed_back >= delay * 0.9
        await again.ack()

    await on_each_server(open_test_queues, check)


async def test_give_up_dead_letters_and_never_delivers_again(open_test_queues: dict[str, OpenQueue]):
    """A job given up lands in the dead-letter stream, counts nowhere, and is not delivered again."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue(ack_wait=ACK_WAIT)
        await queue.publish("a", b"poison")
        claim = await queue.claim("c1", timeout=2)
        assert claim is not None
        await claim.give_up("exit 3")
        assert await queue.claim("c2", timeout=1.5 * ACK_WAIT) is None
        assert await queue.depth() == Depth(0, 0)
        dead = await queue.dead_letters()
        assert [(job.id, job.body, job.attempt) for job in dead] == [("a", b"poison", 1)]

    await on_each_server(open_test_queues, check)


async def test_crash_on_the_final_attempt_is_dead_lettered_not_stranded(open_test_queues: dict[str, OpenQueue]):
    """When the last allowed attempt lapses, the next claim dead-letters the job instead of leaving it in limbo."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue(ack_wait=ACK_WAIT, max_deliver=2)
        await queue.publish("a", b"")
        for attempt in (1, 2):
            claim = await queue.claim("c", timeout=3 * ACK_WAIT)
            assert claim is not None and claim.job.attempt == attempt  # then it "crashes": no renewal, no ack
        assert await queue.claim("c", timeout=2 * ACK_WAIT) is None
        assert await queue.depth() == Depth(0, 0)
        assert [job.id for job in await queue.dead_letters()] == ["a"]

    await on_each_server(open_test_queues, check)


async def test_publish_deduplicates_by_job_id(open_test_queues: dict[str, OpenQueue]):
    """Publishing the same job id twice enqueues it once."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue()
        assert await queue.publish("a", b"1") is True
        assert await queue.publish("a", b"2") is False
        assert await queue.publish("b", b"3") is True
        assert await queue.depth() == Depth(pending=2, in_flight=0)

    await on_each_server(open_test_queues, check)


async def test_depth_counts_pending_and_in_flight(open_test_queues: dict[str, OpenQueue]):
    """Depth counts undelivered jobs as pending and claimed ones as in flight."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue()
        assert await queue.depth() == Depth(0, 0)
        for job_id in "abc":
            await queue.publish(job_id, b"")
        assert await queue.depth() == Depth(3, 0)
        claim = await queue.claim("c1", timeout=2)
        assert claim is not None
        assert await queue.depth() == Depth(2, 1)
        await claim.ack()
        assert await queue.depth() == Depth(2, 0)

    await on_each_server(open_test_queues, check)


async def test_events_round_trip(open_test_queues: dict[str, OpenQueue]):
    """An event published by one connection arrives intact at another's subscription."""

    async def check(open_test_queue: OpenQueue) -> None:
        publisher = await open_test_queue()
        listener = await open_test_queue(setup=False)
        feed = listener.events()
        await feed.start()
        try:
            sent = [
                JobEvent(CLAIMED, "a", 1, "s1"),
                JobEvent(FINISHED, "a", 1, "s1", outcome=DONE, detail="exit 0"),
            ]
            for event in sent:
                await publisher.publish_event(event)
            got = [await asyncio.wait_for(feed.__anext__(), 5) for _ in sent]
            assert got == sent
        finally:
            await feed.aclose()

    await on_each_server(open_test_queues, check)


async def test_new_jobs_pushes_each_published_id(open_test_queues: dict[str, OpenQueue]):
    """Each published job's id is pushed to a new_jobs subscriber, and the job stays in the queue."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue()
        watcher = await open_test_queue(setup=False)
        async with watcher.new_jobs() as feed:
            await queue.publish("a", b"")
            await queue.publish("b", b"")
            assert [await asyncio.wait_for(feed.__anext__(), 5) for _ in range(2)] == ["a", "b"]
        assert await queue.depth() == Depth(2, 0)

    await on_each_server(open_test_queues, check)


@pytest.mark.parametrize("scheme", QUEUE_KINDS)
async def test_unreachable_server_is_one_line_naming_the_address(scheme: str):
    """Connecting to a port nobody listens on raises QueueUnavailable in one line naming that address."""
    port = free_port()
    queue = open_queue(f"{scheme}://127.0.0.1:{port}", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(QueueUnavailable) as raised:
        await queue.connect()
    assert time.monotonic() - started < 3
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message
    await queue.close()


async def test_missing_stream_names_setup_as_the_fix(open_test_queues: dict[str, OpenQueue]):
    """Without setup, check, claim and depth raise QueueUnavailable naming setup as the fix."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue(setup=False)
        for attempt in (
            queue.check,
            lambda: queue.claim("c1", timeout=0.5),
            queue.depth,
            lambda: queue.publish("a", b""),
        ):
            with pytest.raises(QueueUnavailable) as raised:
                await attempt()
            assert "setup" in str(raised.value) and "\n" not in str(raised.value)

    await on_each_server(open_test_queues, check)


async def test_setup_is_idempotent_and_keeps_the_jobs(open_test_queues: dict[str, OpenQueue]):
    """Running setup again (even with another ack_wait) keeps the queued jobs and passes check."""

    async def check(open_test_queue: OpenQueue) -> None:
        queue = await open_test_queue()
        await queue.publish("a", b"")
        await queue.setup()
        again = await open_test_queue(ack_wait=7.0)
        await again.check()
        assert await again.depth() == Depth(1, 0)

    await on_each_server(open_test_queues, check)
