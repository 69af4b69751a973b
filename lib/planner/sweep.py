"""Many parameter sets over one trace: the cross product, run over processes, and the choice among them."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lib.planner.model import Plan, Result, simulate
from lib.planner.trace import Job

# The trace a pool's processes replay, set once per process by the pool's
# initializer so it is sent to each process once rather than with every set.
_pool_jobs: Sequence[Job] = ()
_pool_seed = 0


def _init_pool(jobs: Sequence[Job], seed: int) -> None:
    # Ctrl-C and SIGTERM are the parent's to handle: it ends the pool, which stops each process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    global _pool_jobs, _pool_seed
    _pool_jobs, _pool_seed = jobs, seed


def _run_one(plan: Plan) -> Result:
    return simulate(_pool_jobs, plan, seed=_pool_seed)


def run_sweep(
    jobs: Sequence[Job],
    plans: Sequence[Plan],
    *,
    seed: int = 0,
    processes: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Result]:
    """Each plan's result, in the order given; ``progress(done, total)`` after each."""
    total = len(plans)
    results: list[Result] = []
    if processes <= 1 or total <= 1:
        for plan in plans:
            results.append(simulate(jobs, plan, seed=seed))
            if progress:
                progress(len(results), total)
        return results
    # fork shares the trace without pickling it where the platform allows.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(min(processes, total), _init_pool, (jobs, seed))
    try:
        for result in pool.imap(_run_one, plans):
            results.append(result)
            if progress:
                progress(len(results), total)
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

    stream: object = sys.stderr
    after: float = 1.0
    started: float = 0.0
    _last_tenth: int = -1

    def __post_init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed < self.after:
            return
        tty = getattr(self.stream, "isatty", lambda: False)()
        left = elapsed / done * (total - done) if done else 0.0
        text = f"simulated {done}/{total} parameter sets, {elapsed:.0f}s elapsed, about {left:.0f}s left"
        if tty:
            self.stream.write("\r" + text + ("\n" if done == total else ""))
            self.stream.flush()
        else:
            tenth = done * 10 // total
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self.stream.write(text + "\n")
                self.stream.flush()
