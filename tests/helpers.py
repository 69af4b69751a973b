"""What the tests share: the worker in-process and as a real process, and talking to either.

- ``DESK_URL``, ``DESK_ENV``, ``public_app(desk)``: the in-process worker (the
  ``desk`` fixture) and its public routes as the framework serves them.
- ``post``, ``open_session``, ``open_desk_session``, ``status_of``: requests and
  their answers as ``(status, json)``.
- ``callbacks_for``, ``deleted_entries``: what the recording autoscaler was sent.
- ``wait_until``: polls a condition against a deadline, for state nothing
  records an event for.
- ``side_by_side``: runs the same check on several rigs at once (both queue
  kinds, both consumer examples), each failure named.
- ``running_worker``, ``RunningWorker``: a real worker process against the
  recording autoscaler, stopped on the way out.
- ``FakeConsumer``: a consumer's health endpoint that can be made to die.
- ``summary_of``, ``children_of``: a run's summary line, and the processes a
  command started.

Child processes of any other kind are ``lib.standin.process.ChildProcess``.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import itertools
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lib.standin.grants import GrantSigner
from lib.standin.process import ChildProcess, WorkerPorts, WorkerProcess, worker_env
from lib.standin.recorder import Received, RecordingAutoscaler, is_ready

# -- the in-process worker -------------------------------------------------------------

# Its URL, for grants, and the platform environment the framework's Backend reads.
DESK_URL = "http://127.0.0.1:3999"
DESK_ENV = {
    "WORKER_PORT": "3999",
    "VAST_TCP_PORT_3999": "3999",
    "PUBLIC_IPADDR": "127.0.0.1",
    "CONTAINER_ID": "7",
    "REPORT_ADDR": "http://127.0.0.1:9",
    "NULL_MAX_LIFETIME": "600",
}


def create_body(grant: dict[str, Any], **payload: Any) -> dict[str, Any]:
    """A /session/create body for ``grant``: a 60 s lifetime unless ``payload`` says otherwise."""
    return {"auth_data": grant, "payload": {"lifetime": 60, **payload}}


def public_app(desk: Any) -> web.Application:
    """The framework's public app as ``start_server_async`` builds it, with the null worker's handlers."""
    backend = desk.backend
    app = web.Application(client_max_size=0)
    # What install() puts in place of the framework's /ping.
    app.router.add_post("/ping", backend.lifecycle.routes.ping)
    app.router.add_post("/session/create", backend.session_create_handler)
    app.router.add_post("/session/end", backend.session_end_handler)
    app.router.add_post("/session/get", backend.session_get_handler)
    app.router.add_post("/session/health", backend.session_health_handler)
    app.router.add_post("/pyworker/update", backend.pyworker_update_handler)
    return app


# -- requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """Raw body bytes sent with a Content-Encoding header."""

    data: bytes
    encoding: str


Body = bytes | Encoded | dict[str, Any] | list[Any]


async def post(http: Any, url: str, body: Body | None = None) -> tuple[int, Any]:
    """POSTs a JSON value or raw bytes; returns (status, the JSON answer).

    ``http`` is an ``aiohttp.ClientSession`` (``url`` absolute) or a test
    client (``url`` a path). Every route answers JSON, refusals included, so
    an answer that is not JSON (by its content type and its text) fails the
    test with its status and text.
    """
    if isinstance(body, (bytes, bytearray)):
        request = http.post(url, data=bytes(body), headers={"Content-Type": "application/json"})
    elif isinstance(body, Encoded):
        headers = {"Content-Type": "application/json", "Content-Encoding": body.encoding}
        request = http.post(url, data=body.data, headers=headers)
    elif body is None:
        request = http.post(url)
    else:
        request = http.post(url, json=body)
    async with request as resp:
        text = await resp.text()
        problem = f"{url} answered {resp.status} {resp.content_type} that is not JSON: {text[:300]!r}"
        assert resp.content_type == "application/json", problem
        try:
            return resp.status, json.loads(text)
        except ValueError:
            raise AssertionError(problem) from None


async def open_session(http: aiohttp.ClientSession, worker: RunningWorker, body: dict[str, Any] | None = None) -> str:
    """Opens a session on a real worker (``body`` defaults to a fresh grant with a callback); its id."""
    status, answer = await post(http, worker.url + "/session/create", body or worker.create_body())
    assert status == 201, f"create answered {status} {answer}; {worker.explain()}"
    return answer["session_id"]


async def open_desk_session(
    public: Any, signer: GrantSigner, lifetime: float = 60, **payload: Any
) -> tuple[str, dict[str, Any]]:
    """Opens a session on the in-process worker through its public test client; (its id, the grant)."""
    grant = signer.grant(DESK_URL)
    status, answer = await post(
        public, "/session/create", {"auth_data": grant, "payload": {"lifetime": lifetime, **payload}}
    )
    assert status == 201, (status, answer)
    return answer["session_id"], grant


async def status_of(http: aiohttp.ClientSession, worker: RunningWorker) -> dict[str, Any]:
    """The worker's control /status."""
    async with http.get(worker.control + "/status") as resp:
        assert resp.status == 200, worker.explain()
        return await resp.json()


