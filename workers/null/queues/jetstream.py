"""NATS JetStream adapter: a work-queue stream, one durable pull consumer shared by every worker.

How each verb maps onto JetStream:

- ``claim``: one pull request for one message (``batch 1``, expiring with the
  timeout) on a fresh inbox that is dropped afterwards, so nothing is ever
  prefetched: a message the server sends after we stopped waiting reaches no
  one and is redelivered after AckWait. The claim is then confirmed with an
  in-progress ack (``+WPI``) whose send time anchors the lease.
- ``keep_alive``: a confirmed ``+WPI``, which restarts AckWait on the server.
- ``ack``: a confirmed ``+ACK``. ``retry``: a confirmed ``-NAK`` with a delay.
- ``give_up``: the message is published to the dead-letter stream, then
  ``+TERM``-ed, so the work stream never delivers it again.

Ownership: the server accepts acks (and naks and terms) of a delivery that
already lapsed and went to another worker (nats-server #4786), so the claim
decides for itself. It knows the send time of its last confirmed renewal; the
server cannot have restarted AckWait before that, so the message stays ours
until that time plus AckWait. Past it (less a margin for the round trip), every
verb raises NotOwned and sends nothing.

Attempts: the consumer's MaxDeliver is unlimited on the server. ``claim`` counts
the deliveries itself (``num_delivered``) and dead-letters at once a delivery
past ``max_deliver`` (the last attempt crashed or lapsed). A server-side
MaxDeliver would leave such a message in the stream, delivered to no one and
counted nowhere (nats-server #6905); this way it is always either pending, in
flight, acked or dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from workers.null.protocol import JobEvent
from workers.null.queues.address import QueueAddress
from workers.null.queues.base import (
    SETUP_HINT,
    Claim,
    Depth,
    Feed,
    Job,
    NotOwned,
    Queue,
    QueueError,
    QueueUnavailable,
    check_job_id,
    describe,
    not_connected,
    server_failed,
)

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
REASON = "Null-Reason"
ATTEMPT = "Null-Attempt"
# Enough for any fleet; a worker holds at most one job.
MAX_ACK_PENDING = 100_000
# How long the server remembers a job id to drop a duplicate publish.
DUPLICATE_WINDOW = 120.0
# A confirmed verb waits this long for the server's answer.
REPLY_TIMEOUT = 2.0


def lease_margin(ack_wait: float) -> float:
    """How long before AckWait ends a claim stops counting as owned: room for one round trip."""
    return min(1.0, ack_wait * 0.1)


class JetStreamClaim(Claim):
    def __init__(self, queue: JetStreamQueue, msg: Msg, job: Job, renewed: float) -> None:
        self.job = job
        self._queue = queue
        self._msg = msg
        self._renewed = renewed  # monotonic send time of the last confirmed +WPI
        self._settled = False

    @property
    def owned(self) -> bool:
        if self._settled:
            return False
        return time.monotonic() < self._renewed + self._queue.ack_wait - lease_margin(self._queue.ack_wait)

    def _check(self, verb: str) -> None:
        if self._settled:
            raise NotOwned(f"job {self.job.id} attempt {self.job.attempt} is already settled: cannot {verb} it again")
        if not self.owned:
            lapsed = time.monotonic() - self._renewed
            raise NotOwned(
                f"job {self.job.id} attempt {self.job.attempt} was not renewed for {lapsed:.1f}s "
                f"(ack_wait {self._queue.ack_wait:g}s): it may be running elsewhere, not {verb}ing it"
            )

    async def _reply(self, payload: bytes, verb: str) -> None:
        with self._queue._translate(f"{verb} job {self.job.id}"):
            await self._queue._nc.request(self._msg.reply, payload, timeout=REPLY_TIMEOUT)

    async def keep_alive(self) -> None:
        self._check("renew")
        sent = time.monotonic()
        await self._reply(b"+WPI", "renew")
        self._renewed = sent

    async def ack(self) -> None:
        self._check("ack")
        await self._reply(b"+ACK", "ack")
        self._settled = True

    async def retry(self, delay: float) -> None:
        self._check("retry")
        payload = b"-NAK"
        if delay > 0:
            payload += b" " + json.dumps({"delay": int(delay * 1e9)}).encode()
        await self._reply(payload, "retry")
        self._settled = True

    async def give_up(self, reason: str) -> None:
        self._check("give up")
        await self._queue._dead_letter(self._msg, self.job, reason)
        await self._reply(b"+TERM", "dead-letter")
        self._settled = True
        log.info("job %s dead-lettered after attempt %d: %s", self.job.id, self.job.attempt, reason)


class JetStreamQueue(Queue):
    def __init__(
        self, address: QueueAddress, *, ack_wait: float = 30.0, max_deliver: int = 5, connect_timeout: float = 5.0
    ) -> None:
        assert address.kind == "nats" and address.subject
        self.address = address
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.connect_timeout = connect_timeout
        self.stream = address.stream
        self.subject = address.subject
        self.consumer = address.group
        # Outside the work stream's subject (exactly ``subject``), so no overlap.
        self.dead_stream = f"{address.stream}_dead"
        self.dead_subject = f"{address.subject}.dead"
        self.events_subject = f"{address.subject}.events"
        self._nc: Any = None
        self._js: Any = None
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"

    # -- connection ---------------------------------------------------------

    async def connect(self) -> None:
        if self._nc is not None and self._nc.is_connected:
            return
        last_error: list[BaseException] = []

        async def on_error(error: BaseException) -> None:
            last_error[:] = [error]
            log.debug("nats %s: %s", self.address.server, error)

        async def on_disconnect() -> None:
            if self._nc is not None and not self._nc.is_closed:
                log.warning("disconnected from %s; reconnecting", self.address.server)

        async def on_reconnect() -> None:
            log.info("reconnected to %s", self.address.server)

        nc = nats.NATS()
        try:
            # Reconnects never stop once connected (a worker outlives a queue
            # restart); the first connect is bounded here instead.
            await asyncio.wait_for(
                nc.connect(
                    servers=[self.address.server_url],
                    connect_timeout=min(2.0, self.connect_timeout),
                    reconnect_time_wait=0.5,
                    max_reconnect_attempts=-1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                ),
                self.connect_timeout,
            )
        except (asyncio.TimeoutError, OSError, nats.errors.Error) as exc:
            with _quiet():
                await nc.close()
            cause = last_error[0] if last_error else exc
            raise QueueUnavailable(
                f"cannot reach NATS at {self.address.server} within {self.connect_timeout:g}s "
                f"({describe(cause, 'nats: ')}): check the address and that nats-server runs with -js"
            ) from None
        self._nc = nc
        self._js = nc.jetstream(timeout=REPLY_TIMEOUT)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with _quiet():
                await nc.close()

    async def _sync(self) -> None:
        """Returns once the server has processed everything this connection sent before.

        Not ``flush()``: nats-py 2.16 writes its PING straight to the socket,
        ahead of commands still buffered, so a flush can return before an
        earlier SUB or PUB reached the server. A request is buffered in order;
        the "no responders" answer to a subject no one serves proves the server
        got everything before it.
        """
        try:
            await self._nc.request(f"_NULL.SYNC.{self._nc.new_inbox()[7:]}", b"", timeout=REPLY_TIMEOUT)
        except nats.errors.NoRespondersError:
            pass

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """Client and server errors as QueueUnavailable naming the address."""
        if self._nc is None:
            raise not_connected(what, self.address.server)
        try:
            yield
        except QueueError:
            raise
        except nats.js.errors.NotFoundError as exc:
            raise QueueUnavailable(
                f"cannot {what}: {describe(exc, 'nats: ')} on {self.address.server} (stream {self.stream!r}, "
                f"consumer {self.consumer!r}): {SETUP_HINT}"
            ) from None
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            raise QueueUnavailable(
                f"cannot {what}: JetStream does not answer on {self.address.server} (stream {self.stream!r} "
                f"missing, or the server runs without -js): {SETUP_HINT}"
            ) from None
        except (asyncio.TimeoutError, OSError, nats.errors.Error) as exc:
            raise server_failed(what, self.address.server, exc, "nats: ") from None

    # -- setup --------------------------------------------------------------

    async def setup(self) -> None:
        with self._translate("set up the stream"):
            jsm = self._js
            await self._ensure_stream(
                jsm,
                api.StreamConfig(
                    name=self.stream,
                    subjects=[self.subject],
                    retention=api.RetentionPolicy.WORK_QUEUE,
                    storage=api.StorageType.FILE,
                    duplicate_window=DUPLICATE_WINDOW,
                ),
            )
            await self._ensure_stream(
                jsm,
                api.StreamConfig(
                    name=self.dead_stream,
                    subjects=[self.dead_subject],
                    retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType.FILE,
                    duplicate_window=DUPLICATE_WINDOW,
                ),
            )
            # Create-or-update: running setup again with new flags changes
            # AckWait on the existing consumer; the queue's contents stay.
            await jsm.add_consumer(
                self.stream,
                api.ConsumerConfig(
                    name=self.consumer,
                    durable_name=self.consumer,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=self.ack_wait,
                    max_deliver=-1,  # counted by claim(); see the module docstring
                    max_ack_pending=MAX_ACK_PENDING,
                    filter_subject=self.subject,
                ),
            )
        log.info("set up stream %s on %s (ack_wait %gs)", self.stream, self.address.server, self.ack_wait)

    async def _ensure_stream(self, jsm: Any, config: api.StreamConfig) -> None:
        try:
            info = await jsm.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await jsm.add_stream(config)
            return
        have = info.config
        if config.subjects and not set(config.subjects) <= set(have.subjects or []):
            raise QueueError(
                f"stream {config.name!r} on {self.address.server} takes subjects {have.subjects}, "
                f"not {config.subjects}: name another stream or subject in --queue"
            )
        if have.retention != config.retention:
            raise QueueError(
                f"stream {config.name!r} on {self.address.server} has retention {have.retention.value}, "
                f"not {config.retention.value}: name another stream in --queue"
            )

    async def check(self) -> None:
        with self._translate("find the stream"):
            await self._js.stream_info(self.stream)
            await self._js.stream_info(self.dead_stream)
            await self._js.consumer_info(self.stream, self.consumer)

    # -- jobs ---------------------------------------------------------------

    async def publish(self, job_id: str, body: bytes) -> bool:
        check_job_id(job_id)
        with self._translate(f"publish job {job_id}"):
            ack = await self._js.publish(self.subject, body, stream=self.stream, headers={MSG_ID: job_id})
        return not ack.duplicate

    async def claim(self, consumer: str, timeout: float) -> Claim | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining < 0.01:
                return None
            msg = await self._pull_one(remaining)
            if msg is None:
                return None
            sent = time.monotonic()
            meta = msg.metadata
            job = Job(
                id=(msg.headers or {}).get(MSG_ID) or f"{self.stream}:{meta.sequence.stream}",
                body=msg.data,
                attempt=meta.num_delivered,
                enqueued_at=meta.timestamp.timestamp() if meta.timestamp else None,
            )
            with self._translate(f"confirm the claim of job {job.id}"):
                await self._nc.request(msg.reply, b"+WPI", timeout=REPLY_TIMEOUT)
            claim = JetStreamClaim(self, msg, job, renewed=sent)
            if job.attempt <= self.max_deliver:
                log.debug("%s claimed job %s attempt %d", consumer, job.id, job.attempt)
                return claim
            # The last allowed attempt ended without an answer (crash, lost
            # lease): it will not run again.
            await claim.give_up(f"attempt {self.max_deliver} of {self.max_deliver} did not finish")

    async def _pull_one(self, wait: float) -> Msg | None:
        """One message, or None when none came within ``wait`` seconds; nothing is left buffered."""
        with self._translate("claim a job"):
            inbox = self._nc.new_inbox()
            sub = await self._nc.subscribe(inbox, max_msgs=1)
            try:
                request = {"batch": 1, "expires": int(wait * 1e9)}
                await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=inbox)
                try:
                    # The server answers by ``expires`` at the latest (a 408).
                    msg = await sub.next_msg(timeout=wait + REPLY_TIMEOUT)
                except nats.errors.TimeoutError:
                    return None
            finally:
                with _quiet():
                    await sub.unsubscribe()
            headers = msg.headers or {}
            status = headers.get("Status")
            if not status:
                return msg
            if status in ("404", "408"):  # no messages / request expired
                return None
            description = str(headers.get(api.Header.DESCRIPTION) or headers.get("Description") or "").strip()
            if status == "503":  # no responders: the stream or consumer is missing
                raise nats.errors.NoRespondersError
            if status == "409" and "deleted" in description.lower():
                raise nats.js.errors.NotFoundError(description=description)
            raise QueueUnavailable(f"cannot claim a job on {self.address.server}: server said {status} {description}")

    async def _dead_letter(self, msg: Msg, job: Job, reason: str) -> None:
        headers = {MSG_ID: job.id, REASON: reason[:1000], ATTEMPT: str(job.attempt)}
        with self._translate(f"dead-letter job {job.id}"):
            await self._js.publish(self.dead_subject, msg.data, stream=self.dead_stream, headers=headers)

    async def depth(self) -> Depth:
        with self._translate("read the depth"):
            info = await self._js.consumer_info(self.stream, self.consumer)
        return Depth(pending=info.num_pending or 0, in_flight=info.num_ack_pending or 0)

    async def dead_letters(self) -> list[Job]:
        """The dead-lettered jobs, oldest first (attempt = the attempt that was given up)."""
        with self._translate("read the dead letters"):
            info = await self._js.stream_info(self.dead_stream)
            jobs = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
                try:
                    raw = await self._js.get_msg(self.dead_stream, seq)
                except nats.js.errors.NotFoundError:
                    continue
                headers = raw.headers or {}
                jobs.append(Job(headers.get(MSG_ID, ""), raw.data or b"", int(headers.get(ATTEMPT, "0"))))
        return jobs

    # -- events -------------------------------------------------------------

    async def publish_event(self, event: JobEvent) -> None:
        with self._translate(f"publish a {event.kind} event"):
            await self._nc.publish(self.events_subject, json.dumps(event.to_dict()).encode())
            await self._sync()

    def events(self) -> Feed[JobEvent]:
        def parse(msg: Msg) -> JobEvent | None:
            try:
                return JobEvent.from_dict(json.loads(msg.data))
            except (ValueError, TypeError) as exc:
                log.warning("ignored a malformed event on %s: %s", self.events_subject, exc)
                return None

        return Feed(self._core_feed(self.events_subject, parse))

    def new_jobs(self) -> Feed[str]:
        # A core subscription: a work-queue stream refuses a second consumer
        # on its subject, and this one takes nothing from the stream.
        def parse(msg: Msg) -> str | None:
            return (msg.headers or {}).get(MSG_ID)

        return Feed(self._core_feed(self.subject, parse))

    def _core_feed(self, subject: str, parse: Callable[[Msg], Any]) -> Callable[..., Awaitable[Any]]:
        async def opener(put: Callable[[Any], None], fail: Callable[[BaseException], None]) -> Any:
            async def on_msg(msg: Msg) -> None:
                item = parse(msg)
                if item is not None:
                    put(item)

            with self._translate(f"subscribe to {subject}"):
                sub = await self._nc.subscribe(subject, cb=on_msg)
                await self._sync()  # the server holds the subscription now

            async def closer() -> None:
                with _quiet():
                    await sub.unsubscribe()

            return closer

        return opener


@contextmanager
def _quiet() -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # cleanup of a connection that may already be gone
        log.debug("ignored while closing: %s", exc)
