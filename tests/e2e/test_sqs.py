"""Every step of the lease mapping on SQS, against a real moto_server process.

One moto_server serves the whole module (it takes a few seconds to start on a
loaded machine); each test works on queues of its own. moto re-checks for
messages whose visibility ran out once a second during a long poll, so a
redelivery arrives up to a second after it is due, and a long poll may end up
to a second past its wait: the deadlines below allow for it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from aiobotocore.session import get_session

from lib.standin.process import free_port
from lib.standin.queueservers import moto_server
from workers.null.protocol import CLAIMED, DONE, FINISHED, JobEvent
from workers.null.queues import Depth, NotOwned, QueueError, QueueUnavailable, open_queue
from workers.null.queues.sqs import ATTEMPT, JOB_ID, REASON, SqsQueue

pytestmark = pytest.mark.asyncio(loop_scope="module")

REGION = "us-east-1"
# A secret the refused-credentials test looks for in messages; never a real one.
DUMMY_SECRET = "dummy-secret-not-real"
_names = itertools.count(1)

OpenSqs = Callable[..., Awaitable[SqsQueue]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def endpoint() -> AsyncIterator[str]:
    async with moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def dummy_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The AWS chain sees dummy credentials only: no profile, no config file, no instance metadata lookups."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def sqs_url(endpoint: str, queue: str, region: str | None = REGION) -> str:
    return f"sqs://{queue}?endpoint={endpoint}" + (f"&region={region}" if region else "")


@pytest_asyncio.fixture(loop_scope="module")
async def open_sqs(endpoint: str) -> AsyncIterator[OpenSqs]:
    """Opens connected queues on this test's own queue names (set up unless ``setup=False``); closes them after."""
    opened: list[SqsQueue] = []
    default = f"jobs{next(_names)}"

    async def open_(
        *, ack_wait: float = 1.0, max_deliver: int = 5, setup: bool = True, queue: str = default
    ) -> SqsQueue:
        sqs = open_queue(sqs_url(endpoint, queue), ack_wait=ack_wait, max_deliver=max_deliver)
        assert isinstance(sqs, SqsQueue)
        await sqs.connect()
        opened.append(sqs)
        if setup:
            await sqs.setup()
        return sqs

    try:
        yield open_
    finally:
        for sqs in opened:
            await sqs.close()


@pytest_asyncio.fixture(loop_scope="module")
async def raw(endpoint: str) -> AsyncIterator[Any]:
    """A bare aiobotocore client on moto, to look at what the adapter left on the server."""
    async with get_session().create_client("sqs", region_name=REGION, endpoint_url=endpoint) as client:
        yield client


async def wait_depth(queue: SqsQueue, expected: Depth, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (depth := await queue.depth()) != expected:
        assert time.monotonic() < deadline, f"depth stayed {depth}, expected {expected}"
        await asyncio.sleep(0.05)


async def peek(raw: Any, name: str) -> list[dict[str, Any]]:
    """Every message of queue ``name``, received with visibility 0 so they stay where they are."""
    url = (await raw.get_queue_url(QueueName=name))["QueueUrl"]
    answer = await raw.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, MessageAttributeNames=["All"]
    )
    return answer.get("Messages") or []


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


# -- the lease --------------------------------------------------------------------------


async def test_claim_takes_exactly_one_job_with_its_id_body_and_attempt(open_sqs: OpenSqs):
    """A claim takes one job (id, body, attempt 1, enqueue time) and leaves the other pending for the next consumer."""
    queue = await open_sqs()
    await queue.publish("a", b"body-a")
    await queue.publish("b", b"body-b")
    first = await queue.claim("c1", timeout=2)
    assert first is not None and first.owned
    assert first.job.attempt == 1 and first.job.enqueued_at and abs(first.job.enqueued_at - time.time()) < 60
    assert await queue.depth() == Depth(pending=1, in_flight=1)
    second = await queue.claim("c2", timeout=2)
    assert second is not None
    # A standard queue keeps no strict order: the two claims took one job each.
    assert {(first.job.id, first.job.body), (second.job.id, second.job.body)} == {("a", b"body-a"), ("b", b"body-b")}
    started = time.monotonic()
    assert await queue.claim("c3", timeout=0.5) is None
    assert time.monotonic() - started < 1.5  # under a second left: one short poll, never past the timeout


