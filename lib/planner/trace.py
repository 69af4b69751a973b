"""Job traces: read from a file or generated, always as jobs sorted by arrival.

A trace is a list of ``Job(arrival, duration)`` in seconds from its start.
Three file shapes are read:

- CSV with a header naming ``arrival`` and ``duration``;
- JSON lines, one object per job with the same two keys;
- the dispatcher's job log (JSON lines with ``enqueued``, ``started`` and
  ``finished`` per attempt): each job's final attempt gives its arrival
  (``enqueued``) and duration (``finished - started``), counted from the
  first job's arrival.

``arrival`` (and the job log's times) may be seconds or ISO 8601 times; ISO
times are counted from the earliest one. A problem raises ``TraceError``
naming the line and the fix.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DAY = 86400.0


@dataclass(frozen=True)
class Job:
    arrival: float
    duration: float


class TraceError(ValueError):
    """One line naming where the trace is wrong and how to fix it."""


# -- reading -------------------------------------------------------------------


def load_trace(path: str | Path) -> list[Job]:
    """The jobs of a CSV, JSON lines or job log file, checked and sorted by arrival."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it ({exc.strerror or exc}); pass an existing trace file") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text; pass a CSV or JSON lines file") from None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        raise TraceError(f"{path}: the trace is empty; give at least one job (arrival, duration)")
    if first.startswith("{"):
        rows = list(_json_rows(path, text))
        if any("enqueued" in row and "arrival" not in row for _, row in rows):
            return _from_job_log(path, rows)
        return _from_rows(path, rows, sort=False)
    return _from_rows(path, _csv_rows(path, text), sort=False)


def _json_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{number}: not valid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise TraceError(f"{path}:{number}: a JSON {type(row).__name__}, not an object; write one object per line")
        yield number, row


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(text.splitlines())
    header: list[str] | None = None
    for number, cells in enumerate(reader, start=1):
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in cells]
            missing = [name for name in ("arrival", "duration") if name not in header]
            if missing:
                raise TraceError(
                    f"{path}:{number}: the header has no {' or '.join(missing)} column; "
                    "start the file with a header line such as 'arrival,duration'"
                )
            continue
        yield number, dict(zip(header, (cell.strip() for cell in cells), strict=False))


def _from_rows(path: Path, rows: Iterable[tuple[int, dict[str, Any]]], *, sort: bool) -> list[Job]:
    parsed: list[tuple[int, Any, float]] = []
    for number, row in rows:
        for name in ("arrival", "duration"):
            if row.get(name) in (None, ""):
                raise TraceError(f"{path}:{number}: no {name}; give every job an arrival and a duration in seconds")
        arrival = _time_value(path, number, "arrival", row["arrival"])
        duration = _seconds(path, number, "duration", row["duration"])
        parsed.append((number, arrival, duration))
    if not parsed:
        raise TraceError(f"{path}: the trace has no jobs; add at least one row under the header")
    jobs = _relative(path, parsed)
    if sort:
        jobs.sort(key=lambda j: j.arrival)
        return jobs
    for (number, _, _), before, job in zip(parsed[1:], jobs, jobs[1:], strict=False):
        if job.arrival < before.arrival:
            raise TraceError(
                f"{path}:{number}: arrival {job.arrival:g}s is before the previous row's {before.arrival:g}s; "
                "sort the trace by arrival"
            )
    return jobs


