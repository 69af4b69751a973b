"""Replays a job trace through the stand-in's own book and scaling model on a virtual clock.

The clock jumps from event to event: a job arrives, a waiting session asks
again, a worker is ready after its cold start, a job ends, a stopping worker
is gone, or the moment the book's ``next_wakeup`` names (a hold running out,
a decision that can next change). At each moment the planner feeds the
events to ``lib.standin.book.Book``, the bookkeeping the real-time stand-in
drives, calls its ``step`` and carries out its commands, as the stand-in's
fleet does; ``decide`` and ``choose_worker``'s rule run inside it.

The planner plays the parts that are not the autoscaler's:

- the dispatcher opens one session (cost ``SESSION_COST``) per pending job that no
  session is already waiting for: ``open = clamp(pending - unclaimed, 0,
  max_sessions - alive)``, counting sessions still waiting for a worker;
- the SDK routes each session (``hold``: the stand-in's route hold) and,
  when a hold ends with no worker, pauses as ``vastai`` does and asks again;
- a session routed to a worker is claimed at once by that worker's consumer,
  which takes the oldest pending job: the job's wait is that moment minus its
  arrival, and the worker reports the session until the job ends;
- a worker is ready its cold start (or resume time) after the book asks for
  it (the n-th worker provisioned takes ``cold_start_each[n]`` where given),
  and stops ``stop_seconds`` after the book says so.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from lib.planner.trace import Job
from lib.standin.book import Answer, Book, BookSettings, Command, Provision, Report, Resume, Stop
from lib.standin.params import PARAMS, Kind, default
from lib.standin.scaling import COLD, LIVE, LOADING, PROVISIONING, READY, STOPPING, EndpointParams, LocalPolicy, Phase
from workers.null.dispatch.summary import percentile
from workers.null.protocol import SESSION_COST

RUNNING_PHASES = (PROVISIONING, LOADING, READY, STOPPING)

# The SDK's pauses between /route/ calls while a session waits (vastai.serverless.client):
# 1 s, then random and growing, up to the client's max_poll_interval (the plan's max_poll).
SDK_FIRST_POLL = 1.0

# A replay tells its progress (the jobs started so far) after every this many job starts.
PROGRESS_EVERY = 1024

# Event kinds, in the order they are handled when they fall on the same moment.
_STOPPED, _JOB_END, _UP, _ARRIVAL, _ROUTE, _WAKE = range(6)


@dataclass(frozen=True)
class Plan:
    """One parameter set: the endpoint's parameters, the cold start and the prices."""

    params: EndpointParams = field(default_factory=EndpointParams)
    policy: LocalPolicy = field(default_factory=LocalPolicy)
    # Seconds from starting a worker to its ready report, drawn uniformly in [low, high].
    cold_start: tuple[float, float] = default("cold_start")
    # Seconds from resuming a cold (stopped) worker to its ready report; None: the cold start.
    resume: tuple[float, float] | None = default("resume")
    # The cold starts of the first workers provisioned, in order (a measured run's); later ones draw from cold_start.
    cold_start_each: tuple[float, ...] = ()
    # Seconds a worker spends stopping (billed) before it is gone or cold.
    stop_seconds: float = default("stop_seconds")
    # The dispatcher's cap on sessions alive at once; None: no cap.
    max_sessions: int | None = default("max_sessions")
    # How long the autoscaler holds a /route/ call open for a worker to free up (the stand-in's 6 s;
    # Vast's is not published). 0: it answers at once and the SDK polls.
    route_hold: float = default("route_hold")
    # The SDK client's max_poll_interval: the longest pause between /route/ calls of a waiting session.
    max_poll: float = default("max_poll")
    price_running: float = default("price_running")  # per hour
    price_stopped: float = default("price_stopped")  # per hour

    @classmethod
    def of(cls, values: Mapping[str, Any], **rest: Any) -> Plan:
        """The plan of ``values`` named as in ``lib.standin.params``: the endpoint's, the policy's and its own."""
        parts = {kind: {f.name for f in fields(kind)} for kind in (EndpointParams, LocalPolicy, cls)}
        unknown = set(values) - set().union(*parts.values())
        if unknown:
            raise ValueError(f"no parameter named {', '.join(sorted(unknown))}")
        params, policy, own = ({k: v for k, v in values.items() if k in names} for names in parts.values())
        return cls(params=EndpointParams(**params), policy=LocalPolicy(**policy), **own, **rest)

    def value(self, name: str) -> Any:
        """The value ``lib.standin.params`` names ``name``: the endpoint's, the policy's or the plan's own."""
        for part in (self.params, self.policy, self):
            if name in part.__dataclass_fields__:
                return getattr(part, name)
        raise KeyError(name)

    def problems(self) -> list[str]:
        found = list(self.params.problems())
        for name, span in (("cold_start", self.cold_start), ("resume", self.resume)):
            if span is not None and not (0 <= span[0] <= span[1] and math.isfinite(span[1])):
                found.append(f"{name} {span[0]:g}:{span[1]:g} must be seconds >= 0 with MIN <= MAX")
        for n, seconds in enumerate(self.cold_start_each, start=1):
            if not (seconds >= 0 and math.isfinite(seconds)):
                found.append(f"cold start {n} of cold_start_each, {seconds}, must be seconds >= 0")
                break
        if not (self.stop_seconds >= 0 and math.isfinite(self.stop_seconds)):
            found.append(f"stop_seconds {self.stop_seconds} must be a number of seconds >= 0")
        if not (self.route_hold >= 0 and math.isfinite(self.route_hold)):
            found.append(f"route_hold {self.route_hold} must be a number of seconds >= 0")
        if not (self.max_poll > 0.1 and math.isfinite(self.max_poll)):
            found.append(f"max_poll {self.max_poll} must be a number of seconds > 0.1")
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
        """Every swept value under its name, then the measured cold starts; a span as a number or [MIN, MAX]."""
        found: dict[str, Any] = {}
        for param in PARAMS:
            value = self.value(param.name)
            if param.kind is Kind.SPAN:
                # An unset resume takes the cold start: the JSON says what was replayed.
                value = _span_value(value if value is not None else self.cold_start)
            found[param.name] = value
        found["cold_start_each"] = list(self.cold_start_each)
        return found


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
    peak_sessions: int  # most sessions the dispatcher had alive at once
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
        if not self.waits:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
        return {
            "p50": percentile(self.waits, 50),
            "p95": percentile(self.waits, 95),
            "p99": percentile(self.waits, 99),
            "max": max(self.waits),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.plan.as_dict(),
            "jobs": self.jobs,
            "cold_starts": self.cold_starts,
            "resumed": self.resumed,
            "peak_workers": self.peak_workers,
            "peak_sessions": self.peak_sessions,
            "wait_s": {k: round(v, 6) for k, v in self.wait_stats().items()},
            "billed_worker_s": round(self.billed_worker_s, 3),
            "cold_worker_s": round(self.cold_worker_s, 3),
            "busy_worker_s": round(self.busy_worker_s, 3),
            "cost": round(self.cost, 6),
            "horizon_s": round(self.horizon_s, 3),
        }


