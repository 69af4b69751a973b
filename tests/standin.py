"""Helpers for tests that run the local stand-in with real worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from lib.standin.autoscaler import LocalConfig, LocalServerless
from lib.standin.book import BookSettings
from lib.standin.fleet import Fleet, FleetSettings
from lib.standin.scaling import EndpointParams, LocalPolicy
from workers.null.dispatch import sdk

# Short enough for a test, long enough that every phase is visible.
FAST = dict(provisioning_delay=0.2, stop_grace=6.0, load_timeout=45.0)
FAST_PARAMS = dict(target_util=1.0, target_queue_time=0.2, max_queue_time=1.0, inactivity_timeout=2.0)
FAST_POLICY = dict(scale_down_delay=0.5)


def fast_config(**overrides: Any) -> LocalConfig:
    """A stand-in config on a free port with short delays; keyword names as in the dataclasses."""
    overrides = {**FAST, **overrides}

    def taken(kind: type, base: dict[str, Any]) -> dict[str, Any]:
        names = {f.name for f in fields(kind)}
        return {**base, **{k: overrides.pop(k) for k in list(overrides) if k in names}}

    params = EndpointParams(**taken(EndpointParams, FAST_PARAMS))
    policy = LocalPolicy(**taken(LocalPolicy, FAST_POLICY))
    book = BookSettings(params=params, policy=policy, **taken(BookSettings, {}))
    return LocalConfig(fleet=FleetSettings(book=book, **overrides), port=0)


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


def process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")
