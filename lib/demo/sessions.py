"""``python -m lib.demo --sessions N``: the session client against a stand-in of its own, with no queue.

The stand-in runs in this process; the client (``workers.null.client``)
opens, holds and closes N sessions through the SDK, then the stand-in scales
back to zero and stops, and no worker is left running.
"""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

from lib.standin.autoscaler import LocalConfig, serve
from lib.standin.book import BookSettings
from lib.standin.fleet import FleetSettings
from lib.standin.scaling import EndpointParams
from workers.null.cli import Interrupt
from workers.null.client import exit_code, host_port, open_sessions, report
from workers.null.dispatch import sdk
from workers.null.protocol import SESSION_COST

log = logging.getLogger("lib.demo")


async def run_sessions(args: argparse.Namespace) -> int:
    started = time.monotonic()
    interrupt = Interrupt()
    interrupt.install()
    records: list[Any] = []
    fleet: Any = None
    try:
        async with AsyncExitStack() as stack:
            settings = FleetSettings(
                book=BookSettings(
                    params=EndpointParams(max_workers=args.max_sessions, inactivity_timeout=args.inactivity_timeout)
                ),
                provisioning_delay=args.cold_start,
            )
            config = LocalConfig(fleet=settings, endpoint_name=sdk.DEFAULT_ENDPOINT, api_key=sdk.LOCAL_API_KEY, port=0)
            standin = await stack.enter_async_context(serve(config))
            fleet = standin.fleet
            log.info("started the local stand-in in this process at %s", standin.url)
            session_args = argparse.Namespace(
                instance="local",
                endpoint=sdk.DEFAULT_ENDPOINT,
                count=args.sessions,
                hold=args.hold,
                interval=args.interval,
                cost=SESSION_COST,
                lifetime=args.lifetime,
                timeout=args.timeout,
            )
            records = await open_sessions(session_args, sdk.LOCAL_API_KEY, standin.url, interrupt, _label(fleet))
            log.info("all sessions done after %.1fs", time.monotonic() - started)
            if not interrupt.is_set:
                await _wait_for_zero(fleet, interrupt)
    finally:
        interrupt.uninstall()
    reserved = sum(1 for r in records if r.reserved_at is not None)
    note = report(records, args.sessions, time.monotonic() - started)
    if fleet is not None:
        note += f"; the local stand-in provisioned {_plural(len(fleet.created), 'worker')}"
        note += f" for {_plural(reserved, 'session')}"
    print(note, flush=True)
    return exit_code(records, interrupt.signum)


async def _wait_for_zero(fleet: Any, interrupt: Interrupt) -> None:
    params = fleet.settings.book.params
    if params.inactivity_timeout is None or params.min_load > 0:
        return
    limit = params.inactivity_timeout + fleet.settings.book.policy.scale_down_delay + fleet.settings.stop_grace + 10.0
    log.info("waiting for the local stand-in to scale to zero (inactivity_timeout %gs)", params.inactivity_timeout)
    started = time.monotonic()
    finished, _ = await interrupt.race(fleet.wait_for(lambda f: not f.instances, limit))
    if finished:
        log.info("scaled to zero %.1fs after the last release", time.monotonic() - started)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _label(fleet: Any):
    """A worker named by its stand-in id and address, as the table shows it."""

    def label(url: str) -> str:
        for inst in fleet.instances.values():
            if inst.url == url:
                return f"#{inst.id} {host_port(url)}"
        return host_port(url)

    return label
