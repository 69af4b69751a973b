"""One job's run beside the worker: COMMAND in its own process group, or a Python handler."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib
import inspect
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from workers.null.consumer.options import ConsumerError

log = logging.getLogger("workers.null.consumer")


@dataclass(frozen=True)
class JobContext:
    """What a handler is given: the job and the session it runs for.

    ``id`` is stable across redeliveries: key side effects by it, since a job
    can run more than once (a lost ack reply, a consumer killed after the work).
    """

    id: str
    body: bytes
    attempt: int  # 1 on the first delivery
    session_id: str
    enqueued_at: float | None = None

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding)

    def json(self) -> Any:
        return json.loads(self.body)

    def env(self) -> dict[str, str]:
        """The variables COMMAND gets."""
        return {"NULL_JOB_ID": self.id, "NULL_JOB_ATTEMPT": str(self.attempt), "NULL_SESSION_ID": self.session_id}


@dataclass(frozen=True)
class Result:
    ok: bool
    detail: str  # "exit 0", "exit 3", "killed by signal 9", "ValueError: ..."


class Run:
    """One job being run; ``wait`` gives its Result, ``stop`` ends it early."""

    what = "job"

    async def start(self) -> None:
        raise NotImplementedError

    async def wait(self) -> Result:
        raise NotImplementedError

    async def stop(self, timeout: float) -> None:
        raise NotImplementedError


def _die_with_parent() -> None:
    """In COMMAND's child: SIGKILL when the consumer dies, so no orphan runs beside the next job (Linux)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class CommandRun(Run):
    """COMMAND in its own process group, the body on its stdin."""

    def __init__(self, command: Sequence[str], job: JobContext, base_env: Mapping[str, str] | None = None):
        self.command = list(command)
        self.job = job
        self.env = {**(os.environ if base_env is None else base_env), **job.env()}
        self.proc: asyncio.subprocess.Process | None = None
        self._feeder: asyncio.Task | None = None

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"command pid {self.proc.pid}" if self.proc else "command"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._feeder = asyncio.ensure_future(self._feed())

    async def _feed(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        stdin = self.proc.stdin
        try:
            stdin.write(self.job.body)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command did not read its whole stdin: its choice
        finally:
            with suppress(BrokenPipeError, ConnectionResetError):
                stdin.close()

    async def wait(self) -> Result:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._feeder is not None:
            self._feeder.cancel()
            with suppress(asyncio.CancelledError):
                await self._feeder
        if code == 0:
            return Result(True, "exit 0")
        if code < 0:
            return Result(False, f"killed by signal {-code}")
        return Result(False, f"exit {code}")

    async def stop(self, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
        except asyncio.TimeoutError:
            log.warning(
                "job %s: %s ignored SIGTERM for %.1fs; killing its process group", self.job.id, self.what, timeout
            )
        self._signal_group(signal.SIGKILL)  # whatever it left running in its group, too
        await proc.wait()

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


Handler = Callable[[JobContext], Any]


class HandlerRun(Run):
    """A Python function: async ones run as a task, plain ones in a thread."""

    def __init__(self, handler: Handler, job: JobContext):
        self.handler = handler
        self.job = job
        self.task: asyncio.Future | None = None
        self.threaded = not _is_async(handler)

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"handler {_name_of(self.handler)}"

    async def start(self) -> None:
        if self.threaded:
            loop = asyncio.get_running_loop()
            self.task = asyncio.ensure_future(self._await_result(loop.run_in_executor(None, self.handler, self.job)))
        else:
            self.task = asyncio.ensure_future(self._await_result(self.handler(self.job)))

    @staticmethod
    async def _await_result(pending: Awaitable[Any]) -> Any:
        value = await pending
        while inspect.isawaitable(value):  # a plain function that returned a coroutine
            value = await value
        return value

    async def wait(self) -> Result:
        assert self.task is not None
        try:
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            if self.task.cancelled():
                return Result(False, "cancelled")
            raise
        except Exception as exc:
            log.warning("job %s: handler raised", self.job.id, exc_info=True)
            return Result(False, f"{type(exc).__name__}: {exc}")
        return Result(True, "returned")

    async def stop(self, timeout: float) -> None:
        if self.task is None or self.task.done():
            return
        if self.threaded:
            # A thread cannot be stopped from outside; the job's outcome is
            # decided without it. Run work that must stop as COMMAND instead.
            log.warning(
                "job %s: handler %s runs in a thread and cannot be stopped; leaving it",
                self.job.id,
                _name_of(self.handler),
            )
            return
        self.task.cancel()
        with suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(self.task, timeout)


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return inspect.iscoroutinefunction(fn)
    return inspect.iscoroutinefunction(type(fn).__call__)  # an object with an async __call__


def _name_of(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


RunFactory = Callable[[JobContext], Run]


def command_runs(command: Sequence[str]) -> RunFactory:
    return lambda job: CommandRun(command, job)


def handler_runs(handler: Handler) -> RunFactory:
    return lambda job: HandlerRun(handler, job)


def load_handler(spec: str) -> Handler:
    """``module:function`` (the function may be ``Class.method``-style dotted); raises ConsumerError."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConsumerError(f"--handler {spec!r} is not module:function: give e.g. --handler myjobs:run")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConsumerError(
            f"--handler {spec!r}: cannot import {module_name!r} ({exc}): run from the folder that holds it "
            "or put it on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConsumerError(f"--handler {spec!r}: {module_name!r} has no {attr!r}: name a function it defines")
        target = getattr(target, part)
    if not callable(target):
        raise ConsumerError(f"--handler {spec!r}: {attr!r} is not callable: name a function")
    return target