async def test_bodies_of_any_bytes_come_back_as_sent(open_sqs: OpenSqs, raw: Any):
    """Text, empty and non-UTF-8 bodies come back byte for byte; a text body is stored as that text."""
    queue = await open_sqs(ack_wait=5)
    bodies = {"text": "héllo {json}".encode(), "empty": b"", "binary": b"\xff\x00\x01", "nul": b"a\x00b"}
    for job_id, body in bodies.items():
        await queue.publish(job_id, body)
    stored = {_job_id(m): m["Body"] for m in await peek(raw, queue.address.queue)}
    assert stored["text"] == "héllo {json}"
    got = {}
    for _ in bodies:
        claim = await queue.claim("c", timeout=2)
        assert claim is not None
        got[claim.job.id] = claim.job.body
        await claim.ack()
    assert got == bodies


def _job_id(message: dict[str, Any]) -> str:
    return message["MessageAttributes"][JOB_ID]["StringValue"]


async def test_a_message_from_another_producer_is_a_job_under_its_message_id(open_sqs: OpenSqs, raw: Any):
    """A message sent without the job id attribute is claimed with SQS's message id as its job id."""
    queue = await open_sqs()
    url = (await raw.get_queue_url(QueueName=queue.address.queue))["QueueUrl"]
    sent = await raw.send_message(QueueUrl=url, MessageBody='{"prompt": "x"}')
    claim = await queue.claim("c", timeout=2)
    assert claim is not None and (claim.job.id, claim.job.body) == (sent["MessageId"], b'{"prompt": "x"}')


async def test_keep_alive_holds_the_job_past_the_visibility_timeout(open_sqs: OpenSqs):
    """A claim renewed every ack_wait/3 is not handed to another consumer, even long past the visibility timeout."""
    queue = await open_sqs(ack_wait=1.0)
    await queue.publish("a", b"")
    claim = await queue.claim("c1", timeout=2)
    assert claim is not None
    rival = asyncio.ensure_future(queue.claim("c2", timeout=3))
    while not rival.done():
        await claim.keep_alive()
        await asyncio.wait([rival], timeout=queue.ack_wait / 3)
    assert rival.result() is None
    assert claim.owned
    await claim.ack()
    assert await queue.depth() == Depth(0, 0)


async def test_lapsed_claim_is_redelivered_and_the_stale_one_acks_nothing(open_sqs: OpenSqs):
    """Without renewal the job goes to another consumer as attempt 2; the stale claim's verbs raise NotOwned."""
    queue = await open_sqs(ack_wait=1.0)
    await queue.publish("a", b"x")
    stale = await queue.claim("c1", timeout=2)
    assert stale is not None and stale.owned
    started = time.monotonic()
    fresh = await queue.claim("c2", timeout=4)
    assert fresh is not None and (fresh.job.id, fresh.job.attempt) == ("a", 2)
    assert time.monotonic() - started >= 0.8
    assert not stale.owned
    for verb in (stale.ack, stale.keep_alive, lambda: stale.retry(0), lambda: stale.give_up("late")):
        with pytest.raises(NotOwned):
            await verb()
    assert await queue.depth() == Depth(pending=0, in_flight=1)
    await fresh.ack()
    assert await queue.depth() == Depth(0, 0)
    assert await queue.dead_letters() == []