# Timeline columns after the time: queue depth (pending jobs), then workers by phase.
TIMELINE_PHASES = (PROVISIONING, LOADING, READY, STOPPING, COLD)


class _PhaseClock:
    """Each worker's phase and since when, to bill it by the second; kept beside the book's own phases."""

    def __init__(self) -> None:
        self.phase: dict[int, Phase] = {}
        self.since: dict[int, float] = {}
        self.generation: dict[int, int] = {}
        self.counts = {phase: 0 for phase in Phase}
        self.seconds = {phase: 0.0 for phase in Phase}
        self.live = 0  # provisioning, loading or ready

    def enter(self, worker_id: int, phase: Phase | None, now: float) -> int:
        """Moves the worker to ``phase`` (None: gone) and returns its new generation."""
        old = self.phase.get(worker_id)
        if old is not None:
            self.seconds[old] += now - self.since[worker_id]
            self.counts[old] -= 1
            if old in LIVE:
                self.live -= 1
        generation = self.generation.get(worker_id, 0) + 1
        if phase is None:
            self.phase.pop(worker_id, None)
            self.since.pop(worker_id, None)
            self.generation.pop(worker_id, None)
            return generation
        self.phase[worker_id] = phase
        self.since[worker_id] = now
        self.generation[worker_id] = generation
        self.counts[phase] += 1
        if phase in LIVE:
            self.live += 1
        return generation

    def close(self, now: float) -> dict[str, float]:
        totals = dict(self.seconds)
        for worker_id, phase in self.phase.items():
            totals[phase] += max(0.0, now - self.since[worker_id])
        return {phase.value: seconds for phase, seconds in totals.items()}


