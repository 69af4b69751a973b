"""Open, hold and close null-worker sessions through the ``vastai`` SDK: a dispatcher in one command.

``python -m workers.null.client --instance local --count 3`` opens three
sessions one second apart, holds each for a few seconds and closes each with
``/session/end``. With ``--instance local`` and nothing answering on
127.0.0.1:8080 it runs the local stand-in (``lib.standin.autoscaler``) in-process,
waits for it to scale back to zero, and stops it.

A hold longer than the lifetime is kept alive with the SDK's
``session.request("/ping", {})`` every lifetime/3 seconds, which the null
worker answers by renewing the lease to now + lifetime. The lifetime stays
short on purpose: should this client die, the worker frees itself within one
lifetime instead of after the whole hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import math
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger("workers.null.client")  # also when run as __main__

INSTANCES = ("prod", "alpha", "candidate", "local")
DEFAULT_ENDPOINT = "null-pyworker"  # lib.standin.autoscaler serves this name by default
LOCAL_API_KEY = "local"  # the stand-in's default key; nothing checks it but /route/
DEFAULT_LOCAL_PORT = 8080  # where the SDK's instance="local" looks for the autoscaler
KEEPALIVE_TIMEOUT = 10.0
CREATE_ROUTE = "/session/create"
# While one of these, a session's create has not reached a worker: cancelling it leaves nothing held.
_NOT_SENT = ("Queued", "Polling", "Retrying")
T = TypeVar("T")


class Interrupted(Exception):
    """Raised in place of routing once the user interrupted: no new session may be created."""


class SessionLost(Exception):
    """The worker no longer holds the session (its lease lapsed or the worker went away)."""


# The SDK's session() hides the request it queues for /session/create; the
# client subclass below hands it to the task that asked, through this.
_CREATIONS: contextvars.ContextVar[list[Any]] = contextvars.ContextVar("null_client_creations")


def _sdk():
    # Imported on use: vastai takes most of a second to import, and --help or
    # a usage error should not wait for it.
    from vastai import Serverless
    from vastai.serverless.client.endpoint import Endpoint

    class SessionClient(Serverless):
        def queue_endpoint_request(self, *args: Any, **kwargs: Any) -> Any:
            request = super().queue_endpoint_request(*args, **kwargs)
            route = kwargs.get("worker_route", args[1] if len(args) > 1 else None)
            holder = _CREATIONS.get(None)
            if route == CREATE_ROUTE and holder is not None:
                holder.append(request)
            return request

    class GuardedEndpoint(Endpoint):
        """An endpoint that stops routing once interrupted, so no create is sent after Ctrl-C."""

        def __init__(self, *args: Any, stop: asyncio.Event, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._stop = stop

        async def _route(self, *args: Any, **kwargs: Any) -> Any:
            if self._stop.is_set():
                raise Interrupted("interrupted")
            answer = await super()._route(*args, **kwargs)
            if self._stop.is_set():
                raise Interrupted("interrupted")
            return answer

    return SessionClient, GuardedEndpoint


@dataclass
class SessionRecord:
    number: int
    stage: str = "scheduled"  # scheduled, requesting, holding, done
    requested_at: float | None = None
    reserved_at: float | None = None
    released_at: float | None = None
    worker: str = ""
    session_id: str = ""
    outcome: str = "not requested (interrupted)"
    creations: list[Any] = field(default_factory=list)

    @property
    def reserve_seconds(self) -> float | None:
        if self.requested_at is None or self.reserved_at is None:
            return None
        return self.reserved_at - self.requested_at

    @property
    def held_seconds(self) -> float | None:
        if self.reserved_at is None or self.released_at is None:
            return None
        return self.released_at - self.reserved_at

    @property
    def ok(self) -> bool:
        return self.outcome == "released"

    def create_sent(self) -> bool:
        """Whether a /session/create may be at a worker now (so the answer must be awaited)."""
        if not self.creations:
            return False
        return self.creations[-1].status not in _NOT_SENT


def exit_code(records: Sequence[SessionRecord], interrupted_by: int | None) -> int:
    if interrupted_by is not None:
        return 128 + interrupted_by
    return 0 if records and all(r.ok for r in records) else 1


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def format_table(records: Sequence[SessionRecord]) -> str:
    header = ("session", "worker", "reserve", "held", "outcome")
    rows = [
        (str(r.number), r.worker or "-", _seconds(r.reserve_seconds), _seconds(r.held_seconds), r.outcome)
        for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = (False, False, True, True, False)
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right, strict=False)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


class Interrupt:
    """The first SIGINT or SIGTERM: which one, and an event to wait on."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signum: int | None = None

    def __call__(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            log.info("interrupted: closing every open session")
            self.event.set()
        else:
            log.info("still closing sessions; each close gives up after 10s")

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    async def race(self, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
        """Awaits ``awaitable`` unless interrupted first (then cancels it): (finished, result)."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return True, task.result()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        return False, None

    async def sleep(self, seconds: float) -> bool:
        """Sleeps; True when interrupted before the time was up."""
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancel
        # that lands as the event is set.
        waiter = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({waiter}, timeout=max(0.0, seconds))
        finally:
            waiter.cancel()
        return self.event.is_set()


class Dispatcher:
    """Runs the sessions: one task each, started ``interval`` seconds apart."""

    def __init__(self, endpoint: Any, args: argparse.Namespace, interrupt: Interrupt, label=None):
        self.endpoint = endpoint
        self.args = args
        self.interrupt = interrupt
        self.label = label or _host_port
        self.records = [SessionRecord(n) for n in range(1, args.count + 1)]

    async def run(self) -> list[SessionRecord]:
        tasks: list[asyncio.Future[None]] = []
        for index, record in enumerate(self.records):
            if index and await self.interrupt.sleep(self.args.interval):
                break
            if self.interrupt.is_set:
                break
            tasks.append(asyncio.ensure_future(self.one(record)))
        pending = {t for t in tasks if not t.done()}
        while pending:
            stopper = asyncio.ensure_future(self.interrupt.event.wait())
            await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            pending = {t for t in tasks if not t.done()}
            if self.interrupt.is_set:
                break
        if pending:
            await self._wind_down(tasks)
        return self.records

    async def _wind_down(self, tasks: list[asyncio.Future[None]]) -> None:
        for record, task in zip(self.records, tasks, strict=False):
            # A create that reached a worker is awaited and then closed;
            # one still being routed is cancelled, and the guarded endpoint
            # makes sure it cannot reach a worker any more.
            if not task.done() and record.stage == "requesting" and not record.create_sent():
                task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=30.0)
        for task in pending:
            log.warning("a session task did not finish within 30s of the interrupt; abandoning it")
            task.cancel()

    async def one(self, record: SessionRecord) -> None:
        args = self.args
        _CREATIONS.set(record.creations)
        record.stage = "requesting"
        record.requested_at = time.monotonic()
        log.info("session %d: requested (cost %g, lifetime %gs)", record.number, args.cost, args.lifetime)
        try:
            session = await self.endpoint.session(cost=args.cost, lifetime=args.lifetime, timeout=args.timeout)
        except asyncio.CancelledError:
            record.stage = "done"
            record.outcome = "interrupted before reservation"
            log.info("session %d: interrupted while waiting for a worker", record.number)
            raise
        except Exception as exc:
            record.stage = "done"
            if self.interrupt.is_set:
                record.outcome = "interrupted before reservation"
                log.info("session %d: interrupted while waiting for a worker", record.number)
            else:
                record.outcome = f"not reserved: {_short(exc)}"
                log.warning("session %d: not reserved: %s", record.number, _short(exc))
            return
        record.stage = "holding"
        record.reserved_at = time.monotonic()
        record.worker = self.label(session.url)
        record.session_id = str(session.session_id)
        log.info(
            "session %d: reserved on %s after %.1fs (session %s)",
            record.number,
            record.worker,
            record.reserve_seconds,
            record.session_id,
        )
        lost: str | None = None
        try:
            completed = await self.hold(session)
        except SessionLost as exc:
            completed, lost = False, _short(exc)
            log.warning("session %d: lost after %.1fs: %s", record.number, time.monotonic() - record.reserved_at, lost)
        error = await self.release(session)
        record.released_at = time.monotonic()
        record.stage = "done"
        if lost is not None:
            record.outcome = f"lost: {lost}"
        elif error is not None:
            record.outcome = f"release failed: {error}"
            log.warning("session %d: release failed: %s", record.number, error)
        else:
            record.outcome = "released" if completed else "released early (interrupted)"
            log.info(
                "session %d: released%s after holding %.1fs",
                record.number,
                "" if completed else " early",
                record.held_seconds,
            )

    async def hold(self, session: Any) -> bool:
        """Holds for --hold seconds, renewing the lease; False when interrupted first."""
        end = time.monotonic() + self.args.hold
        every = self.args.lifetime / 3.0
        next_renewal = time.monotonic() + every
        while True:
            now = time.monotonic()
            if now >= end:
                return True
            if await self.interrupt.sleep(min(end, next_renewal) - now):
                return False
            if end > time.monotonic() >= next_renewal:
                await self.keep_alive(session)
                next_renewal = time.monotonic() + every

    async def keep_alive(self, session: Any) -> None:
        try:
            result = await asyncio.wait_for(session.request("/ping", {}, retry=False), KEEPALIVE_TIMEOUT)
        except ValueError as exc:  # the SDK's answer to a 410: the session is gone
            raise SessionLost(f"keep-alive: {exc}") from None
        except asyncio.TimeoutError:
            raise SessionLost(f"keep-alive got no answer in {KEEPALIVE_TIMEOUT:g}s") from None
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise SessionLost(f"keep-alive: {_short(exc)}") from None
        if not result.get("ok"):
            text = " ".join(str(result.get("text") or "").split())[:160]
            raise SessionLost(f"keep-alive answered HTTP {result.get('status')}: {text}")

    async def release(self, session: Any) -> str | None:
        """Ends the session with /session/end; the error, or None when the worker confirmed."""
        try:
            await session.endpoint.close_session(session)
        except Exception as exc:
            return _short(exc)
        finally:
            session.open = False
        return None


# -- the local stand-in -----------------------------------------------------------------


class StartupError(Exception):
    """Cannot start: one line naming the problem and the fix; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


async def _stand_in_answers(url: str) -> bool:
    """True when a stand-in answers at ``url``, False when nothing listens; StartupError otherwise."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            async with http.get(f"{url}/api/v0/endptjobs/") as response:
                body = await response.json(content_type=None) if response.status == 200 else None
    except aiohttp.ClientConnectorError:
        return False
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("results"), list):
        return True
    port = urlsplit(url).port
    raise StartupError(
        f"something at {url} answers, but not as a Vast stand-in: stop it, or pass --local-port 0 "
        f"(a private stand-in on a free port) or another port than {port}",
        code=2,
    )


async def _open_local(stack: AsyncExitStack, args: argparse.Namespace) -> tuple[str, Any]:
    """The stand-in's URL, and the stand-in itself when this process runs it (else None)."""
    from lib.standin.autoscaler import LocalConfig, PortInUse, serve

    if args.local_port:
        url = f"http://127.0.0.1:{args.local_port}"
        if await _stand_in_answers(url):
            log.info("using the local stand-in already running at %s", url)
            return url, None
    config = LocalConfig(endpoint_name=args.endpoint, api_key=LOCAL_API_KEY, port=args.local_port)
    try:
        standin = await stack.enter_async_context(serve(config))
    except PortInUse as exc:
        raise StartupError(str(exc.strerror).replace("--port", "--local-port"), code=2) from None
    log.info("started the local stand-in in this process at %s; it stops when this client ends", standin.url)
    return standin.url, standin


async def _wait_for_zero(standin: Any, interrupt: Interrupt) -> None:
    fleet = standin.fleet
    params = fleet.settings.params
    if params.inactivity_timeout is None or params.min_load > 0:
        return
    limit = params.inactivity_timeout + fleet.settings.policy.scale_down_delay + fleet.settings.stop_grace + 10.0
    log.info("waiting for the local stand-in to scale to zero (inactivity_timeout %gs)", params.inactivity_timeout)
    started = time.monotonic()
    finished, _ = await interrupt.race(fleet.wait_for(lambda f: not f.instances, limit))
    if finished:
        log.info("scaled to zero %.1fs after the last release", time.monotonic() - started)


# -- entry point ----------------------------------------------------------------------------


async def run(args: argparse.Namespace, api_key: str) -> int:
    started = time.monotonic()
    interrupt = Interrupt()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, interrupt, signum)
    records: list[SessionRecord] = []
    standin = None
    try:
        async with AsyncExitStack() as stack:
            SessionClient, GuardedEndpoint = _sdk()
            if args.instance == "local":
                url, standin = await _open_local(stack, args)
                client = SessionClient(api_key=api_key, instance="local", autoscaler_url=url, webserver_url=url)
                # Plain HTTP on loopback: no need for the CA certificate the
                # SDK would otherwise download from the console first.
                client._ssl_context = ssl.create_default_context()
            else:
                client = SessionClient(api_key=api_key, instance=args.instance)
            stack.push_async_callback(client.close)
            finished, endpoint = await interrupt.race(_find_endpoint(client, args.endpoint, GuardedEndpoint, interrupt))
            if finished:
                label = _host_port
                if standin is not None:
                    label = _label_with_worker_id(standin)
                dispatcher = Dispatcher(endpoint, args, interrupt, label=label)
                records = await dispatcher.run()
                log.info("all sessions done after %.1fs", time.monotonic() - started)
                if standin is not None and not interrupt.is_set:
                    await _wait_for_zero(standin, interrupt)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    if records:
        print(format_table(records), flush=True)
    reserved = sum(1 for r in records if r.reserved_at is not None)
    released = sum(1 for r in records if r.ok)
    note = f"{released} of {args.count} sessions reserved and released; took {time.monotonic() - started:.1f}s"
    if standin is not None:
        note += f"; the local stand-in provisioned {_plural(len(standin.fleet.created), 'worker')} for {_plural(reserved, 'session')}"
    print(note, flush=True)
    return exit_code(records, interrupt.signum)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _label_with_worker_id(standin: Any):
    def label(url: str) -> str:
        for inst in standin.fleet.instances.values():
            if inst.url == url:
                return f"#{inst.id} {_host_port(url)}"
        return _host_port(url)

    return label


async def _find_endpoint(client: Any, name: str, guarded_class: Any, interrupt: Interrupt) -> Any:
    try:
        endpoints = await client.get_endpoints()
    except Exception as exc:
        raise StartupError(f"cannot list endpoints at {client.vast_web_url}: {_short(exc)}") from None
    for endpoint in endpoints:
        if endpoint.name == name:
            return guarded_class(client=client, data=endpoint.data, stop=interrupt.event)
    names = ", ".join(repr(e.name) for e in endpoints) or "none"
    raise StartupError(f"no endpoint named {name!r} at {client.vast_web_url} (it has: {names}): pass --endpoint NAME")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m workers.null.client",
        description=(
            "Open COUNT null-worker sessions through the vastai SDK, INTERVAL seconds apart, hold each "
            "HOLD seconds and close each with /session/end. Exit 0 only when every session was reserved "
            "and released; Ctrl-C closes the open ones and exits 130."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="endpoint name")
    parser.add_argument(
        "--instance",
        choices=INSTANCES,
        default="local",
        help="Vast autoscaler to use; local: the stand-in on 127.0.0.1, started in-process when none answers",
    )
    parser.add_argument("--count", type=int, default=1, help="sessions to open")
    parser.add_argument("--hold", type=float, default=4.0, help="seconds to hold each session")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between opening one session and the next")
    parser.add_argument("--cost", type=float, default=100.0, help="session cost; 100 = one null worker")
    parser.add_argument(
        "--lifetime",
        type=float,
        default=60.0,
        help="session lease in seconds; holds longer than this renew it every lifetime/3 seconds",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each reservation")
    parser.add_argument(
        "--local-port",
        type=int,
        default=DEFAULT_LOCAL_PORT,
        help="with --instance local: the stand-in's port on 127.0.0.1 (0: always start a private one on a free port)",
    )
    parser.add_argument("--verbose", action="store_true", help="also show the SDK's own log lines")
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    checks = (
        (args.count >= 1, f"--count {args.count}: give 1 or more sessions"),
        (math.isfinite(args.hold) and args.hold >= 0, f"--hold {args.hold:g}: give seconds >= 0"),
        (math.isfinite(args.interval) and args.interval >= 0, f"--interval {args.interval:g}: give seconds >= 0"),
        (math.isfinite(args.cost) and args.cost >= 0, f"--cost {args.cost:g}: give a number >= 0 (100 = one worker)"),
        (math.isfinite(args.lifetime) and args.lifetime > 0, f"--lifetime {args.lifetime:g}: give seconds > 0"),
        (args.timeout > 0, f"--timeout {args.timeout:g}: give seconds > 0"),
        (0 <= args.local_port <= 65535, f"--local-port {args.local_port}: give a port 0-65535 (0: a free one)"),
    )
    for ok, message in checks:
        if not ok:
            parser.error(message)


class _Elapsed(logging.Formatter):
    def __init__(self, started: float):
        super().__init__()
        self.started = started

    def format(self, record: logging.LogRecord) -> str:
        source = "local " if record.name.startswith("lib.") else ""
        return f"[{record.created - self.started:6.1f}s] {source}{record.getMessage()}"


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Elapsed(time.time()))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in (log.name, "lib"):
        logging.getLogger(name).setLevel(logging.INFO)
    # The SDK logs every failed route or create at ERROR; this client reports
    # each session's outcome itself.
    sdk_level = logging.INFO if verbose else logging.CRITICAL
    for name in ("vastai", "Serverless", "SessionClient"):
        logging.getLogger(name).setLevel(sdk_level)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    if args.instance == "local":
        api_key = LOCAL_API_KEY
    else:
        api_key = (env.get("VAST_API_KEY") or "").strip()
        if not api_key:
            print(
                f"{parser.prog}: VAST_API_KEY is not set: export your Vast API key to use --instance "
                f"{args.instance}, or try --instance local",
                file=sys.stderr,
            )
            return 2
    configure_logging(args.verbose)
    try:
        return asyncio.run(run(args, api_key))
    except StartupError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # before the event loop took over Ctrl-C: nothing was opened yet
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