def _from_job_log(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> list[Job]:
    """One job per job id, from its final attempt; jobs that never finished an attempt are left out."""
    final: dict[Any, tuple[int, int, dict[str, Any]]] = {}
    for number, row in rows:
        job_id = next((row[key] for key in ("job_id", "job", "id") if key in row), None)
        if job_id is None:
            raise TraceError(f"{path}:{number}: a job log line without a job id; keep the job_id field the log writes")
        try:
            attempt = int(row.get("attempt") or 1)
        except (TypeError, ValueError):
            raise TraceError(f"{path}:{number}: attempt {row.get('attempt')!r} is not a whole number") from None
        known = final.get(job_id)
        if known is None or attempt >= known[1]:
            final[job_id] = (number, attempt, row)
    parsed: list[tuple[int, Any, float]] = []
    for number, _, row in sorted(final.values(), key=lambda item: item[0]):
        if row.get("started") in (None, "") or row.get("finished") in (None, ""):
            continue  # never ran to the end: nothing to replay
        for name in ("enqueued", "started", "finished"):
            if row.get(name) in (None, ""):
                raise TraceError(f"{path}:{number}: no {name}; a job log line needs enqueued, started and finished")
        enqueued = _time_value(path, number, "enqueued", row["enqueued"])
        started = _time_value(path, number, "started", row["started"])
        finished = _time_value(path, number, "finished", row["finished"])
        if isinstance(started, datetime) and isinstance(finished, datetime):
            duration = (finished - started).total_seconds()
        elif not isinstance(started, datetime) and not isinstance(finished, datetime):
            duration = finished - started
        else:
            raise TraceError(f"{path}:{number}: started and finished mix ISO times and seconds; use one kind")
        if duration < 0:
            raise TraceError(f"{path}:{number}: finished is before started; fix the times of that attempt")
        parsed.append((number, enqueued, duration))
    if not parsed:
        raise TraceError(f"{path}: no job in the log has a finished attempt; record some jobs to the end first")
    # The log's times are the wall clock (epoch seconds or ISO): count from the first job.
    jobs = _relative(path, parsed, from_earliest=True)
    jobs.sort(key=lambda j: j.arrival)
    return jobs


def _relative(path: Path, parsed: list[tuple[int, Any, float]], *, from_earliest: bool = False) -> list[Job]:
    """Seconds stay as given (``from_earliest``: count from the earliest); ISO times count from the earliest."""
    kinds = {isinstance(arrival, datetime) for _, arrival, _ in parsed}
    if len(kinds) > 1:
        number = next(n for n, a, _ in parsed if isinstance(a, datetime) != isinstance(parsed[0][1], datetime))
        raise TraceError(f"{path}:{number}: mixes ISO times and seconds; write every arrival the same way")
    if kinds == {True}:
        try:
            start = min(arrival for _, arrival, _ in parsed)
        except TypeError:
            raise TraceError(f"{path}: mixes ISO times with and without a time zone; give every time a zone") from None
        return [Job((arrival - start).total_seconds(), duration) for _, arrival, duration in parsed]
    if from_earliest:
        start = min(arrival for _, arrival, _ in parsed)
        return [Job(float(arrival - start), duration) for _, arrival, duration in parsed]
    for number, arrival, _ in parsed:
        if arrival < 0:
            raise TraceError(f"{path}:{number}: arrival {arrival:g} is negative; count seconds from the trace's start")
    return [Job(float(arrival), duration) for _, arrival, duration in parsed]


# Python 3.10's fromisoformat reads neither a trailing Z nor fractions of other than 3 or 6 digits.
_FRACTION = re.compile(r"([T ]\d\d:\d\d:\d\d)\.(\d+)")


def _for_fromisoformat(text: str) -> str:
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    return _FRACTION.sub(lambda m: f"{m.group(1)}.{(m.group(2) + '000000')[:6]}", text)


def _time_value(path: Path, number: int, name: str, value: Any) -> float | datetime:
    if isinstance(value, str):
        try:
            return _number(value)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(_for_fromisoformat(value))
        except ValueError:
            raise TraceError(
                f"{path}:{number}: {name} {value!r} is neither seconds nor an ISO 8601 time; "
                "write e.g. 12.5 or 2026-01-31T12:00:00Z"
            ) from None
        return moment
    return _seconds(path, number, name, value, allow_negative=True)


def _seconds(path: Path, number: int, name: str, value: Any, *, allow_negative: bool = False) -> float:
    try:
        seconds = _number(value)
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{number}: {name} {value!r} is not a number of seconds; write e.g. 4.2") from None
    if seconds < 0 and not allow_negative:
        raise TraceError(f"{path}:{number}: {name} {seconds:g} is negative; give seconds >= 0")
    return seconds


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not finite")
    return number


# -- generating ------------------------------------------------------------------


@dataclass(frozen=True)
class JobSeconds:
    """How long generated jobs run: exponential around ``mean``, or uniform in [low, high]."""

    mean: float | None = 10.0
    low: float = 0.0
    high: float = 0.0

    def draw(self, rng: random.Random) -> float:
        if self.mean is not None:
            return rng.expovariate(1.0 / self.mean) if self.mean > 0 else 0.0
        return rng.uniform(self.low, self.high)

    def describe(self) -> str:
        return f"mean {self.mean:g}s (exponential)" if self.mean is not None else f"{self.low:g}-{self.high:g}s"


def poisson(rate: float, seconds: float, job_seconds: JobSeconds, rng: random.Random) -> list[Job]:
    """Arrivals at a steady ``rate`` per second for ``seconds``."""
    jobs = []
    t = rng.expovariate(rate) if rate > 0 else seconds
    while t < seconds:
        jobs.append(Job(t, job_seconds.draw(rng)))
        t += rng.expovariate(rate)
    return jobs


def diurnal(peak: float, hours: float, job_seconds: JobSeconds, rng: random.Random) -> list[Job]:
    """A day's shape: the rate rises from 0 at midnight to ``peak`` at noon and back, over ``hours``.

    The rate is ``peak * (1 - cos(2 pi t / day)) / 2``, so a day holds
    ``peak * 43200`` jobs on average. Drawn by thinning a Poisson stream at ``peak``.
    """
    seconds = hours * 3600.0
    jobs: list[Job] = []
    if peak <= 0:
        return jobs
    t = rng.expovariate(peak)
    while t < seconds:
        if rng.random() * 2.0 < 1.0 - math.cos(2.0 * math.pi * t / DAY):
            jobs.append(Job(t, job_seconds.draw(rng)))
        t += rng.expovariate(peak)
    return jobs


def bursts(count: int, size: int, gap: float, job_seconds: JobSeconds, rng: random.Random) -> list[Job]:
    """``count`` bursts of ``size`` jobs arriving together, ``gap`` seconds from one burst to the next."""
    return [Job(i * gap, job_seconds.draw(rng)) for i in range(count) for _ in range(size)]


def describe(jobs: list[Job]) -> str:
    if not jobs:
        return "no jobs"
    span = max(j.arrival + j.duration for j in jobs)
    busy = sum(j.duration for j in jobs)
    return f"{len(jobs)} jobs over {_span(span)}, {busy / len(jobs):.1f}s each on average"


def _span(seconds: float) -> str:
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"
