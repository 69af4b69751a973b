"""Many parameter sets over one trace: the cross product, run over processes, and the choice among them."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lib.planner.model import Plan, Result, simulate
from lib.planner.trace import Job

# The trace a pool's processes replay, set once per process by the pool's
# initializer so it is sent to each process once rather than with every set;
# and the jobs started so far in each set, shared with the parent for its progress line.
_pool_jobs: Sequence[Job] = ()
_pool_seed = 0
_pool_started: Any = None

# How often the parent looks at the sets under way while none has finished.
_PROGRESS_POLL = 0.5


def _init_pool(jobs: Sequence[Job], seed: int, started: Any) -> None:
    # Ctrl-C and SIGTERM are the parent's to handle: it ends the pool, which stops each process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    global _pool_jobs, _pool_seed, _pool_started
    _pool_jobs, _pool_seed, _pool_started = jobs, seed, started


def _run_one(item: tuple[int, Plan]) -> Result:
    index, plan = item

    def tell(started: int) -> None:
        _pool_started[index] = started

    result = simulate(_pool_jobs, plan, seed=_pool_seed, progress=tell)
    _pool_started[index] = len(_pool_jobs)
    return result


def run_sweep(
    jobs: Sequence[Job],
    plans: Sequence[Plan],
    *,
    seed: int = 0,
    processes: int = 1,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[Result]:
    """Each plan's result, in the order given.

    ``progress(done, total, share)``: ``done`` sets of ``total`` are back, and ``share`` of
    all their jobs have started, counting the sets under way; called as each set comes
    back and while one runs.
    """
    total = len(plans)
    all_jobs = max(len(jobs) * total, 1)
    results: list[Result] = []
    if processes <= 1 or total <= 1:
        for plan in plans:
            before = len(results) * len(jobs)

            def tell(started: int, before: int = before) -> None:
                if progress:
                    progress(len(results), total, (before + started) / all_jobs)

            results.append(simulate(jobs, plan, seed=seed, progress=tell))
            if progress:
                progress(len(results), total, len(results) * len(jobs) / all_jobs)
        return results
    # fork shares the trace without pickling it where the platform allows.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    started = context.RawArray("q", total)
    pool = context.Pool(min(processes, total), _init_pool, (jobs, seed, started))
    try:
        answers = pool.imap(_run_one, enumerate(plans))
        while len(results) < total:
            try:
                results.append(answers.next(timeout=_PROGRESS_POLL))
            except multiprocessing.TimeoutError:
                pass  # none back yet: the line still moves with the sets under way
            if progress:
                progress(len(results), total, sum(started) / all_jobs)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return results


def default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pareto_front(results: Sequence[Result]) -> list[int]:
    """Indices of the sets no other set beats on both cost and p95 wait, cheapest first."""
    points = [(r.cost, r.wait_stats()["p95"], i) for i, r in enumerate(results)]
    front = []
    best_p95 = float("inf")
    for _cost, p95, i in sorted(points):
        if p95 < best_p95 - 1e-9:
            front.append(i)
            best_p95 = p95
    return front


def cheapest_within(results: Sequence[Result], max_p95: float) -> int | None:
    """The index of the cheapest set whose p95 wait is at most ``max_p95`` (the lower p95 on a tie)."""
    meeting = [(r.cost, r.wait_stats()["p95"], i) for i, r in enumerate(results) if r.wait_stats()["p95"] <= max_p95]
    return min(meeting)[2] if meeting else None


@dataclass
class Progress:
    """A line on stderr for sweeps that take more than a moment: redrawn on a terminal, else every tenth."""

    stream: Any = sys.stderr
    after: float = 1.0
    # On a terminal, the least time between two redraws.
    every: float = 0.2
    started: float = 0.0
    _last_tenth: int = -1
    _last_drawn: float = -math.inf
    _last_width: int = 0

    def __post_init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, done: int, total: int, share: float) -> None:
        """``done`` sets of ``total`` are back; ``share`` of all their jobs have started."""
        now = time.monotonic()
        elapsed = now - self.started
        finished = done >= total
        if elapsed < self.after:
            return
        text = f"replayed {done}/{total} parameter set{'s' if total > 1 else ''}"
        if not finished:
            # A set's jobs start unevenly in time (a backlog slows the replay), so the time left
            # is told from whole sets only.
            text += f", {100 * share:.0f}% of all jobs started"
        text += f", {elapsed:.0f}s elapsed"
        if 0 < done < total:
            text += f", about {elapsed / done * (total - done):.0f}s left"
        tty = getattr(self.stream, "isatty", lambda: False)()
        if tty:
            if finished or now - self._last_drawn >= self.every:
                self._last_drawn = now
                # Spaces over what a longer line before left.
                self.stream.write("\r" + text.ljust(self._last_width) + ("\n" if finished else ""))
                self._last_width = len(text)
                self.stream.flush()
        else:
            tenth = 10 if finished else min(int(share * 10), 9)
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self.stream.write(text + "\n")
                self.stream.flush()
