"""Helpers for tests that run the local stand-in with real worker processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import fields
from typing import Any

from lib.standin.autoscaler import LocalConfig, LocalServerless
from lib.standin.fleet import Fleet, FleetSettings
from lib.standin.process import REPO_ROOT, with_repo_on_path
from lib.standin.scaling import EndpointParams, LocalPolicy
from workers.null import sdk

# Short enough for a test, long enough that every phase is visible.
FAST = dict(provisioning_delay=0.2, stop_grace=6.0, load_timeout=45.0)
FAST_PARAMS = dict(target_util=1.0, target_queue_time=0.2, max_queue_time=1.0, inactivity_timeout=2.0)
FAST_POLICY = dict(scale_down_delay=0.5)


def fast_config(**overrides: Any) -> LocalConfig:
    """A stand-in config on a free port with short delays; keyword names as in the dataclasses."""
    param_names = {f.name for f in fields(EndpointParams)}
    policy_names = {f.name for f in fields(LocalPolicy)}
    params = {**FAST_PARAMS, **{k: v for k, v in overrides.items() if k in param_names}}
    policy = {**FAST_POLICY, **{k: v for k, v in overrides.items() if k in policy_names}}
    rest = {k: v for k, v in overrides.items() if k not in param_names | policy_names}
    settings = FleetSettings(params=EndpointParams(**params), policy=LocalPolicy(**policy), **{**FAST, **rest})
    return LocalConfig(fleet=settings, port=0)


def sdk_client(standin: LocalServerless):
    return sdk.make_client(standin.config.api_key, "local", standin.url, max_poll_interval=1.0)


def explain(fleet: Fleet) -> str:
    """The fleet line and each worker's last output, for assertion messages."""
    parts = [fleet.summary(), f"created: {fleet.created}"]
    for inst in fleet.instances.values():
        if inst.process is not None:
            parts.append(f"--- worker {inst.id} ({inst.phase.value}) output:\n{inst.process.tail(15)}")
    return "\n".join(parts)


async def wait_fleet(fleet: Fleet, predicate: Callable[[Fleet], Any], timeout: float, what: str) -> Any:
    try:
        return await fleet.wait_for(predicate, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{explain(fleet)}") from None


class CommandRun:
    """A ``python -m ...`` child whose output lines are collected as they arrive."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.args = args
        self.env = env
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._arrived = asyncio.Event()

    async def start(self) -> CommandRun:
        env = dict(os.environ if self.env is None else self.env)
        with_repo_on_path(env)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.args,
            cwd=str(REPO_ROOT),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own group, so the test's SIGINT reaches it alone, as a
            # terminal's Ctrl-C would reach the foreground command.
            start_new_session=True,
        )
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._arrived.set()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def matches(self, pattern: str) -> list[re.Match[str]]:
        return [m for m in (re.search(pattern, line) for line in self.lines) if m]

    async def wait_for_line(self, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
        """Waits until ``count`` output lines match ``pattern``; fails with the output's tail."""
        deadline = time.monotonic() + timeout
        while len(self.matches(pattern)) < count:
            left = deadline - time.monotonic()
            if left <= 0 or (
                self.proc is not None and self.proc.returncode is not None and self._reader and self._reader.done()
            ):
                raise AssertionError(
                    f"no {count} line(s) matching {pattern!r} within {timeout}s; output:\n{self.tail()}"
                )
            self._arrived.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.5))
        return self.matches(pattern)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        with suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"still running {timeout}s later; output:\n{self.tail()}") from None
        if self._reader is not None:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reader, 2.0)
        return code

    async def cleanup(self) -> None:
        """SIGTERM, then SIGKILL to the whole group; for ``finally``."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10.0)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.returncode is None:
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with suppress(asyncio.CancelledError):
                await self._reader


def process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")
