"""Waiting on events in loops that must stop when cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def wait_any(events: Iterable[asyncio.Event], timeout: float | None) -> bool:
    """Returns when one of ``events`` is set or ``timeout`` passes; True when one was set.

    Not ``wait_for``: before Python 3.12 it can swallow a cancellation that
    arrives as the event is set, and these loops must stop when cancelled.
    """
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(
            waiters, timeout=None if timeout is None else max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)


async def stop_task(task: asyncio.Future, *, every: float = 0.5) -> None:
    """Cancels ``task`` and waits until it has ended, cancelling again while it runs on.

    Before Python 3.12, ``asyncio.wait_for`` (which client libraries use
    inside every request) swallows a cancellation that arrives as its inner
    future completes, so one ``cancel()`` may leave a loop running forever.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    if not task.cancelled():
        task.exception()  # retrieved: a loop that failed as it stopped is not logged as unhandled
