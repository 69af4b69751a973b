"""Replays a job trace through the stand-in's scaling model on a virtual clock.

The clock jumps from event to event: a job arrives, a worker becomes ready
after its cold start, a job ends, a stopping worker is gone, or the scaling
decision can next change (``next_change``). At every such moment the
dispatcher's policy runs, waiting sessions are routed with the stand-in's
``choose_worker``, and the fleet is resized with the stand-in's ``decide``.

The actors, as on a real deployment:

- the dispatcher opens one session (cost ``COST``) per pending job that no
  session is already waiting for: ``open = clamp(pending - unclaimed, 0,
  max_sessions - alive)``, counting sessions still waiting for a worker;
- a session routed to a worker is claimed at once by that worker's consumer,
  which takes the oldest pending job: the job's wait is that moment minus its
  arrival, and the worker holds full load until the job ends;
- the autoscaler (``lib.standin.scaling``) sees the fleet and the waiting
  sessions, and provisions, resumes, stops (keeps cold) or destroys workers.

Billing: every second a worker is provisioning, loading, ready or stopping is
billed at the running price; every second it is stopped and kept cold, at the
stopped price.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lib.planner.book import Book
from lib.planner.trace import Job
from lib.standin.scaling import (
    EPSILON,
    LIVE,
    Decision,
    EndpointParams,
    LocalPolicy,
    Phase,
    Snapshot,
    decide,
    target_workers,
)

# One job is one session of this cost on a worker of this max_perf: the fleet's cost rule.
COST = 100.0
MAX_PERF = 100.0

RUNNING_PHASES = (Phase.PROVISIONING, Phase.LOADING, Phase.READY, Phase.STOPPING)

# Event kinds, in the order they are handled when they fall on the same moment.
_STOPPED, _JOB_END, _READY, _ARRIVAL, _WAKE = range(5)


@dataclass(frozen=True)
class Plan:
    """One parameter set: the endpoint's parameters, the cold start and the prices."""

    params: EndpointParams = field(default_factory=EndpointParams)
    policy: LocalPolicy = field(default_factory=LocalPolicy)
    # Seconds from starting a worker to its ready report, drawn uniformly in [low, high].
    cold_start: tuple[float, float] = (60.0, 60.0)
    # Seconds from resuming a cold (stopped) worker to its ready report; None: the cold start.
    resume: tuple[float, float] | None = None
    # Seconds a worker spends stopping (billed) before it is gone or cold.
    stop_seconds: float = 1.0
    # The dispatcher's cap on sessions alive at once; None: no cap.
    max_sessions: int | None = None
    price_running: float = 0.40  # per hour
    price_stopped: float = 0.01  # per hour

    def problems(self) -> list[str]:
        found = list(self.params.problems())
        for name, span in (("cold_start", self.cold_start), ("resume", self.resume)):
            if span is not None and not (0 <= span[0] <= span[1] and math.isfinite(span[1])):
                found.append(f"{name} {span[0]:g}:{span[1]:g} must be seconds >= 0 with MIN <= MAX")
        if not (self.stop_seconds >= 0 and math.isfinite(self.stop_seconds)):
            found.append(f"stop_seconds {self.stop_seconds} must be a number of seconds >= 0")
        if self.max_sessions is not None and self.max_sessions < 1:
            found.append(f"max_sessions {self.max_sessions} must be >= 1")
        for name in ("price_running", "price_stopped"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                found.append(f"{name} {value} must be a price per hour >= 0")
        if not self.policy.scale_down_delay >= 0:
            found.append(f"scale_down_delay {self.policy.scale_down_delay} must be a number of seconds >= 0")
        return found

    def as_dict(self) -> dict[str, Any]:
        p = self.params
        return {
            "target_util": p.target_util,
            "min_load": p.min_load,
            "max_workers": p.max_workers,
            "cold_workers": p.cold_workers,
            "max_queue_time": p.max_queue_time,
            "target_queue_time": p.target_queue_time,
            "inactivity_timeout": p.inactivity_timeout,
            "cold_start": _span_value(self.cold_start),
            "resume": _span_value(self.resume if self.resume is not None else self.cold_start),
            "stop_seconds": self.stop_seconds,
            "scale_down_delay": self.policy.scale_down_delay,
            "max_sessions": self.max_sessions,
            "price_running": self.price_running,
            "price_stopped": self.price_stopped,
        }


def _span_value(span: tuple[float, float]) -> float | list[float]:
    return span[0] if span[0] == span[1] else [span[0], span[1]]


@dataclass
class Result:
    plan: Plan
    jobs: int
    waits: list[float]  # per job, in arrival order
    cold_starts: int  # worker starts: new workers plus cold workers resumed
    resumed: int
    peak_workers: int  # most live (provisioning, loading, ready) workers at once
    billed_worker_s: float  # provisioning + loading + ready + stopping
    cold_worker_s: float  # stopped and kept cold
    busy_worker_s: float
    horizon_s: float
    phase_s: dict[str, float]
    timeline: list[tuple[float, int, int, int, int, int, int]] | None = None

    @property
    def cost(self) -> float:
        return (self.billed_worker_s * self.plan.price_running + self.cold_worker_s * self.plan.price_stopped) / 3600.0

    def wait_stats(self) -> dict[str, float]:
        ordered = sorted(self.waits)
        return {
            "p50": percentile(ordered, 50),
            "p95": percentile(ordered, 95),
            "p99": percentile(ordered, 99),
            "max": ordered[-1] if ordered else 0.0,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.plan.as_dict(),
            "jobs": self.jobs,
            "cold_starts": self.cold_starts,
            "resumed": self.resumed,
            "peak_workers": self.peak_workers,
            "wait_s": {k: round(v, 6) for k, v in self.wait_stats().items()},
            "billed_worker_s": round(self.billed_worker_s, 3),
            "cold_worker_s": round(self.cold_worker_s, 3),
            "busy_worker_s": round(self.busy_worker_s, 3),
            "cost": round(self.cost, 6),
            "horizon_s": round(self.horizon_s, 3),
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolating between neighbours."""
    if not ordered:
        return 0.0
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# Timeline columns after the time: queue depth (pending jobs), then workers by phase.
TIMELINE_PHASES = (Phase.PROVISIONING, Phase.LOADING, Phase.READY, Phase.STOPPING, Phase.COLD)


class _Sim:
    def __init__(self, jobs: Sequence[Job], plan: Plan, seed: int, record: bool, exact: bool = False):
        self.jobs = jobs
        self.plan = plan
        self.params = plan.params
        self.policy = plan.policy
        self.rng = random.Random(seed)
        self.book = Book(plan.params, plan.policy, perf=MAX_PERF)
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = itertools.count()
        self.pending: deque[int] = deque()  # jobs arrived, not yet taken by a consumer
        self.unclaimed = 0  # sessions asked for, no job taken on them yet
        self.alive = 0  # sessions asked for and not yet ended
        self.next_session = itertools.count(1)
        self.waits = [0.0] * len(jobs)
        self.cold_starts = 0
        self.resumed = 0
        self.peak = 0
        self.busy = 0.0
        self.wake_at = math.inf
        self.record = record
        # Call decide() at every moment, not only when may_change() says it would act: for tests.
        self.exact = exact
        self.timeline: list[tuple[float, int, int, int, int, int, int]] = []

    # -- the loop ------------------------------------------------------------

    def run(self) -> Result:
        for i, job in enumerate(self.jobs):
            self._push(job.arrival, _ARRIVAL, i)
        now = 0.0
        self._settle(now)
        while self.heap:
            now = self.heap[0][0]
            moved = False
            while self.heap and self.heap[0][0] <= now:
                _, kind, _, a, b = heapq.heappop(self.heap)
                moved = self._handle(now, kind, a, b) or moved
            if moved:
                self._settle(now)
        horizon = max(now, self.jobs[-1].arrival if self.jobs else 0.0)
        phase_s = self.book.close(horizon)
        billed = sum(phase_s[p.value] for p in RUNNING_PHASES)
        return Result(
            plan=self.plan,
            jobs=len(self.jobs),
            waits=self.waits,
            cold_starts=self.cold_starts,
            resumed=self.resumed,
            peak_workers=self.peak,
            billed_worker_s=billed,
            cold_worker_s=phase_s[Phase.COLD.value],
            busy_worker_s=self.busy,
            horizon_s=horizon,
            phase_s=phase_s,
            timeline=self.timeline if self.record else None,
        )

    def _push(self, at: float, kind: int, a: int, b: int = 0) -> None:
        heapq.heappush(self.heap, (at, kind, next(self.seq), a, b))

    def _handle(self, now: float, kind: int, a: int, b: int) -> bool:
        """Takes one event; False when nothing the fleet decides on has changed."""
        book = self.book
        if kind == _ARRIVAL:
            self.pending.append(a)
        elif kind == _JOB_END:
            # The consumer acks and releases: the worker is idle, the session ends.
            book.release(a, COST, now)
            self.alive -= 1
        elif kind == _READY:
            return book.ready(a, b, MAX_PERF, now)
        elif kind == _STOPPED:
            # A worker gone was neither live nor cold while stopping: only a new cold one counts.
            return book.stopped(a, b, now) is Phase.COLD
        elif kind == _WAKE:
            if now < self.wake_at:
                return False  # superseded by an earlier wake
            self.wake_at = math.inf
        return True

    def _settle(self, now: float) -> None:
        """Everything that happens at ``now`` once its events are in: sessions, routes, the fleet."""
        book = self.book
        self._open_sessions(now)
        self._route_waiting(now)
        # Only the oldest waiting sessions can move the decision: once the load
        # held plus theirs asks for max_workers, the target is capped whatever
        # follows (target_util <= 1). Passing that prefix gives decide() the
        # same answer at a cost that does not grow with the queue.
        cap = max(0, math.ceil((self.params.max_workers * MAX_PERF - book.held) / COST - EPSILON)) + 1
        for _ in range(4):
            target = target_workers(book.summary(now, cap), self.params, self.policy)
            if not (self.exact or book.may_change(target, now)):
                break
            decision = decide(book.snapshot(now, cap), self.params, self.policy)
            if not decision.changes:
                break
            self._apply(decision, now)
            # A zero cold start makes workers ready at this very moment.
            self._route_waiting(now)
        wake = book.next_change(now, target)
        if wake is not None and wake < self.wake_at:
            self.wake_at = wake
            self._push(wake, _WAKE, 0)
        live = book.live_count
        if live > self.peak:
            self.peak = live
        if self.record:
            counts = book.counts
            self.timeline.append((now, len(self.pending), *(counts[p] for p in TIMELINE_PHASES)))

    def _open_sessions(self, now: float) -> None:
        cap = self.plan.max_sessions
        room = (cap - self.alive) if cap is not None else len(self.pending)
        wanted = min(len(self.pending) - self.unclaimed, room)
        for _ in range(max(wanted, 0)):
            self.book.ask(next(self.next_session), COST, now)
            self.unclaimed += 1
            self.alive += 1

    def _route_waiting(self, now: float) -> None:
        """Hands workers with room to waiting sessions, oldest first; each takes the oldest pending job."""
        for _request_idx, worker_id in self.book.serve(now):
            self.unclaimed -= 1
            job_index = self.pending.popleft()
            job = self.jobs[job_index]
            self.waits[job_index] = now - job.arrival
            self.busy += job.duration
            self._push(now + job.duration, _JOB_END, worker_id)

    def _apply(self, decision: Decision, now: float) -> None:
        book = self.book
        for worker_id in decision.destroy:
            done = book.stop(worker_id, keep=False, now=now)
            if done is not None:
                self._push(
                    now + (self.plan.stop_seconds if done else 0.0), _STOPPED, worker_id, book.generation(worker_id)
                )
        for worker_id in decision.stop:
            done = book.stop(worker_id, keep=True, now=now)
            if done is not None:
                self._push(
                    now + (self.plan.stop_seconds if done else 0.0), _STOPPED, worker_id, book.generation(worker_id)
                )
        resume = self.plan.resume if self.plan.resume is not None else self.plan.cold_start
        for worker_id in decision.resume:
            book.resume(worker_id, now)
            self.cold_starts += 1
            self.resumed += 1
            self._push(now + self._draw(resume), _READY, worker_id, book.generation(worker_id))
        for _ in range(decision.provision):
            worker_id = book.provision(now)
            self.cold_starts += 1
            self._push(now + self._draw(self.plan.cold_start), _READY, worker_id, book.generation(worker_id))

    def _draw(self, span: tuple[float, float]) -> float:
        low, high = span
        return low if low == high else self.rng.uniform(low, high)


def simulate(jobs: Sequence[Job], plan: Plan, *, seed: int = 0, record: bool = False, exact: bool = False) -> Result:
    """The waits, worker-seconds and cost of ``jobs`` under ``plan``; ``record`` keeps a timeline.

    ``exact`` asks ``decide`` at every event instead of only when the fleet
    can change; the answer is the same, only slower (tests compare the two).
    """
    return _Sim(jobs, plan, seed, record, exact).run()


__all__ = ["COST", "EPSILON", "LIVE", "MAX_PERF", "Plan", "Result", "Snapshot", "percentile", "simulate"]
