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
