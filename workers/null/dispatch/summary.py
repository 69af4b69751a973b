"""What a run of the loop comes to, in lines: jobs done, failed and lost, and how long they waited.

``percentile`` is the one statistic the project's figures use (the demo, the
bench and the planner): linear interpolation between the two nearest ranks,
as numpy's default and a spreadsheet's PERCENTILE do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from workers.null.dispatch.ledger import DEAD_STATE, DONE_STATE, Ledger


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolated between neighbours; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def in_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


@dataclass(frozen=True)
class JobTally:
    """The jobs of a run, by how they ended, with their waits and run times."""

    total: int
    done: int
    failed: int  # dead-lettered
    lost: int  # neither done nor dead-lettered
    twice: int  # started in more than one attempt
    waits: tuple[float, ...]  # from publish to the first start, per job that started
    busy: float  # seconds handlers ran, all attempts
    asked: int  # sessions asked for

    def jobs_line(self) -> str:
        return f"{self.done} of {self.total} jobs done, {self.failed} failed, {self.lost} lost, {self.twice} run twice"

    def wait_line(self) -> str:
        p50, p95 = percentile(self.waits, 50), percentile(self.waits, 95)
        return f"queue wait (publish to handler start): p50 {in_seconds(p50)}, p95 {in_seconds(p95)}"


def tally_jobs(ledger: Ledger, job_ids: Sequence[str], published: Mapping[str, float] | None = None) -> JobTally:
    """``job_ids`` as the ledger saw them; a job's wait runs from ``published`` (else when the ledger heard of it)."""
    done = failed = lost = 0
    waits: list[float] = []
    busy = 0.0
    for job_id in job_ids:
        record = ledger.jobs.get(job_id)
        state = record.state if record else None
        if state == DONE_STATE:
            done += 1
        elif state == DEAD_STATE:
            failed += 1
        else:
            lost += 1
        if record is None:
            continue
        starts = [row.started for row in record.attempts.values() if row.started is not None]
        origin = published.get(job_id) if published is not None else record.enqueued
        if starts and origin is not None:
            waits.append(max(0.0, min(starts) - origin))
        for row in record.attempts.values():
            if row.started is not None and row.finished is not None:
                busy += row.finished - row.started
    twice = sum(1 for job_id in job_ids if job_id in ledger.jobs and ledger.jobs[job_id].starts > 1)
    return JobTally(
        total=len(job_ids),
        done=done,
        failed=failed,
        lost=lost,
        twice=twice,
        waits=tuple(waits),
        busy=busy,
        asked=ledger.asked,
    )
