"""Running the consumer from Python: ``run_consumer(queue, handler)``, and ``serve`` under the command line."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Sequence
from typing import Any

from workers.null.consumer.loop import Consumer
from workers.null.consumer.options import (
    DEFAULT_HEALTH_PORT,
    ConsumerError,
    ConsumerOptions,
    control_port_from_env,
    default_name,
)
from workers.null.consumer.runs import Handler, RunFactory, command_runs, handler_runs
from workers.null.queues import masked, open_queue
from workers.null.queues.base import Queue, QueueError


def open_consumer_queue(url: str, ack_wait: float | None, max_attempts: int) -> Queue:
    """The queue at ``url``, not yet connected; raises ConsumerError naming the problem."""
    kwargs: dict[str, Any] = {"max_deliver": max_attempts}
    if ack_wait is not None:
        kwargs["ack_wait"] = ack_wait
    try:
        return open_queue(url, **kwargs)
    except QueueError as exc:
        raise ConsumerError(str(exc)) from None


async def serve(queue: Queue, runs: RunFactory, options: ConsumerOptions, *, label: str = "") -> int:
    """Runs the consumer until SIGTERM or SIGINT (a second one: no grace); 0 when it stopped cleanly."""
    consumer = Consumer(queue, runs, options, label=label)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, consumer.stop)
    try:
        await consumer.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def run_consumer(
    queue: str,
    handler: Handler | None = None,
    *,
    command: Sequence[str] | None = None,
    claim_timeout: float = ConsumerOptions.claim_timeout,
    retry_delay: float = ConsumerOptions.retry_delay,
    max_attempts: int = ConsumerOptions.max_attempts,
    ack_wait: float | None = None,
    grace: float = ConsumerOptions.grace,
    control_port: int | None = None,
    health_port: int | None = DEFAULT_HEALTH_PORT,
    name: str | None = None,
) -> int:
    """Consumes jobs from the queue at ``queue`` until SIGTERM or Ctrl-C; returns the exit code.

    Exactly one of ``handler`` (called with a JobContext, sync or async; it
    succeeds by returning and fails by raising) and ``command`` (argv; the
    body on stdin, exit 0 is success) says how a job runs. Raises
    ConsumerError, naming the problem, on bad input.
    """
    if (handler is None) == (command is None):
        raise ConsumerError("give exactly one of a handler and a command")
    if command is not None:
        command = list(command)
        check_command(command)
    options = ConsumerOptions(
        claim_timeout=claim_timeout,
        retry_delay=retry_delay,
        max_attempts=max_attempts,
        ack_wait=ack_wait,
        grace=grace,
        control_port=control_port_from_env(os.environ) if control_port is None else control_port,
        health_port=health_port,
        name=name or default_name(),
    )
    problems = options.problems()
    if problems:
        raise ConsumerError(problems[0])
    q = open_consumer_queue(queue, ack_wait, max_attempts)
    runs = handler_runs(handler) if handler is not None else command_runs(command or [])
    return asyncio.run(serve(q, runs, options, label=masked(queue)))


def check_command(command: Sequence[str]) -> None:
    if not command:
        raise ConsumerError("no COMMAND: give one after --, e.g. -- python job.py, or pass --handler module:function")
    if shutil.which(command[0]) is None:
        raise ConsumerError(f"COMMAND {command[0]!r} is not an executable file or on PATH: give its path or install it")
