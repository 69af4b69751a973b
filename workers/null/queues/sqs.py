"""Amazon SQS adapter: a work queue, its dead-letter queue and an events queue.

Queues, for an address naming QUEUE (docs/sqs.md has the wire details):

    QUEUE          the jobs; standard, or FIFO when the name ends in ``.fifo``
    QUEUE-dead     dead-lettered jobs (``QUEUE-dead.fifo`` for a FIFO queue)
    QUEUE-events   job events for the dispatcher (always a standard queue)

Each job is one message: the body as sent (UTF-8 text; other bytes in base64),
the job id in the message attribute ``null-job-id``.

How each verb maps onto SQS:

- ``claim``: ``ReceiveMessage`` with ``MaxNumberOfMessages=1``, a long poll of
  the whole seconds left of the timeout (20 at most, so never past it) and
  ``VisibilityTimeout`` = ack_wait rounded up to whole seconds. A long poll
  may hand the message out at any moment of its wait, so the claim is then
  confirmed with ``ChangeMessageVisibility`` whose send time anchors the lease.
- ``keep_alive``: ``ChangeMessageVisibility`` to ack_wait again.
- ``ack``: ``DeleteMessage``. ``retry(delay)``: ``ChangeMessageVisibility`` to
  the delay (rounded up to whole seconds; 0 is at once).
- ``give_up``: ``SendMessage`` of the same body to the dead-letter queue with
  the job id, the attempt and the reason as message attributes, then
  ``DeleteMessage`` from the work queue: it is never delivered again.

Ownership: SQS gives each delivery a new receipt handle and accepts an old one.
AWS says a delete with it "succeeds, but the message might not be deleted";
moto deletes the message outright, even while another consumer holds a newer
delivery, and changes that delivery's visibility. So the claim decides for
itself, as on JetStream: the server cannot have started the visibility timeout
before the send time of the last confirmed change, so the message stays ours
until that time plus ack_wait (less a margin for the round trip). Past it every
verb raises NotOwned and sends nothing. A receipt handle the server refuses
(``ReceiptHandleIsInvalid``, ``MessageNotInflight``) is NotOwned too.

Attempts: ``ApproximateReceiveCount``. ``claim`` dead-letters at once a
delivery past ``max_deliver`` (the last attempt crashed or lapsed). The work
queue's ``RedrivePolicy`` (maxReceiveCount = max_deliver + 2) is a backstop
only: it lets the server move a message our claims failed to dead-letter twice
(the dead-letter send refused, say, for a body at SQS's size limit), which
would otherwise come back forever. Such a message has no attempt or reason.

Depth: ``ApproximateNumberOfMessages`` is pending; ``...NotVisible`` (claimed,
or handed back and waiting for a retry's delay) plus ``...Delayed`` (sent with a
delay by another producer) is in flight: neither can be claimed yet, as with
the other adapters' delayed retries. AWS says the counts settle about a minute
after producers stop, so a dispatcher may ask for a session too many; the
worker's claim timeout then releases it at once, having claimed nothing.

No push: SQS cannot tell anyone a message arrived without receiving it, and a
receive from the work queue would take the job. ``new_jobs()`` yields nothing;
the dispatcher learns of new jobs only by reading ``depth()`` every
``--reconcile`` seconds. Job events go through the events queue: the consumer
sends them, the dispatcher's ``events()`` long-polls and deletes them. It is a
queue, not a broadcast: one dispatcher per queue receives them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, suppress
from typing import Any

import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from workers.null.protocol import JobEvent
from workers.null.queues.address import SqsAddress
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
)

log = logging.getLogger(__name__)

# Message attributes (docs/sqs.md).
JOB_ID = "null-job-id"  # the publisher's job id (else the message id stands in)
BODY = "null-body"  # absent: the body is the job's bytes as UTF-8; "base64" or "empty" otherwise
ATTEMPT = "null-attempt"  # dead letters: the attempt that was given up
REASON = "null-reason"  # dead letters: why
# SQS's limits: a long poll, a visibility timeout, a receive count in a redrive policy.
MAX_WAIT = 20
MAX_VISIBILITY = 43200
MAX_RECEIVE_COUNT = 1000
# Receives the redrive policy allows past max_deliver + 1 (the delivery claim dead-letters itself).
REDRIVE_SLACK = 1
# A verb other than a long poll waits this long for the server's answer.
REPLY_TIMEOUT = 5.0
DEAD_RETENTION = 1209600  # 14 days, SQS's longest
EVENTS_RETENTION = 3600  # an event older than that is of no use to a dispatcher
EVENTS_VISIBILITY = 30  # an event received and not deleted (listener gone) comes back after this
# How long dead_letters() hides what it looked at; it shows them again at once when done.
PEEK_HIDE = 30
_MISSING = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}
_HANDLE_GONE = {"ReceiptHandleIsInvalid", "MessageNotInflight", "AWS.SimpleQueueService.MessageNotInflight"}
_CREDENTIALS = {
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "InvalidAccessKeyId",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidSecurity",
}
_DENIED = {"AccessDenied", "AccessDeniedException", "KMS.AccessDeniedException"}
_CREDENTIALS_FIX = "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance role"
# Characters an SQS message body may hold (XML 1.0's).
_NOT_SQS_TEXT = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# A FIFO group or deduplication id: up to 128 printable ASCII characters.
_FIFO_TOKEN = re.compile(r"^[\x21-\x7e]{1,128}$")


class QueueMissing(QueueUnavailable):
    """SQS says a queue does not exist."""


def lease_margin(ack_wait: float) -> float:
    """How long before the visibility timeout ends a claim stops counting as owned: room for one round trip."""
    return min(1.0, ack_wait * 0.1)


def encode_body(body: bytes) -> tuple[str, dict[str, Any]]:
    """The message body for ``body`` and the attributes that say how to read it back."""
    if not body:
        return "-", {BODY: _text_attribute("empty")}  # SQS refuses an empty body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not _NOT_SQS_TEXT.search(text):
        return text, {}
    return base64.b64encode(body).decode("ascii"), {BODY: _text_attribute("base64")}


def decode_body(message: dict[str, Any]) -> bytes:
    encoding = _attribute(message, BODY)
    if encoding == "empty":
        return b""
    if encoding == "base64":
        return base64.b64decode(message.get("Body", ""))
    return str(message.get("Body", "")).encode("utf-8")


def fifo_token(value: str) -> str:
    """``value`` as a FIFO group or deduplication id: as it is when SQS takes it, else its SHA-256."""
    return value if _FIFO_TOKEN.match(value) else hashlib.sha256(value.encode()).hexdigest()


def _text_attribute(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _attribute(message: dict[str, Any], name: str) -> str | None:
    value = (message.get("MessageAttributes") or {}).get(name) or {}
    return value.get("StringValue")


def _sent(message: dict[str, Any]) -> int:
    return int((message.get("Attributes") or {}).get("SentTimestamp") or 0)


class SqsClaim(Claim):
    def __init__(self, queue: SqsQueue, message: dict[str, Any], job: Job, renewed: float) -> None:
        self.job = job
        self._queue = queue
        self._message = message
        self._handle = message["ReceiptHandle"]
        self._renewed = renewed  # monotonic send time of the last confirmed visibility change
        self._settled = False
        self._lost = False

    @property
    def owned(self) -> bool:
        if self._settled or self._lost:
            return False
        return time.monotonic() < self._renewed + self._queue.ack_wait - lease_margin(self._queue.ack_wait)

    def _check(self, verb: str) -> None:
        if self._settled:
            raise NotOwned(f"job {self.job.id} attempt {self.job.attempt} is already settled: cannot {verb} it again")
        if self._lost:
            raise NotOwned(f"job {self.job.id} attempt {self.job.attempt} went to another consumer: not {verb}ing it")
        if not self.owned:
            lapsed = time.monotonic() - self._renewed
            raise NotOwned(
                f"job {self.job.id} attempt {self.job.attempt} was not renewed for {lapsed:.1f}s "
                f"(ack_wait {self._queue.ack_wait:g}s): it may be running elsewhere, not {verb}ing it"
            )

    async def _on_handle(self, what: str, method: str, **params: Any) -> None:
        """One call naming this delivery's receipt handle; a handle the server refuses means the claim is lost."""
        q = self._queue
        try:
            await q._call(what, method, QueueUrl=q._urls[q.address.queue], ReceiptHandle=self._handle, **params)
        except NotOwned:
            self._lost = True
            raise

    async def keep_alive(self) -> None:
        self._check("renew")
        sent = time.monotonic()
        await self._on_handle(
            f"renew job {self.job.id}", "change_message_visibility", VisibilityTimeout=self._queue.visibility
        )
        self._renewed = sent

    async def ack(self) -> None:
        self._check("ack")
        await self._on_handle(f"ack job {self.job.id}", "delete_message")
        self._settled = True

    async def retry(self, delay: float) -> None:
        self._check("retry")
        seconds = min(MAX_VISIBILITY, math.ceil(max(0.0, delay)))
        await self._on_handle(f"retry job {self.job.id}", "change_message_visibility", VisibilityTimeout=seconds)
        self._settled = True

    async def give_up(self, reason: str) -> None:
        self._check("give up")
        await self._queue._dead_letter(self._message, self.job, reason)
        await self._on_handle(f"dead-letter job {self.job.id}", "delete_message")
        self._settled = True
        log.info("job %s dead-lettered after attempt %d: %s", self.job.id, self.job.attempt, reason)


