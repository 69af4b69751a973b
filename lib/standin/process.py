"""Child processes: the shipped null worker on free loopback ports, and any other command.

Used by the local stand-in for its instances and by the tests; both run the
real ``python -m workers.null.worker``, never a copy. ``ChildProcess`` runs
any command the same way (the tests' clients, consumers and scripts).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A free port on ``host``, kept from every other request for a free port until its caller binds it.

    A port that is only bound and closed again goes back to the kernel, which
    may hand it to the next ``bind(host, 0)`` anywhere on the machine before
    the process it is meant for binds it; the later of the two then fails.
    Here the port ends a connection of its own instead, and its side waits
    in TIME_WAIT for a minute: the kernel gives it to no bind on port 0 in
    that time, while a server binding it with SO_REUSEADDR, as aiohttp,
    nats-server and Redis do, takes it at once.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(1)
        address = listener.getsockname()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.connect(address)
            accepted, _ = listener.accept()
            accepted.close()  # this side closes first, so the TIME_WAIT is on the port
        return address[1]


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the parent dies, even by SIGKILL (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own cleanup has to do


_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerPorts:
    worker: int
    http: int
    control: int

    @classmethod
    def allocate(cls) -> WorkerPorts:
        return cls(free_port(), free_port(), free_port())  # three different ports: each is kept from the next

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.worker}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control}"


def worker_env(
    *,
    ports: WorkerPorts,
    container_id: int,
    report_addr: str,
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment Vast gives a worker, pointed at loopback."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "WORKER_PORT": str(ports.worker),
            "WORKER_HTTP_PORT": str(ports.http),
            f"VAST_TCP_PORT_{ports.worker}": str(ports.worker),
            "PUBLIC_IPADDR": "127.0.0.1",
            "CONTAINER_ID": str(container_id),
            "REPORT_ADDR": report_addr,
            "USE_SSL": "false",
            "NULL_CONTROL_PORT": str(ports.control),
            "PYTHONUNBUFFERED": "1",
        }
    )
    with_repo_on_path(env)
    env.update(extra or {})
    return env


def with_repo_on_path(env: dict[str, str]) -> dict[str, str]:
    """Puts this checkout first on ``env``'s PYTHONPATH, so ``python -m`` finds its modules from any cwd."""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def python_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default this process's) for a ``python`` child: this checkout on its path, output unbuffered."""
    full = with_repo_on_path(dict(os.environ if env is None else env))
    full["PYTHONUNBUFFERED"] = "1"
    return full


class LineNotSeen(AssertionError):
    """No output line matched in time, or the process ended first; the message carries the output's tail."""


class ChildTimeout(asyncio.TimeoutError):
    """The process was still running at the deadline; the message carries the output's tail."""


