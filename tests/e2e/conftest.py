"""Real queue servers for the end-to-end tests: one fresh server per test, on loopback."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from lib.standin.queueservers import ServerMissing, nats_server, valkey_server
from workers.null.queues import Queue, open_queue

_names = itertools.count(1)


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    """``nats://127.0.0.1:PORT`` of a nats-server with JetStream, stopped after the test."""
    async with nats_server() as url:
        yield url


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """``redis://127.0.0.1:PORT/0`` of a valkey-server, stopped after the test."""
    try:
        server = valkey_server()
        url = await server.__aenter__()
    except ServerMissing as exc:
        pytest.skip(f"no valkey-server for this interpreter: {exc}")
    try:
        yield url
    finally:
        await server.__aexit__(None, None, None)


@pytest.fixture(params=["nats", "redis"])
def queue_server(request: pytest.FixtureRequest) -> str:
    """The server URL of each queue kind in turn."""
    return request.getfixturevalue(f"{request.param}_url")


def queue_url_for(server: str, stream: str) -> str:
    """The queue URL naming ``stream`` on ``server`` (a ``nats://`` or ``redis://`` server URL)."""
    if server.startswith("nats://"):
        return f"{server}/{stream}"
    return f"{server}?stream={stream}"


OpenQueue = Callable[..., Awaitable[Queue]]


@pytest.fixture
async def open_test_queue(queue_server: str) -> AsyncIterator[OpenQueue]:
    """Opens connected queues on the test's server (set up unless ``setup=False``), closed after the test."""
    opened: list[Queue] = []
    stream = f"jobs{next(_names)}"

    async def open_(*, ack_wait: float = 1.0, max_deliver: int = 5, setup: bool = True, stream: str = stream) -> Queue:
        queue = open_queue(queue_url_for(queue_server, stream), ack_wait=ack_wait, max_deliver=max_deliver)
        await queue.connect()
        opened.append(queue)
        if setup:
            await queue.setup()
        return queue

    try:
        yield open_
    finally:
        for queue in opened:
            await queue.close()