# -- what the autoscaler was sent ----------------------------------------------------------


def callbacks_for(autoscaler: RecordingAutoscaler, session_id: str) -> list[Received]:
    """The on-close callbacks that name ``session_id``."""
    return [c for c in autoscaler.callbacks if c.body.get("session_id") == session_id]


def deleted_entries(autoscaler: RecordingAutoscaler, request_idx: int) -> list[dict[str, Any]]:
    """The /delete_requests/ entries for ``request_idx``, across every report."""
    return [r for d in autoscaler.deleted for r in d.body["requests"] if r["request_idx"] == request_idx]


# -- waiting --------------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, explain: Callable[[], str] | None = None
) -> Any:
    """Polls ``condition`` until it is truthy and returns its value (for state nothing records an event for).

    On timeout the failure names ``what``, followed by ``explain()`` if given.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        await asyncio.sleep(0.05)


async def side_by_side(runs: dict[str, Awaitable[Any]]) -> None:
    """Awaits every run at once, each to its end; then raises one AssertionError naming each run that failed.

    For checks that mostly wait on leases and timeouts, done on independent
    rigs: together they take about as long as the slowest alone. The first
    failure's own traceback is chained.
    """
    names = list(runs)
    results = await asyncio.gather(*runs.values(), return_exceptions=True)
    failed = [(name, r) for name, r in zip(names, results, strict=True) if isinstance(r, BaseException)]
    for _, exc in failed:
        if not isinstance(exc, Exception):
            raise exc  # a cancellation or an interrupt, not a failure
    if failed:
        described = "\n\n".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failed)
        raise AssertionError(described) from failed[0][1]


# -- a real worker process -----------------------------------------------------------------

_container_ids = itertools.count(1001)


@dataclass
class RunningWorker:
    """A real worker process, the ports it serves and the autoscaler it reports to."""

    process: WorkerProcess
    ports: WorkerPorts
    container_id: int
    autoscaler: RecordingAutoscaler
    started_at: float

    @property
    def url(self) -> str:
        return self.ports.url

    @property
    def control(self) -> str:
        return self.ports.control_url

    def grant(self, **kwargs: Any) -> dict[str, Any]:
        return self.autoscaler.grant(self.url, **kwargs)

    def create_body(
        self, lifetime: float = 60, on_close: bool = True, job: str = "job-1", **grant_kwargs: Any
    ) -> dict[str, Any]:
        """A /session/create body with a fresh grant; with ``on_close``, a callback naming ``job``."""
        return {
            "auth_data": self.grant(**grant_kwargs),
            "payload": {
                "lifetime": lifetime,
                "on_close_route": self.autoscaler.on_close_url if on_close else None,
                "on_close_payload": {"job": job} if on_close else None,
            },
        }

    def reports(self, since: float = 0.0) -> list[dict[str, Any]]:
        return self.autoscaler.reports_for(self.container_id, since)

    async def wait_report(
        self, predicate: Callable[[dict[str, Any]], bool], since: float = 0.0, timeout: float = 15.0, message: str = ""
    ) -> Received:
        return await self.autoscaler.wait_for(
            lambda: self.autoscaler.first_report(self.container_id, predicate, since),
            timeout,
            f"{message or 'a report'} from worker {self.container_id}; its output:\n{self.process.tail()}",
        )

    async def wait_ready(self, timeout: float = 30.0) -> Received:
        return await self.wait_report(is_ready, timeout=timeout, message="the ready report")

    def explain(self) -> str:
        return f"worker output:\n{self.process.tail()}"


StartWorker = Callable[..., Awaitable[RunningWorker]]


@asynccontextmanager
async def running_worker(
    autoscaler: RecordingAutoscaler,
    root: Path,
    env: dict[str, str] | None = None,
    *,
    ready: bool = True,
    report_addr: str | None = None,
    files: dict[str, str] | None = None,
    container_id: int | None = None,
) -> AsyncIterator[RunningWorker]:
    """A real ``python -m workers.null.worker`` in ``root/worker-<id>``, reporting to ``autoscaler``.

    ``env`` is added to the platform's variables; ``files`` (name -> text) are
    written into the worker's directory before it starts; ``ready`` waits for
    its ready report. Stopped (SIGTERM, then SIGKILL) on the way out.
    """
    ports = WorkerPorts.allocate()
    container_id = next(_container_ids) if container_id is None else container_id
    cwd = root / f"worker-{container_id}"
    for name, text in (files or {}).items():
        cwd.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(text)
    process = WorkerProcess(
        env=worker_env(ports=ports, container_id=container_id, report_addr=report_addr or autoscaler.url, extra=env),
        cwd=cwd,
    )
    started_at = time.time()
    try:
        await process.start()
        worker = RunningWorker(process, ports, container_id, autoscaler, started_at)
        if ready:
            await worker.wait_ready()
        yield worker
    finally:
        await process.stop()


# -- a consumer ------------------------------------------------------------------------------


@dataclass
class FakeConsumer:
    """A consumer's health endpoint that can be made to die; serve its ``app()`` with ``serving``."""

    healthy: bool = True
    checks: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        self.checks += 1
        return web.Response(status=200 if self.healthy else 503)