class ChildProcess:
    """One child process, its output lines kept as they arrive, for diagnosis and for waiting on.

    It leads a process group of its own, so a Ctrl-C at the terminal reaches
    the parent only, which then stops its children in order; or it joins
    ``process_group`` (a consumer beside its worker, so one killpg ends
    both). It gets SIGTERM if the parent dies (Linux). stdout and stderr are
    read as one stream into ``output`` unless ``separate_stderr``, which puts
    stderr in ``errors``; ``output`` may be shared with another process's,
    each line then starting with ``prefix``. ``tail_lines`` bounds what is
    kept (None keeps everything). With ``kill_group`` (and a group of its
    own), ``stop`` ends with SIGKILL to whatever is left in the group.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        tail_lines: int | None = 200,
        separate_stderr: bool = False,
        process_group: int | None = None,
        output: collections.deque[str] | None = None,
        prefix: str = "",
        kill_group: bool = True,
    ):
        self.argv = list(argv)
        self.env = None if env is None else dict(env)
        self.cwd = None if cwd is None else Path(cwd)
        self.tail_lines = tail_lines
        self.separate_stderr = separate_stderr
        self.process_group = process_group
        self.prefix = prefix
        self.kill_group = kill_group and process_group is None
        self.proc: asyncio.subprocess.Process | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=tail_lines) if output is None else output
        self.errors: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._readers: list[asyncio.Task] = []
        self._arrived: asyncio.Event | None = None

    @classmethod
    def python(
        cls, *args: str, env: Mapping[str, str] | None = None, cwd: Path | str | None = REPO_ROOT, **options: Any
    ) -> ChildProcess:
        """``python *args`` with this checkout on its path and unbuffered output."""
        return cls([sys.executable, *args], env=python_env(env), cwd=cwd, **options)

    @property
    def name(self) -> str:
        return " ".join(self.argv)

    async def start(self) -> ChildProcess:
        self._arrived = asyncio.Event()
        group = self.process_group

        def in_child() -> None:
            # A group of its own (0) or the one it joins. Not a new session:
            # a consumer could not join its worker's group across sessions.
            os.setpgid(0, 0 if group is None else group)
            _stop_with_parent()

        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=None if self.cwd is None else str(self.cwd),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if self.separate_stderr else asyncio.subprocess.STDOUT,
            preexec_fn=in_child,
        )
        assert self.proc.stdout is not None
        self._readers = [asyncio.ensure_future(self._read(self.proc.stdout, self.output))]
        if self.proc.stderr is not None:
            self._readers.append(asyncio.ensure_future(self._read(self.proc.stderr, self.errors)))
        return self

    async def _read(self, stream: asyncio.StreamReader, into: collections.deque[str]) -> None:
        assert self._arrived is not None
        # In chunks rather than by line: a line longer than the stream's
        # limit must not stop the reading.
        pending = b""
        while chunk := await stream.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                into.append(self.prefix + raw.decode(errors="replace"))
            if lines:
                self._arrived.set()
        if pending:
            into.append(self.prefix + pending.decode(errors="replace"))
        self._arrived.set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def lines(self) -> list[str]:
        return list(self.output)

    @property
    def text(self) -> str:
        """Every kept output line, as one string."""
        return "\n".join(self.output)

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.output)[-n:])

    def matches(self, pattern: str) -> list[re.Match[str]]:
        return [m for m in (re.search(pattern, line) for line in list(self.output)) if m]

    async def wait_for_line(self, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
        """Waits until ``count`` output lines match ``pattern``; raises LineNotSeen with the tail."""
        assert self._arrived is not None, "start() first"
        deadline = time.monotonic() + timeout
        while len(self.matches(pattern)) < count:
            left = deadline - time.monotonic()
            if left <= 0 or self._finished():
                ended = "" if left <= 0 else f"; it exited with code {self.returncode}"
                raise LineNotSeen(
                    f"no {count} line(s) matching {pattern!r} within {timeout}s from {self.name}{ended}; "
                    f"output:\n{self.tail()}"
                )
            self._arrived.clear()
            # Woken by each new line; the bound also notices an exit that
            # is only recorded after the output has ended.
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.5))
        return self.matches(pattern)

    def _finished(self) -> bool:
        return not self.running and all(reader.done() for reader in self._readers)

    def send_signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def killpg(self) -> None:
        """SIGKILL to the process group it leads: itself and whatever it started there."""
        assert self.proc is not None
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def wait(self, timeout: float | None = None, drain: float = 2.0) -> int:
        """The exit code, once the output is read to its end; raises ChildTimeout with the tail.

        ``drain`` bounds the wait for the end of the output after the exit
        (a grandchild such as ``tee`` may still be writing it).
        """
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            raise ChildTimeout(f"{self.name} still running {timeout}s later; output:\n{self.tail()}") from None
        await self._drain(drain)
        return code

    async def _drain(self, timeout: float) -> None:
        """Lets the readers reach the end of the output (a grandchild may hold it open: then stop reading)."""
        if not self._readers:
            return
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._readers, return_exceptions=True), timeout)
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def stop(self, grace: float = 8.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (and to its group, see ``kill_group``).

        For ``finally``: returns the exit code (None if it never started).
        """
        if self.proc is None:
            return None
        if self.running:
            self.send_signal(signal.SIGTERM)
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)
        if self.running and self.kill_group:
            self.killpg()
        elif self.running:
            self.kill()
        code = await self.proc.wait()
        if self.kill_group:
            self.killpg()  # what it started and left behind
        await self._drain(1.0)
        return code

    async def __aenter__(self) -> ChildProcess:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class WorkerProcess(ChildProcess):
    """One ``python -m workers.null.worker`` child (or ``module``, or any ``argv``), its output kept for diagnosis.

    ``stop`` signals it alone: a consumer in its group is stopped on its own.
    """

    def __init__(
        self,
        env: dict[str, str],
        cwd: Path,
        python: str = sys.executable,
        module: str = "workers.null.worker",
        argv: Sequence[str] | None = None,
        process_group: int | None = None,
        tail_lines: int = 200,
        output: collections.deque[str] | None = None,
        prefix: str = "",
    ):
        super().__init__(
            (python, "-m", module) if argv is None else argv,
            env=env,
            cwd=cwd,
            tail_lines=tail_lines,
            process_group=process_group,
            output=output,
            prefix=prefix,
            kill_group=False,
        )
        self.python = python
        self.module = module

    async def start(self) -> WorkerProcess:
        assert self.cwd is not None
        self.cwd.mkdir(parents=True, exist_ok=True)
        await super().start()
        return self
