"""NATS JetStream adapter: a work-queue stream, one durable pull consumer shared by every worker.

How each verb maps onto JetStream:

- ``claim``: one pull request for one message (``batch 1``, expiring with the
  timeout) on a fresh inbox that is dropped afterwards, so nothing is ever
  prefetched: a message the server sends after we stopped waiting reaches no
  one and is redelivered after AckWait. The claim is then confirmed with an
  in-progress ack (``+WPI``) whose send time anchors the lease.
- ``keep_alive``: a confirmed ``+WPI``, which restarts AckWait on the server.
- ``ack``: a confirmed ``+ACK``. ``retry``: the job's failures, one more, are
  put in the failures bucket, then a confirmed ``-NAK`` with the delay.
  ``hand_back``: a confirmed ``-NAK`` with no delay and no failure counted.
- ``give_up``: the message is published to the dead-letter stream, then
  ``+TERM``-ed, so the work stream never delivers it again.

Failures: a nak cannot change a message, so a job's own failures are kept in a
key-value bucket, ``STREAM_failures``, under the job id in base64url (no
padding); ``claim`` reads them, ``ack`` and ``give_up`` delete the key.

Ownership: the server accepts acks (and naks and terms) of a delivery that
already lapsed and went to another worker (nats-server #4786), so the claim
decides for itself. It knows the send time of its last confirmed renewal; the
server cannot have restarted AckWait before that, so the message stays ours
until that time plus AckWait. Past it (less a margin for the round trip), every
verb raises NotOwned and sends nothing.

Attempts: the consumer's MaxDeliver is unlimited on the server. ``claim`` counts
the deliveries itself (``num_delivered``) and dead-letters at once a delivery
past ``max_deliver`` (one that keeps crashing or lapsing). A server-side
MaxDeliver would leave such a message in the stream, delivered to no one and
counted nowhere (nats-server #6905); this way it is always either pending, in
flight, acked or dead-lettered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from workers.null.protocol import JobEvent, parse_event
from workers.null.queues.address import QueueAddress
from workers.null.queues.base import (
    GAP,
    SETUP_HINT,
    Claim,
    DeadLetter,
    Depth,
    Feed,
    Job,
    NotOwned,
    Queue,
    QueueError,
    QueueUnavailable,
    check_body_size,
    check_job_id,
    describe,
    lease_margin,
    not_connected,
    past_deliveries,
    server_failed,
)

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
REASON = "Null-Reason"
ATTEMPT = "Null-Attempt"
FAILURES = "Null-Failures"
# Failure counts outlive a job by at most this long (a key left by a consumer that died between ack and delete).
FAILURES_TTL = 7 * 86400.0
# Room left in the server's max_payload for a message's headers.
HEADER_ROOM = 1024
# Enough for any fleet; a worker holds at most one job.
MAX_ACK_PENDING = 100_000
# How long the server remembers a job id to drop a duplicate publish.
DUPLICATE_WINDOW = 120.0
# A confirmed verb waits this long for the server's answer.
REPLY_TIMEOUT = 2.0


def failures_key(job_id: str) -> str:
    """A job's key in the failures bucket: its id in base64url, which every key-value client accepts."""
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=") or "_"


class JetStreamClaim(Claim):
    def __init__(self, queue: JetStreamQueue, msg: Msg, job: Job, renewed: float) -> None:
        self.job = job
        self._queue = queue
        self._msg = msg
        self._renewed = renewed  # monotonic send time of the last confirmed +WPI
        self._settled = False

    @property
    def owned_until(self) -> float:
        if self._settled:
            return -math.inf
        return self._renewed + self._queue.ack_wait - lease_margin(self._queue.ack_wait)

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
        await self._queue._forget_failures(self.job)

    async def retry(self, delay: float) -> None:
        self._check("retry")
        await self._queue._count_failure(self.job)
        payload = b"-NAK"
        if delay > 0:
            payload += b" " + json.dumps({"delay": int(delay * 1e9)}).encode()
        await self._reply(payload, "retry")
        self._settled = True

    async def hand_back(self) -> None:
        self._check("hand back")
        await self._reply(b"-NAK", "hand back")
        self._settled = True

    async def give_up(self, reason: str) -> None:
        self._check("give up")
        await self._queue._dead_letter(self._msg, self.job, reason)
        await self._reply(b"+TERM", "dead-letter")
        self._settled = True
        log.info("job %s dead-lettered after attempt %d: %s", self.job.id, self.job.attempt, reason)
        await self._queue._forget_failures(self.job)


