"""Run the shipped null worker as a child process on free loopback ports.

Used by the local stand-in for its instances and by the tests; both run the
real ``python -m workers.null.worker``, never a copy.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out on ``host``; the caller binds it next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
        ports: list[int] = []
        while len(ports) < 3:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return cls(*ports)

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


@dataclass
class WorkerProcess:
    """One ``python -m workers.null.worker`` child (or ``module``, or any ``argv``), its output kept for diagnosis.

    It leads a process group of its own, or joins ``process_group`` (a
    consumer beside its worker, so one killpg ends both). ``output`` may be
    shared with another process's, each line then starting with ``prefix``.
    """

    env: dict[str, str]
    cwd: Path
    python: str = sys.executable
    module: str = "workers.null.worker"
    argv: tuple[str, ...] | None = None
    process_group: int | None = None
    tail_lines: int = 200
    output: collections.deque[str] | None = None
    prefix: str = ""
    proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task | None = None

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = collections.deque(maxlen=self.tail_lines)

    async def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        argv = self.argv if self.argv is not None else (self.python, "-m", self.module)
        group = self.process_group

        def in_child() -> None:
            # A group of its own (0) or its worker's: a Ctrl-C at the
            # terminal reaches the parent only, which then stops its
            # workers in order. Not a new session, or a consumer could not
            # join its worker's group.
            os.setpgid(0, 0 if group is None else group)
            _stop_with_parent()

        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(self.cwd),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=in_child,
        )
        self._reader = asyncio.ensure_future(self._read_output())

    async def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self.output is not None
        async for raw in self.proc.stdout:
            self.output.append(self.prefix + raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.output or ())[-n:])

    def send_signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            with suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 1.0)
        return code

    async def stop(self, grace: float = 8.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.proc is None:
            return None
        if self.running:
            self.send_signal(signal.SIGTERM)
            try:
                return await self.wait(grace)
            except asyncio.TimeoutError:
                self.kill()
        return await self.wait(grace)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
