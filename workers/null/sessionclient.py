"""Open, hold and close null-worker sessions through the ``vastai`` SDK.

``python -m workers.null.client`` (``client.py``) is its command line. Each
session is requested with a deadline kept within a second, held for a while
and closed with ``/session/end``. A hold longer than the lifetime is kept
alive with the SDK's ``session.request("/ping", {})`` every lifetime/3
seconds, which the null worker answers by renewing the lease to now +
lifetime. The lifetime stays short on purpose: should this client die, the
worker frees itself within one lifetime instead of after the whole hold.

With ``--instance local`` and nothing answering on 127.0.0.1:8080 it runs the
local stand-in (``lib.standin``) in-process, imported only then, waits for it
to scale back to zero, and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from . import sdk
from .cli import Interrupt, StartupError, short

log = logging.getLogger("workers.null.client")  # the command's logger, also when run as __main__

KEEPALIVE_TIMEOUT = 10.0


class SessionLost(Exception):
    """The worker no longer holds the session (its lease lapsed or the worker went away)."""


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
        return sdk.create_sent(self.creations)


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


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


class SessionRunner:
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
        record.stage = "requesting"
        record.requested_at = time.monotonic()
        log.info("session %d: requested (cost %g, lifetime %gs)", record.number, args.cost, args.lifetime)
        try:
            session = await sdk.open_session(
                self.endpoint,
                cost=args.cost,
                lifetime=args.lifetime,
                timeout=args.timeout,
                creations=record.creations,
            )
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
                record.outcome = f"not reserved: {short(exc)}"
                log.warning("session %d: not reserved: %s", record.number, short(exc))
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
            completed, lost = False, short(exc)
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
            raise SessionLost(f"keep-alive: {short(exc)}") from None
        if not result.get("ok"):
            text = " ".join(str(result.get("text") or "").split())[:160]
            raise SessionLost(f"keep-alive answered HTTP {result.get('status')}: {text}")

    async def release(self, session: Any) -> str | None:
        """Ends the session with /session/end; the error, or None when the worker confirmed."""
        return await sdk.close_session(session.endpoint, session)


# -- the local stand-in ---------------------------------------------------------------


async def _stand_in_answers(url: str, api_key: str) -> bool:
    """True when a stand-in answers at ``url``, False when nothing listens; StartupError otherwise."""
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            async with http.get(f"{url}/api/v0/endptjobs/", headers=headers) as response:
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


async def open_local(stack: AsyncExitStack, args: argparse.Namespace) -> tuple[str, Any]:
    """The stand-in's URL, and the stand-in itself when this process runs it (else None)."""
    from lib.standin.autoscaler import LocalConfig, PortInUse, serve

    from .client import LOCAL_API_KEY

    if args.local_port:
        url = f"http://127.0.0.1:{args.local_port}"
        if await _stand_in_answers(url, LOCAL_API_KEY):
            log.info("using the local stand-in already running at %s", url)
            return url, None
    config = LocalConfig(endpoint_name=args.endpoint, api_key=LOCAL_API_KEY, port=args.local_port)
    try:
        standin = await stack.enter_async_context(serve(config))
    except PortInUse as exc:
        raise StartupError(str(exc.strerror).replace("--port", "--local-port"), code=2) from None
    log.info("started the local stand-in in this process at %s; it stops when this client ends", standin.url)
    return standin.url, standin


async def wait_for_zero(standin: Any, interrupt: Interrupt) -> None:
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


# -- running ---------------------------------------------------------------------------


async def run(args: argparse.Namespace, api_key: str) -> int:
    started = time.monotonic()
    interrupt = Interrupt()
    interrupt.install()
    records: list[SessionRecord] = []
    standin = None
    try:
        async with AsyncExitStack() as stack:
            url = None
            if args.instance == "local":
                url, standin = await open_local(stack, args)
            client = sdk.make_client(api_key, args.instance, url)
            stack.push_async_callback(client.close)
            finished, endpoint = await interrupt.race(find_endpoint(client, args.endpoint, interrupt))
            if finished:
                label = _host_port
                if standin is not None:
                    label = _label_with_worker_id(standin)
                runner = SessionRunner(endpoint, args, interrupt, label=label)
                records = await runner.run()
                log.info("all sessions done after %.1fs", time.monotonic() - started)
                if standin is not None and not interrupt.is_set:
                    await wait_for_zero(standin, interrupt)
    finally:
        interrupt.uninstall()
    if records:
        print(format_table(records), flush=True)
    reserved = sum(1 for r in records if r.reserved_at is not None)
    released = sum(1 for r in records if r.ok)
    note = f"{released} of {args.count} sessions reserved and released; took {time.monotonic() - started:.1f}s"
    if standin is not None:
        workers = _plural(len(standin.fleet.created), "worker")
        note += f"; the local stand-in provisioned {workers} for {_plural(reserved, 'session')}"
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


async def find_endpoint(client: Any, name: str, interrupt: Interrupt) -> Any:
    """The named endpoint, routing only until interrupted; StartupError naming the fix otherwise."""
    try:
        return await sdk.find_endpoint(client, name, interrupt.event)
    except sdk.EndpointNotFound as exc:
        raise StartupError(f"{exc}: pass --endpoint NAME") from None
    except Exception as exc:
        raise StartupError(f"cannot list endpoints at {client.vast_web_url}: {short(exc)}") from None