async def test_the_server_itself_deletes_with_a_stale_receipt_handle(open_sqs: OpenSqs, raw: Any):
    """moto deletes a message with the handle of a lapsed delivery while a newer one holds it: the guard is ours."""
    queue = await open_sqs(ack_wait=1.0)
    await queue.publish("a", b"")
    stale = await queue.claim("c1", timeout=2)
    fresh = await queue.claim("c2", timeout=4)
    assert stale is not None and fresh is not None and fresh.job.attempt == 2
    url = (await raw.get_queue_url(QueueName=queue.address.queue))["QueueUrl"]
    await raw.delete_message(QueueUrl=url, ReceiptHandle=stale._handle)  # what stale.ack() refuses to send
    assert await queue.depth() == Depth(0, 0)
    with pytest.raises(NotOwned):
        await stale.ack()


async def test_ack_removes_the_job(open_sqs: OpenSqs):
    """An acked job is gone: depth 0 and never delivered again, even after the visibility timeout."""
    queue = await open_sqs(ack_wait=1.0)
    await queue.publish("a", b"")
    claim = await queue.claim("c1", timeout=2)
    assert claim is not None
    await claim.ack()
    assert not claim.owned
    assert await queue.depth() == Depth(0, 0)
    assert await queue.claim("c2", timeout=2) is None
    with pytest.raises(NotOwned):
        await claim.ack()


async def test_retry_comes_back_after_the_delay_and_not_before(open_sqs: OpenSqs):
    """A job handed back with retry(delay) is in flight during the delay, then delivered again as attempt 2."""
    queue = await open_sqs(ack_wait=5.0)
    await queue.publish("a", b"x")
    claim = await queue.claim("c1", timeout=2)
    assert claim is not None
    delay = 2
    await claim.retry(delay)
    handed_back = time.monotonic()
    assert await queue.depth() == Depth(0, 1)
    assert await queue.claim("c2", timeout=1) is None
    again = await queue.claim("c2", timeout=delay + 3)
    assert again is not None and (again.job.id, again.job.attempt, again.job.body) == ("a", 2, b"x")
    assert time.monotonic() - handed_back >= delay * 0.9
    await again.retry(0)
    third = await queue.claim("c3", timeout=2)
    assert third is not None and third.job.attempt == 3
    await third.ack()


async def test_give_up_dead_letters_with_id_attempt_and_reason(open_sqs: OpenSqs, raw: Any):
    """A job given up is in the dead-letter queue with its id, attempt and reason, counts nowhere, never comes back."""
    queue = await open_sqs(ack_wait=1.0)
    await queue.publish("a", b"poison")
    claim = await queue.claim("c1", timeout=2)
    assert claim is not None
    await claim.give_up("exit 3")
    assert await queue.claim("c2", timeout=2) is None
    assert await queue.depth() == Depth(0, 0)
    [message] = await peek(raw, queue.address.dead)
    attributes = {k: v["StringValue"] for k, v in message["MessageAttributes"].items()}
    assert attributes == {JOB_ID: "a", ATTEMPT: "1", REASON: "exit 3"}
    # Looking does not take them: the second look sees the same.
    for _ in range(2):
        assert [(j.id, j.body, j.attempt) for j in await queue.dead_letters()] == [("a", b"poison", 1)]


async def test_attempts_count_across_redeliveries_and_the_last_lapse_is_dead_lettered(open_sqs: OpenSqs):
    """Attempts go 1, 2 across a lapse and a retry; the delivery after max_deliver is dead-lettered by the claim."""
    queue = await open_sqs(ack_wait=1.0, max_deliver=2)
    await queue.publish("a", b"")
    first = await queue.claim("c", timeout=2)
    assert first is not None and first.job.attempt == 1  # then it "crashes": no renewal, no ack
    second = await queue.claim("c", timeout=4)
    assert second is not None and second.job.attempt == 2
    await second.retry(0)  # the last allowed attempt handed back: the next delivery is past max_deliver
    assert await queue.claim("c", timeout=2) is None
    assert await queue.depth() == Depth(0, 0)
    assert [(j.id, j.attempt) for j in await queue.dead_letters()] == [("a", 3)]