class SqsQueue(Queue):
    def __init__(
        self, address: SqsAddress, *, ack_wait: float = 30.0, max_deliver: int = 5, connect_timeout: float = 5.0
    ) -> None:
        if ack_wait > MAX_VISIBILITY:
            raise QueueError(f"ack_wait {ack_wait:g} is longer than SQS's 12 h visibility limit: use e.g. 30")
        self.address = address
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.connect_timeout = connect_timeout
        # SQS counts whole seconds; rounding up keeps the server's hold at least as long as the claim's.
        self.visibility = max(1, math.ceil(ack_wait))
        self.max_receive_count = min(MAX_RECEIVE_COUNT, max_deliver + 1 + REDRIVE_SLACK)
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._urls: dict[str, str] = {}
        self._server = address.server

    # -- connection ---------------------------------------------------------

    async def connect(self) -> None:
        """Opens the client and asks for the work queue's URL: the server answers and takes the credentials.

        A queue that does not exist yet is no failure here (``setup`` comes next).
        """
        if self._client is not None:
            return
        stack = AsyncExitStack()
        config = AioConfig(
            connect_timeout=min(2.0, self.connect_timeout),
            read_timeout=MAX_WAIT + REPLY_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": 3},
        )
        try:
            client = await stack.enter_async_context(
                get_session().create_client(
                    "sqs", region_name=self.address.region, endpoint_url=self.address.endpoint, config=config
                )
            )
        except botocore.exceptions.NoRegionError:
            await stack.aclose()
            raise self._no_region() from None
        if not self.address.endpoint:
            self._server = f"SQS {client.meta.region_name}"
        self._stack, self._client = stack, client
        try:
            await asyncio.wait_for(self._url(self.address.queue, "connect", missing_ok=True), self.connect_timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise QueueUnavailable(
                f"cannot reach {self._server} within {self.connect_timeout:g}s: check endpoint= in --queue "
                "and that the server runs (or the network reaches AWS)"
            ) from None
        except QueueError:
            await self.close()
            raise

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            try:
                await stack.aclose()
            except Exception as exc:  # a connection that may already be gone
                log.debug("ignored while closing: %s", exc)

    async def _call(self, what: str, method: str, *, timeout: float = REPLY_TIMEOUT, **params: Any) -> dict[str, Any]:
        """One SQS call; every client or server error as one QueueError line naming the server and the fix."""
        if self._client is None:
            raise not_connected(what, self._server)
        try:
            return await asyncio.wait_for(getattr(self._client, method)(**params), timeout)
        except asyncio.TimeoutError:
            raise QueueUnavailable(f"cannot {what}: {self._server} did not answer within {timeout:g}s") from None
        except botocore.exceptions.ClientError as exc:
            raise self._refused(what, exc) from None
        except botocore.exceptions.NoRegionError:
            raise self._no_region() from None
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError):
            raise QueueUnavailable(
                f"cannot {what}: no AWS credentials found for {self._server}: {_CREDENTIALS_FIX}"
            ) from None
        except botocore.exceptions.ParamValidationError as exc:
            raise QueueError(f"cannot {what}: {' '.join(str(exc).split())}") from None
        except botocore.exceptions.ConnectionError as exc:  # EndpointConnectionError, ConnectTimeoutError, ...
            raise QueueUnavailable(
                f"cannot {what}: cannot reach {self._server} ({describe(exc)}): check endpoint= in --queue "
                "and that the server runs (or the network reaches AWS)"
            ) from None
        except (botocore.exceptions.BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise QueueUnavailable(f"cannot {what} on {self._server}: {describe(exc)}") from None

    def _no_region(self) -> QueueError:
        return QueueError(
            f"no AWS region for queue {self.address.queue!r}: add ?region=us-east-1 (yours) to --queue, "
            "or set AWS_REGION"
        )

    def _refused(self, what: str, exc: botocore.exceptions.ClientError) -> QueueError:
        error = exc.response.get("Error") or {}
        code = str(error.get("QueryErrorCode") or error.get("Code") or "")
        message = str(error.get("Message") or "")
        # moto's JSON answers to a refused signature carry the XML error inside the message.
        inner = re.search(r"<Code>([^<]+)</Code>", message)
        if inner:
            code = inner.group(1)
            message = (re.search(r"<Message>([^<]*)</Message>", message) or inner).group(1)
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in _HANDLE_GONE or (code == "InvalidParameterValue" and "receipt handle" in message.lower()):
            return NotOwned(f"cannot {what}: {self._server} no longer takes the receipt handle ({code}): not owned")
        if code in _MISSING or str(error.get("Code")) in _MISSING:
            return QueueMissing(f"cannot {what}: a queue does not exist on {self._server}: {SETUP_HINT}")
        # The server's text for these may name the caller's identity; the code alone says enough.
        if code in _CREDENTIALS or (status == 403 and code not in _DENIED):
            return QueueUnavailable(
                f"cannot {what}: {self._server} refused the credentials ({code}): {_CREDENTIALS_FIX}"
            )
        if code in _DENIED:
            return QueueUnavailable(
                f"cannot {what}: {self._server} denied it ({code}): grant the credentials' role the sqs: actions "
                "on these queues (docs/queues.md lists them)"
            )
        first = message.strip().splitlines()[0] if message.strip() else "no message"
        if isinstance(status, int) and 400 <= status < 500:
            # The request itself was refused (a body too large, a bad attribute): retrying will not help.
            return QueueError(f"cannot {what}: {self._server} refused it: {code}: {first}")
        return QueueUnavailable(f"cannot {what} on {self._server}: {code or status}: {first}")

    async def _url(self, name: str, what: str, *, missing_ok: bool = False) -> str | None:
        """The queue URL for ``name`` (asked once, then kept); QueueUnavailable naming setup when it is missing."""
        if name in self._urls:
            return self._urls[name]
        params: dict[str, Any] = {"QueueName": name}
        if self.address.account:
            params["QueueOwnerAWSAccountId"] = self.address.account
        try:
            answer = await self._call(what, "get_queue_url", **params)
        except QueueMissing:
            if missing_ok:
                return None
            raise QueueMissing(
                f"cannot {what}: queue {name!r} does not exist on {self._server}: {SETUP_HINT}"
            ) from None
        self._urls[name] = answer["QueueUrl"]
        return self._urls[name]

    # -- setup --------------------------------------------------------------

    async def setup(self) -> None:
        """Creates the three queues when missing, and sets their attributes every time (create-or-update)."""
        if self.address.account:
            raise QueueError(
                "setup creates queues in the credentials' own account: set up with "
                f"--queue sqs://{self.address.queue}?region={self.address.region}, then use either address"
            )
        fifo = {"FifoQueue": "true"} if self.address.fifo else {}
        dead_url = await self._ensure(self.address.dead, fifo, {"MessageRetentionPeriod": str(DEAD_RETENTION)})
        dead_arn = (
            await self._call(
                "set up the queues", "get_queue_attributes", QueueUrl=dead_url, AttributeNames=["QueueArn"]
            )
        )["Attributes"]["QueueArn"]
        redrive = {"deadLetterTargetArn": dead_arn, "maxReceiveCount": self.max_receive_count}
        await self._ensure(
            self.address.queue,
            fifo,
            {"VisibilityTimeout": str(self.visibility), "RedrivePolicy": json.dumps(redrive)},
        )
        await self._ensure(
            self.address.events,
            {},
            {"VisibilityTimeout": str(EVENTS_VISIBILITY), "MessageRetentionPeriod": str(EVENTS_RETENTION)},
        )
        log.info(
            "set up queue %s (dead letters %s, events %s) on %s: visibility %ds, redrive after %d receives",
            self.address.queue,
            self.address.dead,
            self.address.events,
            self._server,
            self.visibility,
            self.max_receive_count,
        )

    async def _ensure(self, name: str, create: dict[str, str], update: dict[str, str]) -> str:
        """The queue's URL, creating it when missing; ``update`` is set either way.

        Not CreateQueue alone: SQS refuses it for an existing queue whose
        attributes differ, and a second setup with another ack_wait must pass.
        """
        url = await self._url(name, "set up the queues", missing_ok=True)
        if url is None:
            try:
                url = (
                    await self._call(
                        "set up the queues", "create_queue", QueueName=name, Attributes={**create, **update}
                    )
                )["QueueUrl"]
            except QueueError as exc:
                # QueueAlreadyExists: created meanwhile by another setup.
                if "QueueAlreadyExists" not in str(exc) and "QueueNameExists" not in str(exc):
                    raise
                url = await self._url(name, "set up the queues")
            assert url is not None
            self._urls[name] = url
        await self._call("set up the queues", "set_queue_attributes", QueueUrl=url, Attributes=update)
        return url

    async def check(self) -> None:
        for name in (self.address.queue, self.address.dead, self.address.events):
            self._urls.pop(name, None)  # ask the server, not what an earlier call found
            await self._url(name, "find the queues")

    # -- jobs ---------------------------------------------------------------

    async def publish(self, job_id: str, body: bytes) -> bool:
        """Sends the job; always True: a standard queue keeps duplicates, a FIFO one drops them without saying so."""
        check_job_id(job_id)
        url = await self._url(self.address.queue, f"publish job {job_id}")
        text, attributes = encode_body(body)
        params: dict[str, Any] = {
            "QueueUrl": url,
            "MessageBody": text,
            "MessageAttributes": {JOB_ID: _text_attribute(job_id), **attributes},
        }
        if self.address.fifo:
            # A group per job: SQS holds back the rest of a group while one of its messages is in flight.
            params["MessageGroupId"] = params["MessageDeduplicationId"] = fifo_token(job_id)
        await self._call(f"publish job {job_id}", "send_message", **params)
        return True

    async def claim(self, consumer: str, timeout: float) -> Claim | None:
        url = await self._url(self.address.queue, "claim a job")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            # Whole seconds of long poll, so never past the deadline; the last part is one short poll.
            wait = max(0, min(MAX_WAIT, int(deadline - time.monotonic())))
            answer = await self._call(
                "claim a job",
                "receive_message",
                timeout=wait + REPLY_TIMEOUT,
                QueueUrl=url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=wait,
                VisibilityTimeout=self.visibility,
                # Both spellings: AttributeNames is deprecated on AWS, and all some SQS-compatible servers know.
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                AttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                MessageAttributeNames=["All"],
            )
            messages = answer.get("Messages") or []
            if not messages:
                if wait == 0 or time.monotonic() >= deadline:
                    return None
                continue
            message = messages[0]
            system = message.get("Attributes") or {}
            sent_ms = int(system.get("SentTimestamp") or 0)
            job = Job(
                id=_attribute(message, JOB_ID) or message["MessageId"],
                body=decode_body(message),
                attempt=int(system.get("ApproximateReceiveCount") or 1),
                enqueued_at=sent_ms / 1000 if sent_ms else None,
            )
            claim = SqsClaim(self, message, job, renewed=time.monotonic())
            try:
                await claim.keep_alive()  # anchors the lease: see the module docstring
            except NotOwned:
                log.debug("job %s attempt %d lapsed before its claim was confirmed", job.id, job.attempt)
                continue
            if job.attempt <= self.max_deliver:
                log.debug("%s claimed job %s attempt %d", consumer, job.id, job.attempt)
                return claim
            # The last allowed attempt ended without an answer (crash, lost lease): it will not run again.
            await claim.give_up(f"attempt {self.max_deliver} of {self.max_deliver} did not finish")
            if time.monotonic() >= deadline:
                return None

    async def _dead_letter(self, message: dict[str, Any], job: Job, reason: str) -> None:
        url = await self._url(self.address.dead, f"dead-letter job {job.id}")
        attributes = {
            JOB_ID: _text_attribute(job.id),
            ATTEMPT: {"DataType": "Number", "StringValue": str(job.attempt)},
            REASON: _text_attribute(reason[:1000] or "-"),  # SQS refuses an empty attribute value
        }
        encoding = _attribute(message, BODY)
        if encoding:
            attributes[BODY] = _text_attribute(encoding)
        params: dict[str, Any] = {
            "QueueUrl": url,
            "MessageBody": message.get("Body") or "-",
            "MessageAttributes": attributes,
        }
        if self.address.fifo:
            # Its own group, so dead_letters() sees every one at once.
            params["MessageGroupId"] = params["MessageDeduplicationId"] = fifo_token(f"{job.id}#{job.attempt}")
        await self._call(f"dead-letter job {job.id}", "send_message", **params)

    async def depth(self) -> Depth:
        url = await self._url(self.address.queue, "read the depth")
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        answer = await self._call("read the depth", "get_queue_attributes", QueueUrl=url, AttributeNames=names)
        counts = {name: int(value) for name, value in (answer.get("Attributes") or {}).items()}
        return Depth(
            pending=counts.get(names[0], 0),
            in_flight=counts.get(names[1], 0) + counts.get(names[2], 0),
        )

    async def dead_letters(self) -> list[Job]:
        """The dead-lettered jobs, oldest first; attempt 0 for one the redrive policy moved (no attributes).

        SQS has no peek: this receives every message of the dead-letter queue,
        hiding each for PEEK_HIDE seconds so the next receive returns the next
        ones, then makes them all visible again. Should it die in between, they
        reappear on their own after PEEK_HIDE. Two readers at once would each
        see only a part.
        """
        url = await self._url(self.address.dead, "read the dead letters")
        seen: dict[str, dict[str, Any]] = {}
        try:
            while True:
                answer = await self._call(
                    "read the dead letters",
                    "receive_message",
                    timeout=1 + REPLY_TIMEOUT,
                    QueueUrl=url,
                    MaxNumberOfMessages=10,
                    # A long poll asks every SQS server; a short one only some, and may miss a few.
                    WaitTimeSeconds=1,
                    VisibilityTimeout=PEEK_HIDE,
                    MessageSystemAttributeNames=["SentTimestamp"],
                    AttributeNames=["SentTimestamp"],
                    MessageAttributeNames=["All"],
                )
                messages = answer.get("Messages") or []
                if not messages:
                    break
                for message in messages:
                    seen[message["MessageId"]] = message
        finally:
            await self._show_again(url, [m["ReceiptHandle"] for m in seen.values()])
        ordered = sorted(seen.values(), key=_sent)
        return [
            Job(_attribute(m, JOB_ID) or m["MessageId"], decode_body(m), int(_attribute(m, ATTEMPT) or 0))
            for m in ordered
        ]

    async def _show_again(self, url: str, handles: list[str]) -> None:
        for start in range(0, len(handles), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                for i, handle in enumerate(handles[start : start + 10])
            ]
            try:
                await self._call(
                    "show the dead letters again", "change_message_visibility_batch", QueueUrl=url, Entries=entries
                )
            except QueueError as exc:  # they come back on their own after PEEK_HIDE
                log.warning("%s; they reappear within %ds", exc, PEEK_HIDE)

    # -- events -------------------------------------------------------------

    async def publish_event(self, event: JobEvent) -> None:
        url = await self._url(self.address.events, f"publish a {event.kind} event")
        await self._call(
            f"publish a {event.kind} event", "send_message", QueueUrl=url, MessageBody=json.dumps(event.to_dict())
        )

    def events(self) -> Feed[JobEvent]:
        """Events from the events queue: what waits there at the start is dropped (stale), the rest is delivered.

        Each received batch is delivered, then deleted; an event whose delete
        failed may come again.
        """

        async def opener(put: Callable[[JobEvent], None], fail: Callable[[BaseException], None]) -> Any:
            url = await self._url(self.address.events, "receive job events")
            dropped = await self._drain(url)
            if dropped:
                log.info("dropped %d job event(s) sent before the dispatcher listened", dropped)

            async def read() -> None:
                try:
                    while True:
                        messages = await self._receive_events(url, MAX_WAIT)
                        for message in messages:
                            try:
                                put(JobEvent.from_dict(json.loads(message.get("Body") or "")))
                            except (ValueError, TypeError) as exc:
                                log.warning("ignored a malformed event on %s: %s", self.address.events, exc)
                        await self._delete(url, messages)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    fail(QueueUnavailable(f"events from {self._server} stopped: {describe(exc)}"))

            task = asyncio.ensure_future(read())

            async def closer() -> None:
                # A poll cut short may leave a few events hidden for EVENTS_VISIBILITY; the next listener drops them.
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

            return closer

        return Feed(opener)

    async def _receive_events(self, url: str, wait: int) -> list[dict[str, Any]]:
        answer = await self._call(
            "receive job events",
            "receive_message",
            timeout=wait + REPLY_TIMEOUT,
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait,
            VisibilityTimeout=EVENTS_VISIBILITY,
            MessageSystemAttributeNames=["SentTimestamp"],
            AttributeNames=["SentTimestamp"],
        )
        # A standard queue may deliver out of order: at least each batch goes in the order it was sent.
        return sorted(answer.get("Messages") or [], key=_sent)

    async def _drain(self, url: str) -> int:
        """Deletes what waits in the events queue now; the last look is a 1 s long poll, which asks every server."""
        dropped = 0
        for wait in (0, 1):
            while messages := await self._receive_events(url, wait):
                await self._delete(url, messages)
                dropped += len(messages)
        return dropped

    async def _delete(self, url: str, messages: list[dict[str, Any]]) -> None:
        for start in range(0, len(messages), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages[start : start + 10])
            ]
            await self._call("delete job events", "delete_message_batch", QueueUrl=url, Entries=entries)

    def new_jobs(self) -> Feed[str]:
        """Yields nothing: SQS has no push (the module docstring); the dispatcher reads ``depth()`` instead."""

        async def opener(put: Callable[[str], None], fail: Callable[[BaseException], None]) -> Any:
            log.info("SQS pushes no new jobs: the dispatcher learns of them from the queue's counts (--reconcile)")

            async def closer() -> None:
                return None

            return closer

        return Feed(opener)
