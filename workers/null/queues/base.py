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
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

# Job events the consumer publishes on the queue server and the dispatcher
# subscribes to; each carries the job id, its attempt and the session id.
CLAIMED = "claimed"  # the consumer holds the job for this session
STARTED = "started"  # the handler was started
FINISHED = "finished"  # the handler ended; ``outcome`` says how
RELEASED = "released"  # the session was released
EVENT_KINDS = (CLAIMED, STARTED, FINISHED, RELEASED)
# Outcomes of a finished job.
DONE = "done"  # acked
RETRY = "retry"  # handed back for another attempt
DEAD = "dead"  # dead-lettered after max attempts
ABANDONED = "abandoned"  # lease lost or consumer stopping: left to the queue's redelivery
OUTCOMES = (DONE, RETRY, DEAD, ABANDONED)


class QueueError(Exception):
    """A queue the caller cannot use; the message is one line naming the problem and the fix."""


class QueueUnavailable(QueueError):
    """The server does not answer, or the stream or consumer group is missing."""


class NotOwned(QueueError):
    """The claim lapsed and the job went (or may go) to another consumer: do not ack it."""


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


@dataclass(frozen=True)
class JobEvent:
    kind: str
    job_id: str
    attempt: int
    session_id: str
    at: float = field(default_factory=time.time)
    outcome: str | None = None  # FINISHED only
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobEvent:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Claim(abc.ABC):
    """One claimed job, owned by this consumer until acked, handed back, or lapsed."""

    job: Job

    @abc.abstractmethod
    async def keep_alive(self) -> None:
        """Renews the claim for another ``ack_wait``; raises NotOwned when it has lapsed."""

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done, once the server confirmed it; raises NotOwned (and acks nothing) when lapsed."""

    @abc.abstractmethod
    async def retry(self, delay: float) -> None:
        """Hands the job back to be delivered again after ``delay`` seconds."""

    @abc.abstractmethod
    async def give_up(self, reason: str) -> None:
        """Never delivers the job again; it goes to the dead-letter subject or stream."""


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
    async def publish(self, job_id: str, body: bytes) -> None:
        """Enqueues one job; publishing the same ``job_id`` again within the server's window adds nothing."""

    @abc.abstractmethod
    async def claim(self, consumer: str, timeout: float) -> Claim | None:
        """Takes exactly one job, waiting up to ``timeout`` seconds; None when there was none."""

    @abc.abstractmethod
    async def depth(self) -> Depth: ...

    @abc.abstractmethod
    async def publish_event(self, event: JobEvent) -> None: ...

    @abc.abstractmethod
    def events(self) -> AsyncIterator[JobEvent]:
        """Job events as they are published (not replayed); iterate to receive."""

    @abc.abstractmethod
    def new_jobs(self) -> AsyncIterator[str]:
        """The id of each job as it is published, pushed by the server (no polling)."""

    async def __aenter__(self) -> Queue:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
