"""The dispatcher's ledger, on the user's side: what it knows of jobs and sessions, and how many sessions to open.

The dispatcher feeds it what the queue pushes (job ids as they are
published, the consumers' job events), what the SDK tells (a session asked
for, reserved, timed out) and, now and then, the queue's own counts; it
answers ``to_open(max_sessions)``:

    open = clamp(pending - unclaimed, 0, max_sessions - alive)

- ``pending``: jobs not yet delivered to any consumer, handed-back jobs
  included. Known by id from the push feeds, plus ``extra``: jobs the queue
  counts that no push named (published before the dispatcher started, or
  redelivered after a lost worker's AckWait).
- ``unclaimed``: this dispatcher's sessions no consumer has taken a job on
  yet, those still waiting for a worker included (not counting them is how
  KEDA's ScaledJob over-scales).
- ``alive``: sessions asked for and not yet ended.

A job in flight already has its worker and never counts. A job whose worker
was lost counts again only once the queue hands it back (AckWait later):
the dispatcher then reads the queue's counts, and ``extra`` takes it in.

Without events the ledger still finds every job: ``orphans`` are the jobs the
queue counts in flight beyond the endpoint's workers that hold a session (and
beyond the lost jobs known by id), for a whole AckWait without a break. Their
claims have lapsed; NATS keeps such a job in flight until some consumer
fetches again, so each gets a session. A consumer holds a job only while its
worker holds a session, so a job that really runs is never counted.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.null.protocol import ABANDONED, CLAIMED, DEAD, DONE, FINISHED, RELEASED, RETRY, STARTED, JobEvent
from workers.null.queues.base import Depth

# Job states.
PENDING = "pending"  # waiting in the queue, counted by id
RUNNING = "running"  # claimed by a consumer
LAPSING = "lapsing"  # its worker or lease was lost: the queue hands it back after AckWait
UNSEEN = "unseen"  # named by a push once, but the queue no longer counts it as pending
DONE_STATE = "done"
DEAD_STATE = "dead"
ENDED = (DONE_STATE, DEAD_STATE)

# How long a job id counted as pending is trusted against queue counts that disagree:
# a publish can reach the dispatcher before the stream has stored it.
TRUST_PENDING = 2.0
# Events for a session id no session of ours holds (yet) are kept this long.
EARLY_KEEP = 120.0


# The dispatcher's cap on sessions alive at once, unless told otherwise: so on workers.
DEFAULT_MAX_SESSIONS = 10


def to_open(pending: int, unclaimed: int, alive: int, max_sessions: int) -> int:
    """Sessions to ask for now: enough for the jobs no session covers, never past ``max_sessions``."""
    return max(0, min(pending - unclaimed, max_sessions - alive))


@dataclass
class SessionRecord:
    key: int
    asked_at: float
    reserved_at: float | None = None
    session_id: str = ""
    url: str = ""
    job_id: str | None = None  # set by the consumer's "claimed" event
    attempt: int | None = None
    ended_at: float | None = None
    end: str = ""  # released, timed out, lost, closed, failed: ...

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    @property
    def reserved(self) -> bool:
        return self.reserved_at is not None


@dataclass
class Attempt:
    """One delivery of a job: a line of the job log."""

    job_id: str
    attempt: int
    enqueued: float | None
    session_id: str
    session: SessionRecord | None = None
    claimed: float | None = None
    started: float | None = None
    finished: float | None = None
    outcome: str | None = None  # done, retry, dead, abandoned, lost
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        s = self.session
        return {
            "job_id": self.job_id,
            "attempt": self.attempt,
            "enqueued": self.enqueued,
            "session_asked": s.asked_at if s else None,
            "reserved": s.reserved_at if s else None,
            "claimed": self.claimed,
            "started": self.started,
            "finished": self.finished,
            "outcome": self.outcome,
            "session_id": self.session_id,
            "worker": s.url if s else "",
            "detail": self.detail,
        }


@dataclass
class JobRecord:
    id: str
    enqueued: float | None
    state: str
    since: float
    attempts: dict[int, Attempt] = field(default_factory=dict)
    starts: int = 0  # attempts whose handler started
    due_at: float | None = None  # LAPSING: when the queue hands it back

    @property
    def current(self) -> Attempt | None:
        return self.attempts[max(self.attempts)] if self.attempts else None


@dataclass
class Early:
    """Events for a session id before the SDK told us which of our sessions holds it."""

    at: float
    job_id: str | None = None
    attempt: int | None = None
    released: bool = False


class Ledger:
    def __init__(
        self,
        *,
        ack_wait: float,
        clock: Callable[[], float] = time.time,
        on_attempt: Callable[[Attempt], None] | None = None,
    ):
        self.ack_wait = ack_wait
        self.clock = clock
        self.on_attempt = on_attempt  # called once per attempt, when its outcome is known
        self.jobs: dict[str, JobRecord] = {}
        self.sessions: dict[int, SessionRecord] = {}
        self.by_sid: dict[str, SessionRecord] = {}
        self.early: dict[str, Early] = {}
        self.extra = 0
        self.held: int | None = None  # the endpoint's workers holding a session; None: not known
        self.orphans = 0
        self._surplus: deque[tuple[float, int]] = deque()  # (when, in flight beyond what is held)
        self.version = 0  # bumped on every change the counts depend on
        self.due: list[float] = []  # when the queue should hand lapsing jobs back: read its counts then
        self._keys = itertools.count(1)
        self.asked = 0  # sessions ever asked for
        self.peak_alive = 0  # the most sessions alive at once

    # -- counts -------------------------------------------------------------

    @property
    def pending(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state == PENDING) + self.extra + self.orphans

    @property
    def alive(self) -> int:
        return sum(1 for s in self.sessions.values() if s.alive)

    @property
    def unclaimed(self) -> int:
        return sum(1 for s in self.sessions.values() if s.alive and s.job_id is None)

    @property
    def waiting_for_worker(self) -> int:
        return sum(1 for s in self.sessions.values() if s.alive and not s.reserved)

    @property
    def running(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state == RUNNING)

    def count(self, state: str) -> int:
        return sum(1 for j in self.jobs.values() if j.state == state)

    @property
    def twice(self) -> int:
        """Jobs whose handler was started in more than one attempt."""
        return sum(1 for j in self.jobs.values() if j.starts > 1)

    def to_open(self, max_sessions: int) -> int:
        return to_open(self.pending, self.unclaimed, self.alive, max_sessions)

    def _changed(self) -> None:
        self.version += 1

    # -- what the queue pushes ------------------------------------------------

    def job_published(self, job_id: str, at: float | None = None) -> None:
        if job_id in self.jobs:  # a repeated publish the server dropped, or a push after a claim
            return
        now = self.clock()
        self.jobs[job_id] = JobRecord(job_id, at if at is not None else now, PENDING, now)
        self._changed()

    def event(self, ev: JobEvent) -> None:
        if not ev.job_id:
            if ev.kind == RELEASED:  # a session released without a job
                self._session_event(ev.session_id, released=True)
            return
        job = self._job(ev.job_id)
        row = self._attempt(job, ev)
        if ev.kind == CLAIMED:
            self._claimed(job, row, ev.at)
            self._session_event(ev.session_id, job_id=job.id, attempt=ev.attempt)
        elif ev.kind == STARTED:
            if row.started is None:
                row.started = ev.at
                job.starts += 1
        elif ev.kind == FINISHED:
            self._finished(job, row, ev)
        elif ev.kind == RELEASED:
            self._session_event(ev.session_id, job_id=job.id, attempt=ev.attempt, released=True)
        self._changed()

    def _job(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:  # published before we listened, or by a push we missed
            job = self.jobs[job_id] = JobRecord(job_id, None, UNSEEN, self.clock())
        return job

    def _attempt(self, job: JobRecord, ev: JobEvent) -> Attempt:
        row = job.attempts.get(ev.attempt)
        if row is None:
            row = job.attempts[ev.attempt] = Attempt(job.id, ev.attempt, job.enqueued, ev.session_id)
            row.session = self.by_sid.get(ev.session_id)
        return row

    def _claimed(self, job: JobRecord, row: Attempt, at: float) -> None:
        if row.claimed is None:
            row.claimed = at
        if job.state in ENDED:
            return
        if job.state != PENDING and self.extra > 0:
            # Not counted by id, so it was one of the jobs only the queue's counts showed.
            self.extra -= 1
        for number, earlier in job.attempts.items():
            if number < row.attempt and earlier.outcome is None:
                self._settle(earlier, "lost", "delivered again before it finished")
        job.state, job.since = RUNNING, self.clock()

    def _finished(self, job: JobRecord, row: Attempt, ev: JobEvent) -> None:
        if row.outcome is not None and row.outcome != "lost":
            return
        row.finished = ev.at
        self._settle(row, ev.outcome or "", ev.detail)
        if job.state in ENDED or job.current is not row:
            return
        now = self.clock()
        if ev.outcome == DONE:
            job.state, job.since = DONE_STATE, now
        elif ev.outcome == DEAD:
            job.state, job.since = DEAD_STATE, now
        elif ev.outcome == RETRY:
            job.state, job.since = PENDING, now
        elif ev.outcome == ABANDONED:
            self._lapse(job, now)

    def _lapse(self, job: JobRecord, now: float) -> None:
        job.state, job.since, job.due_at = LAPSING, now, now + self.ack_wait
        self.due.append(job.due_at)

    def tick(self) -> bool:
        """Lapsing jobs whose AckWait has passed are pending again; True when one was.

        Neither queue counts such a job as pending before a consumer fetches it
        (JetStream keeps it in num_ack_pending, Redis in the group's pending
        list), so the dispatcher counts it by id.
        """
        now = self.clock()
        back = [j for j in self.jobs.values() if j.state == LAPSING and j.due_at is not None and j.due_at <= now]
        for job in back:
            job.state, job.since, job.due_at = PENDING, now, None
        self.due = [t for t in self.due if t > now]
        if back:
            self._changed()
        return bool(back)

    def _settle(self, row: Attempt, outcome: str, detail: str) -> None:
        first = row.outcome is None
        row.outcome, row.detail = outcome, detail
        if first and self.on_attempt is not None:
            self.on_attempt(row)

    def _session_event(
        self, sid: str, *, job_id: str | None = None, attempt: int | None = None, released: bool = False
    ) -> None:
        rec = self.by_sid.get(sid)
        if rec is None:
            early = self.early.setdefault(sid, Early(self.clock()))
            early.job_id = job_id or early.job_id
            early.attempt = attempt or early.attempt
            early.released = early.released or released
            return
        if job_id is not None and rec.job_id is None:
            rec.job_id, rec.attempt = job_id, attempt
        if released and rec.alive:
            self._end(rec, "released")

    # -- what the queue's counts say -------------------------------------------

    def depth_seen(self, depth: Depth) -> None:
        """The queue's counts, read while no push arrived: they correct what the pushes missed.

        ``depth.pending`` counts jobs never delivered (or handed back at once);
        a job handed back after a lapsed claim is counted by id (``tick``).
        """
        now = self.clock()
        self.tick()
        fresh = [j for j in self.jobs.values() if j.state == PENDING and not j.attempts]
        back = [j for j in self.jobs.values() if j.state == PENDING and j.attempts]
        if depth.pending >= len(fresh):
            self.extra = depth.pending - len(fresh)
        else:
            # The queue holds fewer than we counted: drop the oldest of ours
            # (their claims were never reported), but not ones just published.
            self.extra = 0
            self._unsee(fresh, len(fresh) - depth.pending, now)
        # Jobs handed back hide in the queue's in-flight count; more of them
        # than the queue holds at all were acked without our hearing of it.
        held = depth.pending + depth.in_flight
        self._unsee(back, len(fresh) + len(back) + self.extra - held, now)
        self._count_orphans(depth, now)
        for sid in [s for s, e in self.early.items() if e.at < now - EARLY_KEEP]:
            del self.early[sid]
        self._changed()

    def workers_seen(self, held: int | None) -> None:
        """How many of the endpoint's workers hold a session now (None: the endpoint could not say)."""
        self.held = held

    def _count_orphans(self, depth: Depth, now: float) -> None:
        if self.held is None:
            self.orphans = 0
            self._surplus.clear()
            return
        known = self.count(LAPSING) + sum(1 for j in self.jobs.values() if j.state == PENDING and j.attempts)
        self._surplus.append((now, max(0, depth.in_flight - self.held - known)))
        while len(self._surplus) > 1 and self._surplus[1][0] <= now - self.ack_wait:
            self._surplus.popleft()
        spans = self._surplus[0][0] <= now - self.ack_wait
        self.orphans = min(surplus for _, surplus in self._surplus) if spans else 0

    @staticmethod
    def _unsee(jobs: list[JobRecord], surplus: int, now: float) -> None:
        for job in sorted(jobs, key=lambda j: j.since):
            if surplus <= 0 or job.since > now - TRUST_PENDING:
                break
            job.state, job.since = UNSEEN, now
            surplus -= 1

    def next_due(self) -> float | None:
        return min(self.due) if self.due else None

    # -- what the SDK tells ---------------------------------------------------

    def session_asked(self) -> SessionRecord:
        rec = SessionRecord(next(self._keys), self.clock())
        self.sessions[rec.key] = rec
        self.asked += 1
        self.peak_alive = max(self.peak_alive, self.alive)
        self._changed()
        return rec

    def session_reserved(self, rec: SessionRecord, session_id: str, url: str) -> None:
        rec.reserved_at, rec.session_id, rec.url = self.clock(), session_id, url
        self.by_sid[session_id] = rec
        early = self.early.pop(session_id, None)
        if early is not None:
            if early.job_id is not None:
                rec.job_id, rec.attempt = early.job_id, early.attempt
            if early.released:
                self._end(rec, "released")
        if rec.job_id is not None:
            job = self.jobs.get(rec.job_id)
            if job is not None and rec.attempt in job.attempts:
                job.attempts[rec.attempt].session = rec
        self._changed()

    def session_ended(self, rec: SessionRecord, how: str) -> None:
        if rec.alive:
            self._end(rec, how)
            self._changed()

    def session_gone(self, rec: SessionRecord) -> None:
        """The worker no longer holds the session and no event said it ended: a lost worker if it ran a job."""
        if not rec.alive:
            return
        job = self.jobs.get(rec.job_id) if rec.job_id else None
        row = job.attempts.get(rec.attempt) if job is not None and rec.attempt is not None else None
        if job is not None and row is not None and row.outcome is None:
            self._settle(row, "lost", "the worker stopped answering for its session")
            if job.state == RUNNING and job.current is row:
                self._lapse(job, self.clock())
            self._end(rec, "lost")
        else:
            # Released without a job (or its events never came): whatever it
            # held is the queue's to hand back; read its counts after AckWait.
            self.due.append(self.clock() + self.ack_wait)
            self._end(rec, "ended")
        self._changed()

    def _end(self, rec: SessionRecord, how: str) -> None:
        rec.ended_at, rec.end = self.clock(), how

    # -- the end --------------------------------------------------------------

    def unfinished(self) -> list[Attempt]:
        return [row for job in self.jobs.values() for row in job.attempts.values() if row.outcome is None]
