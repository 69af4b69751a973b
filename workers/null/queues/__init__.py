"""Queue addresses and the adapter behind each.

A queue is named by one URL (docs/queues.md has the full table):

    nats://[user:pass@]host[:4222][/STREAM][?subject=SUBJECT&consumer=CONSUMER]
        NATS JetStream. STREAM defaults to ``jobs``, SUBJECT to the stream's
        name, CONSUMER (the durable pull consumer every worker shares) to
        ``null``.
    redis://[[user]:pass@]host[:6379][/DB][?stream=STREAM&group=GROUP]
    rediss://...   (the same over TLS)
        Redis 7+ or Valkey Streams. DB defaults to 0, STREAM (the stream's
        key) to ``jobs``, GROUP (the consumer group) to ``null``.
    sqs://QUEUE[?region=REGION&endpoint=URL&dead=DEAD&events=EVENTS]
    sqs://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE[?dead=DEAD&events=EVENTS]
        Amazon SQS (or an SQS-compatible server at ``endpoint``). QUEUE is the
        work queue's name (``.fifo`` for a FIFO queue); DEAD defaults to
        ``QUEUE-dead``, EVENTS to ``QUEUE-events``. Credentials come from the
        AWS chain (environment, profile, instance role), never from the URL.

``open_queue(url)`` returns the adapter, not yet connected; the client
libraries are imported only then, so parsing a URL needs neither.
"""

from __future__ import annotations

from workers.null.queues.address import QueueAddress, SqsAddress, masked, parse_queue_url
from workers.null.queues.base import (
    Claim,
    Depth,
    Feed,
    Job,
    NotOwned,
    Queue,
    QueueError,
    QueueUnavailable,
)

__all__ = [
    "Claim",
    "Depth",
    "Feed",
    "Job",
    "NotOwned",
    "Queue",
    "QueueAddress",
    "QueueError",
    "QueueUnavailable",
    "SqsAddress",
    "masked",
    "open_queue",
    "parse_queue_url",
]


def open_queue(url: str, *, ack_wait: float = 30.0, max_deliver: int = 5, connect_timeout: float = 5.0) -> Queue:
    """The adapter for ``url``, not yet connected (``async with open_queue(url) as queue: ...``).

    ``ack_wait`` is the claim's renewal window in seconds (renew every third of
    it); ``max_deliver`` is the number of attempts a job gets before it is
    dead-lettered; ``connect_timeout`` bounds ``connect()``.
    """
    address = parse_queue_url(url)
    if not ack_wait > 0:
        raise QueueError(f"ack_wait {ack_wait!r} is not a positive number of seconds: use e.g. 30")
    if not isinstance(max_deliver, int) or max_deliver < 1:
        raise QueueError(f"max_deliver {max_deliver!r} is not a whole number >= 1: use e.g. 5")
    if not connect_timeout > 0:
        raise QueueError(f"connect_timeout {connect_timeout!r} is not a positive number of seconds: use e.g. 5")
    if isinstance(address, SqsAddress):
        from workers.null.queues.sqs import SqsQueue

        return SqsQueue(address, ack_wait=ack_wait, max_deliver=max_deliver, connect_timeout=connect_timeout)
    if address.kind == "nats":
        from workers.null.queues.jetstream import JetStreamQueue

        return JetStreamQueue(address, ack_wait=ack_wait, max_deliver=max_deliver, connect_timeout=connect_timeout)
    from workers.null.queues.redis_streams import RedisStreamQueue

    return RedisStreamQueue(address, ack_wait=ack_wait, max_deliver=max_deliver, connect_timeout=connect_timeout)
