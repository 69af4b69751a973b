"""Real queue servers for the end-to-end tests: fresh servers for each test, on loopback."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from lib.standin.queueservers import ServerMissing, nats_server, valkey_server
from workers.null.queues import Queue, open_queue

_names = itertools.count(1)


QUEUE_KINDS = ("nats", "redis")


@asynccontextmanager
async def queue_server(kind: str) -> AsyncIterator[str]:
    """A fresh server of ``kind``: ``nats://127.0.0.1:PORT`` (JetStream on) or ``redis://127.0.0.1:PORT/0``."""
    async with nats_server() if kind == "nats" else valkey_server() as url:
        yield url


def queue_url_for(server: str, stream: str, *, group: str | None = None) -> str:
    """The queue URL naming ``stream`` on ``server`` (a ``nats://`` or ``redis://`` server URL).

    ``group``: the Redis consumer group to name (NATS URLs name none).
    """
    if server.startswith("nats://"):
        return f"{server}/{stream}"
    return f"{server}?stream={stream}" + (f"&group={group}" if group is not None else "")


OpenQueue = Callable[..., Awaitable[Queue]]


@pytest.fixture
async def open_test_queues() -> AsyncIterator[dict[str, OpenQueue]]:
    """For each queue kind, a server started for this test and a function opening connected queues on it.

    Each function opens a queue on one stream of its own (set up unless
    ``setup=False``); every queue is closed and every server stopped after
    the test. A kind whose server is not installed for this interpreter is
    left out (``on_each_server`` then reports the test as skipped for it).
    """
    opened: list[Queue] = []
    stream = f"jobs{next(_names)}"

    def opener(server: str) -> OpenQueue:
        async def open_(
            *, ack_wait: float = 1.0, max_deliver: int = 5, setup: bool = True, stream: str = stream
        ) -> Queue:
            queue = open_queue(queue_url_for(server, stream), ack_wait=ack_wait, max_deliver=max_deliver)
            await queue.connect()
            opened.append(queue)
            if setup:
                await queue.setup()
            return queue

        return open_

    async with AsyncExitStack() as stack:
        opens: dict[str, OpenQueue] = {}
        for kind in QUEUE_KINDS:
            try:
                opens[kind] = opener(await stack.enter_async_context(queue_server(kind)))
            except ServerMissing:
                if kind == "nats":
                    raise
                continue  # no valkey-server for this interpreter
        try:
            yield opens
        finally:
            for queue in opened:
                await queue.close()
