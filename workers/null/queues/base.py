"""The few verbs every queue adapter offers; the consumer and the dispatcher use nothing else.

A job's life, and how each step lines up with the worker's session:

    claim       the consumer takes one job (no prefetch)       after /claim returned a session
    keep_alive  renews the queue's claim, every ack_wait / 3    beside /extend naming the session
    ack         done, confirmed by the server                   then /release naming the session
    retry       back to the queue after a delay                 then /release
    give_up     dead-lettered, never delivered again            then /release

A consumer that dies stops renewing: the queue hands the job to another
consumer once ``ack_wait`` has passed, and the worker's lease lapses on its own.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from workers.null.protocol import JobEvent

# The fix named by every "stream or group missing" message.
SETUP_HINT = "run the dispatcher's setup step (python -m workers.null.dispatcher --queue URL setup) to create it"


class QueueError(Exception):
    """A queue the caller cannot use; the message is one line naming the problem and the fix."""


class QueueUnavailable(QueueError):
    """The server does not answer, or the stream or consumer group is missing."""


class NotOwned(QueueError):
    """The claim lapsed and the job went (or may go) to another consumer: do not ack it."""


def describe(exc: BaseException, prefix: str = "") -> str:
    """A client error in one line: its message's first line (less the client's ``prefix``), else its type."""
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix(prefix).splitlines()[0]


def not_connected(what: str, server: str) -> QueueUnavailable:
    return QueueUnavailable(f"cannot {what}: not connected to {server} (call connect() first)")


def server_failed(what: str, server: str, exc: BaseException, prefix: str = "") -> QueueUnavailable:
    return QueueUnavailable(f"cannot {what} on {server}: {describe(exc, prefix)}")


def check_job_id(job_id: str) -> None:
    """A job is published under its own id, which must not be empty."""
    if not job_id:
        raise QueueError("a job needs a non-empty id: pass the id the job is known by")


@dataclass(frozen=True)
class Job:
    id: str  # stable across redeliveries; the publisher's id, unique per job
    body: bytes
    attempt: int  # 1 on the first delivery
    enqueued_at: float | None = None  # wall-clock seconds, when the server tells


@dataclass(frozen=True)
class Depth:
    pending: int  # not delivered to any consumer yet (including handed back for redelivery)
    in_flight: int  # delivered and not yet acked


T = TypeVar("T")


class Feed(Generic[T]):
    """Items the server pushes (job events, new job ids), received from the moment the feed is started.

    ``async for item in feed`` starts it on first use; ``await feed.start()``
    returns once the server holds the subscription, so nothing published after
    it is missed. Not replayed: what was published before the start is never
    seen. ``aclose()`` ends it (and is safe to call twice).
    """

    def __init__(self, opener: Callable[[Callable[[T], None], Callable[[BaseException], None]], Awaitable[Any]]):
        # ``opener(put, fail)`` subscribes, arranges for ``put(item)`` on each
        # item and ``fail(error)`` when the subscription breaks, and returns an
        # async callable that undoes it all.
        self._opener = opener
        self._items: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
        self._closer: Callable[[], Awaitable[None]] | None = None
        self._started = False
        self._closed = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._closer = await self._opener(lambda item: self._items.put_nowait((True, item)), self._fail)

    def _fail(self, error: BaseException) -> None:
        self._items.put_nowait((False, error))

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        ok, item = await self._items.get()
        if not ok:
            await self.aclose()
            raise item
        return item

    async def aclose(self) -> None:
        self._closed = True
        closer, self._closer = self._closer, None
        if closer is not None:
            with suppress(Exception):
                await closer()

    async def __aenter__(self) -> Feed[T]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


class Claim(abc.ABC):
    """One claimed job, owned by this consumer until acked, handed back, or lapsed.

    The claim lapses when ``ack_wait`` passes without a confirmed renewal; from
    then on every verb raises NotOwned and changes nothing on the server,
    because the job may already be running elsewhere. A verb the server did not
    confirm raises QueueUnavailable; the claim then still holds until its last
    renewal's window ends.
    """

    job: Job

    @abc.abstractmethod
    async def keep_alive(self) -> None:
        """Renews the claim for another ``ack_wait``; raises NotOwned when it has lapsed."""

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done, once the server confirmed it; raises NotOwned (and acks nothing) when lapsed."""

    @abc.abstractmethod
    async def retry(self, delay: float) -> None:
        """Hands the job back to be delivered again after ``delay`` seconds; raises NotOwned when lapsed."""

    @abc.abstractmethod
    async def give_up(self, reason: str) -> None:
        """Never delivers the job again; it goes to the dead-letter stream. Raises NotOwned when lapsed."""

    @property
    @abc.abstractmethod
    def owned(self) -> bool:
        """True while the claim is surely held: not settled, and renewed within ``ack_wait``.

        False does not always mean taken: on Redis the next verb asks the server.
        """


class Queue(abc.ABC):
    """A connection to one job queue; ``ack_wait`` is the claim's renewal window in seconds."""

    ack_wait: float
    max_deliver: int

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connects; raises QueueUnavailable naming the address when it cannot."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def setup(self) -> None:
        """Creates the stream and its durable consumer (or group) when missing, with ack_wait and max_deliver."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raises QueueUnavailable when the stream or the consumer (group) is missing."""

    @abc.abstractmethod
    async def publish(self, job_id: str, body: bytes) -> bool:
        """Enqueues one job; False when ``job_id`` was already published within the server's window (nothing added)."""

    @abc.abstractmethod
    async def claim(self, consumer: str, timeout: float) -> Claim | None:
        """Takes exactly one job, waiting up to ``timeout`` seconds; None when there was none."""

    @abc.abstractmethod
    async def depth(self) -> Depth: ...

    async def dead_letters(self) -> list[Job]:
        """The dead-lettered jobs, oldest first; ``attempt`` is the delivery that was given up."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its dead letters")

    @abc.abstractmethod
    async def publish_event(self, event: JobEvent) -> None: ...

    @abc.abstractmethod
    def events(self) -> Feed[JobEvent]:
        """Job events as they are published (not replayed); iterate to receive."""

    @abc.abstractmethod
    def new_jobs(self) -> Feed[str]:
        """The id of each job as it is published, pushed by the server (no polling).

        A duplicate publish may repeat an id; jobs published while no one
        listened are not replayed (read ``depth()`` at start).
        """

    async def __aenter__(self) -> Queue:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