class _Sim:
    def __init__(
        self,
        jobs: Sequence[Job],
        plan: Plan,
        seed: int,
        record: bool,
        exact: bool = False,
        progress: Callable[[int], None] | None = None,
    ):
        self.jobs = jobs
        self.plan = plan
        self.rng = random.Random(seed)  # cold starts
        self.polls = random.Random(seed + 7919)  # the SDK's pauses between /route/ calls
        # A modelled worker always gets ready, however long its cold start or resume takes.
        settings = BookSettings(
            params=plan.params, policy=plan.policy, route_hold=plan.route_hold, load_timeout=math.inf
        )
        self.book = Book(settings, 0.0)
        self.phases = _PhaseClock()
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = itertools.count()
        self.pending: deque[int] = deque()  # jobs arrived, not yet taken by a consumer
        self.unclaimed = 0  # sessions asked for, no job taken on them yet
        self.alive = 0  # sessions asked for and not yet ended
        self.next_session = itertools.count(1)
        self.attempts: dict[int, int] = {}  # waiting session -> /route/ calls it has made
        self.empty_reports: dict[int, Report] = {}
        self.waits = [0.0] * len(jobs)
        self.started = 0  # jobs a consumer has taken
        self.progress = progress
        self.cold_starts = 0
        self.resumed = 0
        self.provisioned = 0
        self.peak = 0
        self.peak_sessions = 0
        self.busy = 0.0
        self.wake_at = math.inf
        self.last_change = 0.0  # the last event that changed something, other than a wake, or the last command
        self.record = record
        # Step the book after every event and command, as the real-time stand-in does;
        # slower, and equal in every figure (a test holds the two to that).
        self.exact = exact
        self.timeline: list[tuple[float, int, int, int, int, int, int]] = []

    # -- the loop ------------------------------------------------------------

    def run(self) -> Result:
        # The arrivals are taken in trace order beside the heap of the other events, which
        # stays as small as what is under way: as if each were in the heap at (arrival, _ARRIVAL).
        heap = self.heap
        arrivals = [job.arrival for job in self.jobs]
        arrivals.append(math.inf)
        nxt = 0
        now = 0.0
        self._settle(now)
        while heap or arrivals[nxt] < math.inf:
            now = heap[0][0] if heap and heap[0][0] < arrivals[nxt] else arrivals[nxt]
            moved = False
            while True:
                if heap and heap[0][0] <= now and (heap[0][1] < _ARRIVAL or arrivals[nxt] > now):
                    _, kind, _, a, b = heapq.heappop(heap)
                    moved = self._handle(now, kind, a, b) or moved
                elif arrivals[nxt] <= now:
                    moved = self._handle(now, _ARRIVAL, nxt, 0) or moved
                    nxt += 1
                else:
                    break
            if moved:
                self._settle(now)
            elif self.record:
                self._mark(now)  # a worker gone: no step, but the timeline shows it
        # The run ends when the last job has arrived and the fleet last changed; an event that changed
        # nothing (a wake that asked for nothing, a superseded start) does not lengthen it.
        horizon = max(self.last_change, self.jobs[-1].arrival if self.jobs else 0.0)
        phase_s = self.phases.close(horizon)
        billed = sum(phase_s[p.value] for p in RUNNING_PHASES)
        return Result(
            plan=self.plan,
            jobs=len(self.jobs),
            waits=self.waits,
            cold_starts=self.cold_starts,
            resumed=self.resumed,
            peak_workers=self.peak,
            peak_sessions=self.peak_sessions,
            billed_worker_s=billed,
            cold_worker_s=phase_s[COLD.value],
            busy_worker_s=self.busy,
            horizon_s=horizon,
            phase_s=phase_s,
            timeline=self.timeline if self.record else None,
        )

    def _push(self, at: float, kind: int, a: int, b: int = 0) -> None:
        heapq.heappush(self.heap, (at, kind, next(self.seq), a, b))

    def _handle(self, now: float, kind: int, a: int, b: int) -> bool:
        """Takes one event; False when it changed nothing (a stale wake or a superseded start)."""
        book = self.book
        if kind == _WAKE:
            if now != self.wake_at:
                return False  # the book has since named another moment, or none
            self.wake_at = math.inf
            return True
        if kind == _ROUTE and a not in self.attempts:
            return False  # it has its worker already
        if kind in (_UP, _STOPPED) and self.phases.generation.get(a) != b:
            return False  # a start or stop superseded by a later command
        self.last_change = now
        if kind == _ARRIVAL:
            self.pending.append(a)
        elif kind == _ROUTE:
            self._route(now, a)
        elif kind == _JOB_END:
            # The consumer acks and releases: the worker reports itself empty.
            # (Its /delete_requests/ entry for the session would end a grant,
            # and the report showing the session already ended that one.)
            book.report(now, self._empty(a))
            self.alive -= 1
        elif kind == _UP:
            book.started(now, a)
            book.report(now, self._empty(a))
            self.phases.enter(a, READY, now)
        elif kind == _STOPPED:
            book.stopped(now, a)
            worker = book.workers.get(a)
            self.phases.enter(a, worker.phase if worker is not None else None, now)
            # A worker gone was neither live nor cold while it stopped: the
            # decision cannot move, so only a worker kept cold needs a step.
            return worker is not None or self.exact
        return True

    def _empty(self, worker_id: int) -> Report:
        """The worker's report of itself ready and holding nothing; one per worker, as a report is immutable."""
        report = self.empty_reports.get(worker_id)
        if report is None:
            report = self.empty_reports[worker_id] = Report(worker_id=worker_id, cur_load=0.0, max_perf=SESSION_COST)
        return report

    def _settle(self, now: float) -> None:
        """Everything that happens at ``now`` once its events are in: new sessions, the book's step, the next wake."""
        book = self.book
        if len(self.pending) > self.unclaimed:
            self._open_sessions(now)
        # The stand-in steps again after carrying out commands. Here that step
        # would ask for nothing: a decision just applied asks for nothing more,
        # and a session that opened turned its grant into its worker's report
        # of the same cost, so the tally, the room and the deadlines are as the
        # step left them. Only the exact replay takes it: it steps eight times.
        for _ in range(8 if self.exact else 1):
            self._carry_out(book.step(now), now)
        # Only the moment the book names last counts: one it named before, and has since moved
        # on from (the session it waited for got a worker), comes and passes without a step.
        wake = book.next_wakeup(now)
        if wake is None:
            self.wake_at = math.inf
        elif wake != self.wake_at:
            self.wake_at = wake
            self._push(wake, _WAKE, 0)
        live = self.phases.live
        if live > self.peak:
            self.peak = live
        if self.record:
            self._mark(now)

    def _mark(self, now: float) -> None:
        c = self.phases.counts
        self.timeline.append((now, len(self.pending), c[PROVISIONING], c[LOADING], c[READY], c[STOPPING], c[COLD]))

    def _open_sessions(self, now: float) -> None:
        cap = self.plan.max_sessions
        room = (cap - self.alive) if cap is not None else len(self.pending)
        wanted = min(len(self.pending) - self.unclaimed, room)
        for _ in range(max(wanted, 0)):
            session = next(self.next_session)
            self.unclaimed += 1
            self.alive += 1
            self.attempts[session] = 0
            self._route(now, session)
        if self.alive > self.peak_sessions:
            self.peak_sessions = self.alive

    def _route(self, now: float, session: int) -> None:
        """The SDK's /route/ call for ``session`` (its request index): a worker now, or wait."""
        routed = self.book.route(now, SESSION_COST, session, hold=True)
        if routed.worker_id is not None:
            self._start(now, session, routed.worker_id)
        elif routed.held_until is None:
            self._poll_later(now, session)  # answered at once: the SDK pauses and asks again

    def _poll_later(self, now: float, session: int) -> None:
        """The SDK's pause before its next /route/ call: 1 s, then random, growing to at most ``max_poll``."""
        attempt = self.attempts[session]
        self.attempts[session] = attempt + 1
        if attempt == 0:
            pause = SDK_FIRST_POLL
        else:
            # The SDK caps the exponent at 20, which also keeps a session that waits for hours finite.
            growing = 2.0 ** min(attempt, 20) + self.polls.uniform(0.0, 1.0)
            pause = self.polls.uniform(0.1, min(growing, self.plan.max_poll))
        self._push(now + pause, _ROUTE, session)

    def _start(self, now: float, session: int, worker_id: int) -> None:
        """The session opens on ``worker_id`` and its consumer takes the oldest pending job."""
        self.attempts.pop(session, None)
        self.book.report(
            now, Report(worker_id=worker_id, cur_load=SESSION_COST, max_perf=SESSION_COST, working=(session,))
        )
        self.unclaimed -= 1
        job_index = self.pending.popleft()
        job = self.jobs[job_index]
        self.waits[job_index] = now - job.arrival
        self.busy += job.duration
        self.started += 1
        if self.progress is not None and self.started % PROGRESS_EVERY == 0:
            self.progress(self.started)
        self._push(now + job.duration, _JOB_END, worker_id, session)

    def _carry_out(self, commands: Sequence[Command], now: float) -> None:
        """Does what the book asked."""
        phases = self.phases
        if commands:
            self.last_change = now
        for command in commands:
            if isinstance(command, Answer):
                if command.worker_id is not None:
                    self._start(now, command.request_idx, command.worker_id)
                else:
                    self._poll_later(now, command.request_idx)  # its hold is over
            elif isinstance(command, Provision):
                self.cold_starts += 1
                each = self.plan.cold_start_each
                cold = each[self.provisioned] if self.provisioned < len(each) else self._draw(self.plan.cold_start)
                self.provisioned += 1
                generation = phases.enter(command.worker_id, PROVISIONING, now)
                self._push(now + cold, _UP, command.worker_id, generation)
            elif isinstance(command, Resume):
                self.cold_starts += 1
                self.resumed += 1
                generation = phases.enter(command.worker_id, LOADING, now)
                resume = self.plan.resume if self.plan.resume is not None else self.plan.cold_start
                self._push(now + self._draw(resume), _UP, command.worker_id, generation)
            elif isinstance(command, Stop):
                # A worker still provisioning has no process yet: it is gone at once.
                was = phases.phase.get(command.worker_id)
                takes = self.plan.stop_seconds if was in (LOADING, READY) else 0.0
                generation = phases.enter(command.worker_id, STOPPING, now)
                self._push(now + takes, _STOPPED, command.worker_id, generation)

    def _draw(self, span: tuple[float, float]) -> float:
        low, high = span
        return low if low == high else self.rng.uniform(low, high)


def simulate(
    jobs: Sequence[Job],
    plan: Plan,
    *,
    seed: int = 0,
    record: bool = False,
    exact: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """The waits, worker-seconds and cost of ``jobs`` under ``plan``; ``record`` keeps a timeline.

    ``exact`` steps the book after every event, also where a step can ask for nothing.
    ``progress(started)`` is called with the number of jobs started so far, after every
    ``PROGRESS_EVERY`` of them (a backlog makes a replay slow: each waiting session keeps asking).
    """
    return _Sim(jobs, plan, seed, record, exact, progress).run()