async def test_redrive_policy_moves_what_no_claim_dead_lettered(open_sqs: OpenSqs, raw: Any):
    """The server's redrive policy moves a message received max_deliver + 2 times without a claim dead-lettering it."""
    queue = await open_sqs(ack_wait=1.0, max_deliver=1)
    await queue.publish("a", b"stuck")
    url = (await raw.get_queue_url(QueueName=queue.address.queue))["QueueUrl"]
    for _ in range(queue.max_receive_count):  # receivers that never get as far as dead-lettering
        answer = await raw.receive_message(QueueUrl=url, VisibilityTimeout=0)
        assert len(answer.get("Messages") or []) == 1
    assert await queue.claim("c", timeout=1) is None  # this receive finds it past maxReceiveCount: moved
    assert [(j.id, j.body, j.attempt) for j in await queue.dead_letters()] == [("a", b"stuck", 0)]


async def test_depth_counts_pending_and_in_flight(open_sqs: OpenSqs):
    """Depth counts unclaimed jobs as pending and claimed ones as in flight."""
    queue = await open_sqs(ack_wait=5.0)
    assert await queue.depth() == Depth(0, 0)
    for job_id in "abc":
        await queue.publish(job_id, b"")
    assert await queue.depth() == Depth(3, 0)
    claim = await queue.claim("c1", timeout=2)
    assert claim is not None
    assert await queue.depth() == Depth(2, 1)
    await claim.ack()
    assert await queue.depth() == Depth(2, 0)


async def test_a_standard_queue_keeps_a_duplicate_publish(open_sqs: OpenSqs):
    """SQS standard queues do not dedupe: both publishes of one id return True and both are queued."""
    queue = await open_sqs()
    assert await queue.publish("a", b"1") is True
    assert await queue.publish("a", b"2") is True
    assert await queue.depth() == Depth(2, 0)


async def test_a_fifo_queue_drops_a_duplicate_and_dead_letters_to_a_fifo_queue(open_sqs: OpenSqs):
    """On a .fifo queue a repeated job id is dropped within SQS's 5 minutes; its dead letters go to a FIFO queue."""
    queue = await open_sqs(queue=f"jobs{next(_names)}.fifo")
    assert queue.address.dead.endswith("-dead.fifo")
    assert await queue.publish("a", b"1") is True
    assert await queue.publish("a", b"2") is True  # SQS accepts it and says nothing: dropped all the same
    await queue.publish("job with spaces", b"3")  # not a valid deduplication id: sent under its hash
    assert await queue.depth() == Depth(2, 0)
    claim = await queue.claim("c", timeout=2)
    assert claim is not None and (claim.job.id, claim.job.body) == ("a", b"1")
    await claim.give_up("no")
    assert [j.id for j in await queue.dead_letters()] == ["a"]


# -- events and new jobs ------------------------------------------------------------------


async def test_events_round_trip_and_stale_ones_are_dropped(open_sqs: OpenSqs):
    """Events sent after the feed started arrive intact at another connection; one sent before is dropped."""
    publisher = await open_sqs()
    listener = await open_sqs(setup=False)
    await publisher.publish_event(JobEvent(CLAIMED, "old", 1, "s0"))
    feed = listener.events()
    await feed.start()
    try:
        sent = [JobEvent(CLAIMED, "a", 1, "s1"), JobEvent(FINISHED, "a", 1, "s1", outcome=DONE, detail="exit 0")]
        for event in sent:
            await publisher.publish_event(event)
        # The stale one, had it not been dropped, would be among the first received.
        got = [await asyncio.wait_for(feed.__anext__(), 5) for _ in sent]
        assert sorted(got, key=lambda e: e.at) == sent
    finally:
        await feed.aclose()


