"""Waiting and stopping in loops that must end when asked."""

from __future__ import annotations

import asyncio

from workers.null.aio import stop_task, wait_any


async def test_stop_task_ends_a_loop_that_swallowed_its_first_cancellation():
    """A loop that lost one cancellation (as asyncio.wait_for before 3.12 can make it) is still stopped."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what a swallowed cancellation looks like to the loop: it carries on

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, every=0.05), 5)
    assert task.cancelled() and swallowed == 1


async def test_wait_any_returns_when_an_event_is_set_or_at_the_timeout():
    """wait_any says whether one of its events was set, and returns at its timeout otherwise."""
    first, second = asyncio.Event(), asyncio.Event()
    assert await wait_any([first, second], 0.01) is False
    asyncio.get_running_loop().call_later(0.01, second.set)
    assert await wait_any([first, second], 5) is True
