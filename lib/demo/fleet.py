"""The demo's watch on the stand-in's fleet: what was billed, how many ran, and each worker's phases over time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lib.standin.book import Provision, Resume, Stop
from workers.null.cli import StartupError

SAMPLE_EVERY = 0.1


@dataclass
class FleetSample:
    """When each instance existed (billed), and how many were live over time."""

    first_seen: dict[int, float] = field(default_factory=dict)
    last_seen: dict[int, float] = field(default_factory=dict)
    peak: int = 0
    peak_at: float | None = None
    first_worker_at: float | None = None
    zero_at: float | None = None  # back at zero after having had workers

    def take(self, fleet: Any, now: float) -> None:
        ids = set(fleet.instances)
        for iid in ids:
            self.first_seen.setdefault(iid, now)
            self.last_seen[iid] = now
        live = len(fleet.live())
        if ids and self.first_worker_at is None:
            self.first_worker_at = now
        if live > self.peak:
            self.peak, self.peak_at = live, now
        if ids:
            self.zero_at = None
        elif self.first_worker_at is not None and self.zero_at is None:
            self.zero_at = now

    def billed(self) -> float:
        return sum(self.last_seen[i] - self.first_seen[i] for i in self.first_seen)


async def sample_fleet(fleet: Any, sample: FleetSample) -> None:
    while True:
        sample.take(fleet, time.time())
        await asyncio.sleep(SAMPLE_EVERY)


def fleet_timeline(
    events: Sequence[tuple[float, str, tuple[Any, ...]]],
    issued: Sequence[tuple[float, Any]],
    urls: Mapping[int, str] | None = None,
) -> dict:
    """Each worker's phases with their start times, from the book's recorded events and commands.

    A worker is ``provisioning`` from its Provision, ``loading`` once its
    process runs (or from a Resume), ``ready`` at its first report with a
    capacity (the book's rule), ``stopping`` from its Stop, and then ``cold``
    (files kept) or ``gone``. ``urls``: each worker's URL, written beside it
    where known (the job log names a job's worker by it).
    """

    phases: dict[int, list[tuple[float, str]]] = {}
    keep: dict[int, bool] = {}

    def enter(worker_id: int, at: float, phase: str) -> None:
        phases.setdefault(worker_id, []).append((at, phase))

    def now_in(worker_id: int) -> str | None:
        seen = phases.get(worker_id)
        return seen[-1][1] if seen else None

    merged = sorted(
        [(at, 0, "command", command) for at, command in issued] + [(at, 1, name, args) for at, name, args in events],
        key=lambda item: (item[0], item[1]),
    )
    for at, _, name, what in merged:
        if name == "command":
            if isinstance(what, Provision):
                enter(what.worker_id, at, "provisioning")
            elif isinstance(what, Resume):
                enter(what.worker_id, at, "loading")
            elif isinstance(what, Stop) and now_in(what.worker_id) not in (None, "stopping"):
                keep[what.worker_id] = what.keep
                enter(what.worker_id, at, "stopping")
        elif name == "started" and now_in(what[0]) == "provisioning":
            enter(what[0], at, "loading")
        elif name == "report" and now_in(what[0].worker_id) == "loading":
            report = what[0]
            if report.max_perf > 0 and not report.error:
                enter(report.worker_id, at, "ready")
        elif name == "failed" and now_in(what[0]) in ("provisioning", "loading", "ready"):
            enter(what[0], at, "errored")
        elif name == "stopped" and now_in(what[0]) == "stopping":
            enter(what[0], at, "cold" if keep.get(what[0]) else "gone")
    return {
        "workers": [
            {
                "id": worker_id,
                **({"url": urls[worker_id]} if urls and worker_id in urls else {}),
                "phases": [[round(at, 6), phase] for at, phase in seen],
            }
            for worker_id, seen in sorted(phases.items())
        ]
    }


def open_fleet_log(path: Path | None) -> IO[str] | None:
    """``--fleet-log``'s file, opened before anything starts so a bad path is refused at once."""
    if path is None:
        return None
    try:
        return open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by run_demo
    except OSError as exc:
        raise StartupError(f"--fleet-log {path}: {exc.strerror}: give a writable file", code=2) from None


def write_fleet_log(out: IO[str], fleet: Any, standin: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """The fleet's timeline, the stand-in's settings it ran under and ``extra``, as one JSON document."""
    data = {
        "standin": dict(standin),
        **extra,
        **fleet_timeline(fleet.book.events or [], fleet.book.issued or [], fleet.urls),
    }
    out.write(json.dumps(data, indent=1) + "\n")