class JetStreamQueue(Queue):
    def __init__(
        self, address: QueueAddress, *, ack_wait: float = 30.0, max_deliver: int = 10, connect_timeout: float = 5.0
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
        self.failures_bucket = f"{address.stream}_failures"
        self._nc: Any = None
        self._js: Any = None
        self._kv: Any = None
        self._on_reconnect: set[Callable[[], None]] = set()  # each feed's way to say it may have missed items
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
            for gap in list(self._on_reconnect):
                gap()

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
            self._kv = await jsm.create_key_value(
                config=api.KeyValueConfig(bucket=self.failures_bucket, history=1, ttl=FAILURES_TTL)
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
            self._kv = await self._js.key_value(self.failures_bucket)

    # -- jobs ---------------------------------------------------------------

    async def publish(self, job_id: str, body: bytes) -> bool:
        check_job_id(job_id)
        if self._nc is not None:
            check_body_size(job_id, body, self._nc.max_payload - HEADER_ROOM, "a message on this server (max_payload)")
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
            job_id = (msg.headers or {}).get(MSG_ID) or f"{self.stream}:{meta.sequence.stream}"
            with self._translate(f"confirm the claim of job {job_id}"):
                await self._nc.request(msg.reply, b"+WPI", timeout=REPLY_TIMEOUT)
            job = Job(
                id=job_id,
                body=msg.data,
                attempt=meta.num_delivered,
                enqueued_at=meta.timestamp.timestamp() if meta.timestamp else None,
                failures=await self._failures(job_id),
            )
            claim = JetStreamClaim(self, msg, job, renewed=sent)
            problem = past_deliveries(job, self.max_deliver)
            if problem is None:
                log.debug("%s claimed job %s attempt %d", consumer, job.id, job.attempt)
                return claim
            await claim.give_up(problem)

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

    # -- failures -----------------------------------------------------------

    async def _failures(self, job_id: str) -> int:
        with self._translate(f"read job {job_id}'s failures"):
            try:
                entry = await self._kv.get(failures_key(job_id))
            except nats.js.errors.KeyNotFoundError:
                return 0
        try:
            return max(0, int(entry.value or b"0"))
        except ValueError:
            return 0

    async def _count_failure(self, job: Job) -> None:
        with self._translate(f"count job {job.id}'s failure"):
            await self._kv.put(failures_key(job.id), str(job.failures + 1).encode())

    async def _forget_failures(self, job: Job) -> None:
        if job.failures:
            # Best effort: a key left behind ages out after FAILURES_TTL.
            with _quiet():
                await self._kv.purge(failures_key(job.id))

    async def _dead_letter(self, msg: Msg, job: Job, reason: str) -> None:
        headers = {
            MSG_ID: job.id,
            REASON: reason[:1000],
            ATTEMPT: str(job.attempt),
            FAILURES: str(job.failures),
        }
        with self._translate(f"dead-letter job {job.id}"):
            await self._js.publish(self.dead_subject, msg.data, stream=self.dead_stream, headers=headers)

    async def depth(self) -> Depth:
        with self._translate("read the depth"):
            info = await self._js.consumer_info(self.stream, self.consumer)
        return Depth(pending=info.num_pending or 0, in_flight=info.num_ack_pending or 0)

    async def dead_letters(self) -> list[DeadLetter]:
        """The dead-lettered jobs, oldest first."""
        with self._translate("read the dead letters"):
            info = await self._js.stream_info(self.dead_stream)
            jobs = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
                try:
                    raw = await self._js.get_msg(self.dead_stream, seq)
                except nats.js.errors.NotFoundError:
                    continue
                headers = raw.headers or {}
                jobs.append(
                    DeadLetter(
                        id=headers.get(MSG_ID, ""),
                        body=raw.data or b"",
                        attempt=_whole(headers.get(ATTEMPT)),
                        failures=_whole(headers.get(FAILURES)),
                        reason=headers.get(REASON, ""),
                        at=raw.time.timestamp() if getattr(raw, "time", None) else None,
                    )
                )
        return jobs

    # -- events -------------------------------------------------------------

    async def publish_event(self, event: JobEvent) -> None:
        with self._translate(f"publish a {event.kind} event"):
            await self._nc.publish(self.events_subject, event.to_json().encode())
            await self._sync()

    def events(self) -> Feed[JobEvent]:
        warned: set[str] = set()

        def parse(msg: Msg) -> JobEvent | None:
            return parse_event(msg.data, self.events_subject, warned)

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

            # The client resubscribes after a reconnect; what was published meanwhile is gone.
            def gap() -> None:
                put(GAP)

            self._on_reconnect.add(gap)

            async def closer() -> None:
                self._on_reconnect.discard(gap)
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


def _whole(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0