def parse_module(path: Path) -> ast.Module:
    """The syntax tree of a Python file, parsed with the garbage collector held off.

    On CPython 3.11 a finaliser that the collector runs in the middle of
    ``ast.parse`` can make it fail with "AST constructor recursion depth
    mismatch" (python/cpython#106905), whatever the file holds.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(), filename=str(path))
    finally:
        if enabled:
            gc.enable()


def usage_refused(capsys: Any, main: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Runs a command's ``main``, which must raise SystemExit(2) having printed one line to stderr; that line.

    ``capsys`` is pytest's fixture; the stdout it caught is read and dropped.
    """
    try:
        main(*args, **kwargs)
    except SystemExit as stopped:
        code = stopped.code
    else:
        raise AssertionError(f"main{args!r} returned instead of exiting")
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.rstrip("\n")


# -- commands' output ---------------------------------------------------------------------

SUMMARY = re.compile(r"^(\d+) of (\d+) jobs done, (\d+) failed, (\d+) lost, (\d+) run twice$")


def summary_of(run: ChildProcess) -> tuple[int, ...]:
    found = run.matches(SUMMARY.pattern)
    assert found, f"no summary line; output:\n{run.tail()}"
    return tuple(int(x) for x in found[-1].groups())


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (by /proc parent links)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                found.append(child)
                frontier.append(child)
    return found