async def test_new_jobs_yields_nothing_and_takes_nothing_from_the_queue(open_sqs: OpenSqs):
    """SQS has no push: new_jobs() starts and yields nothing, and the published job stays pending."""
    queue = await open_sqs()
    async with queue.new_jobs() as feed:
        await queue.publish("a", b"")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(feed.__anext__(), 0.5)
    assert await queue.depth() == Depth(1, 0)


# -- setup and errors -----------------------------------------------------------------------


async def test_setup_is_idempotent_keeps_the_jobs_and_updates_the_visibility(open_sqs: OpenSqs, raw: Any):
    """Running setup again with another ack_wait keeps the queued jobs, passes check and sets the new visibility."""
    queue = await open_sqs()
    await queue.publish("a", b"")
    await queue.setup()
    again = await open_sqs(ack_wait=7.0, max_deliver=3)
    await again.check()
    assert await again.depth() == Depth(1, 0)
    url = (await raw.get_queue_url(QueueName=queue.address.queue))["QueueUrl"]
    attributes = (await raw.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))["Attributes"]
    assert attributes["VisibilityTimeout"] == "7"
    assert (
        '"maxReceiveCount": 5' in attributes["RedrivePolicy"] or '"maxReceiveCount": "5"' in attributes["RedrivePolicy"]
    )


async def test_missing_queues_name_setup_as_the_fix(open_sqs: OpenSqs, raw: Any):
    """Without setup, check, claim, depth and publish raise one line naming the missing queue and setup."""
    queue = await open_sqs(setup=False)
    for attempt in (queue.check, lambda: queue.claim("c1", timeout=0.5), queue.depth, lambda: queue.publish("a", b"")):
        with pytest.raises(QueueUnavailable) as raised:
            await attempt()
        message = one_line(raised.value)
        assert "setup" in message and repr(queue.address.queue) in message
    # Only the work queue there: check names the dead-letter queue.
    await raw.create_queue(QueueName=queue.address.queue)
    with pytest.raises(QueueUnavailable) as raised:
        await queue.check()
    assert repr(queue.address.dead) in one_line(raised.value)


async def test_unreachable_endpoint_is_one_line_naming_it():
    """Connecting to a port nobody listens on raises QueueUnavailable in one line naming that endpoint, promptly."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    queue = open_queue(sqs_url(endpoint, "jobs"), connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(QueueUnavailable) as raised:
        await queue.connect()
    assert time.monotonic() - started < 3
    message = one_line(raised.value)
    assert endpoint in message and "endpoint=" in message
    await queue.close()


async def test_refused_credentials_are_one_line_and_show_no_secret(monkeypatch: pytest.MonkeyPatch):
    """A server that refuses the access key gives one line naming credentials and the fix, without the key or secret."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIADUMMYKEYNOTREAL")
    async with moto_server(authenticate=True) as endpoint:
        queue = open_queue(sqs_url(endpoint, "jobs"), connect_timeout=5.0)
        with pytest.raises(QueueUnavailable) as raised:
            await queue.connect()
        await queue.close()
    message = one_line(raised.value)
    assert "refused the credentials (InvalidClientTokenId)" in message and "AWS_ACCESS_KEY_ID" in message
    assert DUMMY_SECRET not in message and "AKIADUMMYKEYNOTREAL" not in message


async def test_missing_credentials_name_the_aws_chain(endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """With no credentials anywhere in the chain, connect says so in one line and names where they come from."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    queue = open_queue(sqs_url(endpoint, "jobs"), connect_timeout=5.0)
    with pytest.raises(QueueUnavailable) as raised:
        await queue.connect()
    await queue.close()
    message = one_line(raised.value)
    assert "no AWS credentials found" in message and "AWS_PROFILE" in message


async def test_no_region_names_the_region_parameter(endpoint: str):
    """An address without region=, with none in the environment either, is one line naming region= as the fix."""
    queue = open_queue(sqs_url(endpoint, "jobs", region=None))
    with pytest.raises(QueueError) as raised:
        await queue.connect()
    await queue.close()
    assert "?region=" in one_line(raised.value)
