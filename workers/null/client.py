"""``python -m workers.null.client``: open, hold and close null-worker sessions through the vastai SDK.

``python -m workers.null.client --instance local --count 3`` opens three
sessions one second apart against the local stand-in (``python -m
lib.standin``, on 127.0.0.1:8080), holds each for a few seconds and closes
each with ``/session/end``. Each session is requested with a deadline kept
within a second. A hold longer than the lifetime is kept alive with the SDK's
``session.request("/ping", {})`` every lifetime/3 seconds, which the null
worker answers by renewing the lease to now + lifetime. The lifetime stays
short on purpose: should this client die, the worker frees itself within one
lifetime instead of after the whole hold.

``python -m lib.demo --sessions 3`` runs the same with a stand-in of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from workers.null.cli import (
    DefaultsShown,
    Interrupt,
    OneLineParser,
    StartupError,
    configure_logging,
    missing_api_key,
    non_negative,
    positive,
    refuse_first,
    run_command,
    short,
)
from workers.null.dispatch import sdk
from workers.null.protocol import SESSION_COST

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


def host_port(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


class SessionRunner:
    """Runs the sessions: one task each, started ``interval`` seconds apart."""

    def __init__(self, endpoint: Any, args: argparse.Namespace, interrupt: Interrupt, label=None):
        self.endpoint = endpoint
        self.args = args
        self.interrupt = interrupt
        self.label = label or host_port
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


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m workers.null.client",
        description=(
            "Open COUNT null-worker sessions through the vastai SDK, INTERVAL seconds apart, hold each "
            "HOLD seconds and close each with /session/end. Exit 0 only when every session was reserved "
            "and released; Ctrl-C closes the open ones and exits 130."
        ),
        formatter_class=DefaultsShown,
    )
    parser.add_argument("--endpoint", default=sdk.DEFAULT_ENDPOINT, help="endpoint name")
    parser.add_argument(
        "--instance",
        choices=sdk.INSTANCES,
        default="local",
        help="Vast autoscaler to use; local: the stand-in (python -m lib.standin) on 127.0.0.1",
    )
    parser.add_argument("--count", type=int, default=1, help="sessions to open")
    parser.add_argument("--hold", type=float, default=4.0, help="seconds to hold each session")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between opening one session and the next")
    parser.add_argument("--cost", type=float, default=SESSION_COST, help="session cost; 100 = one null worker")
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
        default=sdk.DEFAULT_LOCAL_PORT,
        help="with --instance local: the stand-in's port on 127.0.0.1",
    )
    parser.add_argument("--verbose", action="store_true", help="also show the SDK's own log lines")
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    checks = (
        (args.count >= 1, f"--count {args.count}: give 1 or more sessions"),
        (non_negative(args.hold), f"--hold {args.hold:g}: give seconds >= 0"),
        (non_negative(args.interval), f"--interval {args.interval:g}: give seconds >= 0"),
        (
            positive(args.cost),
            f"--cost {args.cost:g}: give a number > 0 (a session fills one worker whatever its cost; 100 = one worker)",
        ),
        (positive(args.lifetime), f"--lifetime {args.lifetime:g}: give seconds > 0"),
        (args.timeout > 0, f"--timeout {args.timeout:g}: give seconds > 0"),
        (1 <= args.local_port <= 65535, f"--local-port {args.local_port}: give a port 1-65535"),
    )
    refuse_first(parser, checks)


# -- running ---------------------------------------------------------------------------


async def check_stand_in(url: str, api_key: str) -> None:
    """Returns when a stand-in answers at ``url``; StartupError naming the fix otherwise."""
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            async with http.get(f"{url}/api/v0/endptjobs/", headers=headers) as response:
                body = await response.json(content_type=None) if response.status == 200 else None
    except aiohttp.ClientConnectorError:
        raise StartupError(
            f"no stand-in answers at {url}: start one with python -m lib.standin --port {urlsplit(url).port}, "
            "or run python -m lib.demo --sessions N, which starts its own",
            code=2,
        ) from None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("results"), list)):
        raise StartupError(
            f"something at {url} answers, but not as a Vast stand-in: stop it, or pass --local-port "
            "with the stand-in's port",
            code=2,
        )


async def open_sessions(
    args: argparse.Namespace,
    api_key: str,
    url: str | None,
    interrupt: Interrupt,
    label: Callable[[str], str] | None = None,
) -> list[SessionRecord]:
    """Opens, holds and closes ``args.count`` sessions on the endpoint at ``url`` (None: Vast's own)."""
    client = sdk.make_client(api_key, args.instance, url)
    try:
        finished, endpoint = await interrupt.race(sdk.find_endpoint(client, args.endpoint, interrupt.event))
        if not finished:
            return []
        return await SessionRunner(endpoint, args, interrupt, label=label).run()
    finally:
        await client.close()


def report(records: Sequence[SessionRecord], count: int, took: float) -> str:
    """The table of sessions, then one line: how many were reserved and released, and how long it took."""
    table = format_table(records) + "\n" if records else ""
    released = sum(1 for r in records if r.ok)
    return f"{table}{released} of {count} sessions reserved and released; took {took:.1f}s"


async def run(args: argparse.Namespace, api_key: str) -> int:
    started = time.monotonic()
    interrupt = Interrupt()
    interrupt.install()
    try:
        url = None
        if args.instance == "local":
            url = f"http://127.0.0.1:{args.local_port}"
            await check_stand_in(url, api_key)
            log.info("using the local stand-in at %s", url)
        records = await open_sessions(args, api_key, url, interrupt)
        log.info("all sessions done after %.1fs", time.monotonic() - started)
    finally:
        interrupt.uninstall()
    print(report(records, args.count, time.monotonic() - started), flush=True)
    return exit_code(records, interrupt.signum)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    if args.instance == "local":
        api_key = sdk.LOCAL_API_KEY
    else:
        api_key = (env.get("VAST_API_KEY") or "").strip()
        if not api_key:
            return missing_api_key(parser.prog, args.instance, "--instance local")
    configure_logging(["workers.null.client"], verbose=args.verbose)
    return run_command(parser.prog, run(args, api_key))


if __name__ == "__main__":
    sys.exit(main())
