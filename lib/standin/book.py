"""The fleet's bookkeeping as a state machine: no clock of its own, no I/O.

``Book`` holds what the autoscaler knows between calls: the workers and their
phases, the grants it handed out, the requests waiting for a worker, the
sessions the workers report, the idle clocks and the route hold. Every method
takes ``now`` (seconds, any origin) from its caller, so the real-time
stand-in (``lib.standin.fleet``, on the wall clock) and the planner (on a
virtual clock) drive the very same rules.

Driving it
----------
Events go in as method calls; each returns at once::

    route(now, cost, request_idx, hold=False) -> Routed   # a /route/ call
    route_gone(now, request_idx)        # the client of a held /route/ went away
    report(now, Report) -> bool         # a /worker_status/ body
    deleted(now, worker_id, [Deleted])  # a /delete_requests/ body
    started(now, worker_id)             # its process runs (after Provision or Resume)
    failed(now, worker_id, error)       # its process exited, or could not start
    stopped(now, worker_id)             # its process is gone after a Stop

After every event (and at the moment ``next_wakeup`` names) the driver calls
``step(now) -> list[Command]``: it expires what is due, hands free workers to
held requests, asks ``scaling.decide`` and applies the decision to the book.
The driver carries out the commands, in order:

    Provision(worker_id)        create an instance; call started() once its process runs
                                (after the cold start: the provisioning delay)
    Resume(worker_id)           start a cold instance again; call started() once it runs
    Stop(worker_id, keep, why)  stop its process (keep: its files, to resume later);
                                call stopped() once it is gone
    Answer(request_idx, wid)    answer a held /route/: a grant on worker ``wid``,
                                or (``wid`` None) the waiting answer, its hold over

``next_wakeup(now)``, asked right after ``step(now)``, is when ``step`` must
next run if no event comes first
(None: only an event can change anything): the earliest of
``scaling.next_change`` for the current snapshot, a grant's timeout, a
waiting request's expiry, a hold's end and a loading worker's load timeout.
While anything is busy the inactivity timeout is left out: every step
moves the last activity on until an event or an expiry ends the busy spell.
A driver that sleeps until then or until an event misses nothing and never
spins. ``close(now)`` stops every worker for shutdown.

Set ``book.events`` and ``book.issued`` to lists to record every event and
every command; ``replay(settings, events, until)`` runs recorded events
through a fresh book on a virtual clock and returns the commands it issues,
so a real-time run can be checked against the virtual one.

Rules kept here
---------------
- A grant counts as its worker's load until the worker reports the request
  as working, until the worker reports it finished (``deleted``), or
  ``grant_timeout`` after it was handed out.
- A request with no worker to take it waits. It counts as demand (after
  ``target_queue_time``, in ``decide``) until it is routed, until its client
  gives up a held route (``route_gone``), or ``waiting_timeout`` after its
  last /route/ call.
- A held request is answered with the first worker with room, longest
  waiting first, or with the waiting answer after ``route_hold``.
- A worker's report that a request was "Rejected" (busy) makes that request
  wait again, as old as it was: the SDK routes it again with the same index.
  Any other unsuccessful entry (a refused body) or a success only ends the
  grant.
- A worker is idle from the moment it holds no load, no grant and no session;
  its idle clock restarts when it reports ready.
- The last activity is the last moment any worker held load, a grant or a
  session, any request waited, or a /route/ call came.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lib.standin.params import default
from lib.standin.scaling import (
    COLD,
    EPSILON,
    ERRORED,
    LIVE,
    LOADING,
    PROVISIONING,
    READY,
    STOPPING,
    Decision,
    EndpointParams,
    LocalPolicy,
    Phase,
    Snapshot,
    Tally,
    WaitingRequest,
    WorkerView,
    change_from,
    decide_from,
    has_room,
    inactive_since,
    is_overdue,
    route_rank,
)

log = logging.getLogger(__name__)

# A remembered decision or next change is used again only while the moment at which it could
# differ is at least this far ahead: well clear of the rounding by which a moment computed as a
# sum and a test computed as a difference can disagree on epoch-second clocks (an ulp is 2e-7 s).
_MEMO_MARGIN = 1e-3

# The status the framework gives a request a busy worker turned down (429).
REJECTED = "Rejected"


@dataclass(frozen=True)
class BookSettings:
    params: EndpointParams = field(default_factory=EndpointParams)
    policy: LocalPolicy = field(default_factory=LocalPolicy)
    # A worker not ready this long after its process started is replaced.
    load_timeout: float = 60.0
    # A grant its worker's reports do not show after this long stops counting.
    grant_timeout: float = 5.0
    # A waiting request not routed again for this long stops counting as demand;
    # the SDK polls at least every 5 s plus its 10 s route timeout.
    waiting_timeout: float = 20.0
    # A /route/ with no free worker is answered as soon as one frees up, or
    # with the waiting answer after this long (0: at once). Under the SDK's
    # 10 s route timeout; it spares the SDK's up-to-5 s random pauses between polls.
    route_hold: float = default("route_hold")


# -- what goes in -------------------------------------------------------------------


class Report(NamedTuple):
    """A worker's /worker_status/ report, the fields the book uses."""

    worker_id: int
    cur_load: float = 0.0
    max_perf: float = 0.0
    working: tuple[int, ...] = ()  # working_request_idxs: its sessions and requests
    num_working: int = 0  # num_requests_working
    error: str = ""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Report:
        """From a /worker_status/ body already checked for types."""
        working = tuple(int(i) for i in body.get("working_request_idxs") or ())
        return cls(
            worker_id=int(body["id"]),
            cur_load=float(body.get("cur_load") or 0.0),
            max_perf=float(body.get("max_perf") or 0.0),
            working=working,
            num_working=int(body.get("num_requests_working") or 0),
            error=str(body.get("error_msg") or ""),
        )

    @property
    def sessions(self) -> int:
        return max(len(self.working), self.num_working)


@dataclass(frozen=True)
class Deleted:
    """One entry of a worker's /delete_requests/ list: a request or session that ended."""

    request_idx: int
    success: bool = True
    status: str = ""


# -- what comes out -----------------------------------------------------------------


class Routed(NamedTuple):
    """The answer to a /route/ call: a grant on ``worker_id``, or (None) wait and poll with ``request_idx``."""

    request_idx: int
    worker_id: int | None = None
    # While waiting: the moment a held call gets the waiting answer; None when not held.
    held_until: float | None = None


@dataclass(frozen=True)
class Provision:
    worker_id: int


@dataclass(frozen=True)
class Resume:
    worker_id: int


@dataclass(frozen=True)
class Stop:
    worker_id: int
    keep: bool
    reason: str


@dataclass(frozen=True)
class Answer:
    request_idx: int
    worker_id: int | None


Command = Provision | Resume | Stop | Answer


# -- what is kept -------------------------------------------------------------------


@dataclass(slots=True)
class Worker:
    id: int
    created_at: float
    phase: Phase = PROVISIONING
    phase_since: float = 0.0
    booted_at: float = 0.0  # created, or resumed from cold
    cur_load: float = 0.0
    max_perf: float = 0.0
    working: tuple[int, ...] = ()
    sessions: int = 0
    error: str = ""
    idle_since: float | None = None
    last_report: float | None = None
    keep_on_stop: bool = False


@dataclass(slots=True)
class Grant:
    request_idx: int
    worker_id: int
    cost: float
    at: float
    queued_since: float


@dataclass(slots=True)
class Waiting:
    request: WaitingRequest
    last_poll: float
    held_until: float | None = None  # a /route/ call is held open until then


@dataclass(slots=True)
class SeenSession:
    request_idx: int
    worker_id: int
    since: float


class _DecisionMemo(NamedTuple):
    """The last decision and what it was made from: the same inputs give it again from ``made_at`` to ``until``."""

    tally: Tally
    overdue: float
    inactive: bool
    made_at: float
    until: float  # a margin before the first idle worker becomes stoppable
    decision: Decision


class _ChangeMemo(NamedTuple):
    """The last next change (``moment``, None: none) and what it came from."""

    tally: Tally
    fresh_version: int
    busy: bool
    last_activity: float
    overdue: float
    moment: float | None


class _Room:
    """The workers with room for one cost, each with its view when it was found to have room, in a heap by
    ``route_rank``; an entry whose view is no longer its worker's is skipped when it comes to the top."""

    __slots__ = ("ids", "heap", "_seq")

    def __init__(self) -> None:
        self.ids: dict[int, WorkerView] = {}
        self.heap: list[tuple[tuple[float, float, int], int, WorkerView]] = []
        self._seq = itertools.count()

    def put(self, view: WorkerView) -> None:
        if self.ids.get(view.id) is not view:
            self.ids[view.id] = view
            heapq.heappush(self.heap, (route_rank(view), next(self._seq), view))

    def drop(self, wid: int) -> None:
        self.ids.pop(wid, None)

    def first(self) -> int | None:
        heap, ids = self.heap, self.ids
        while heap and ids.get(heap[0][2].id) is not heap[0][2]:
            heapq.heappop(heap)
        if len(heap) > 2 * len(ids) + 32:
            # Mostly entries left behind: keep one per worker.
            self.heap = heap = [(route_rank(view), next(self._seq), view) for view in ids.values()]
            heapq.heapify(heap)
        return heap[0][2].id if heap else None


class Book:
    # Beside the public records (workers, grants, waiting, sessions) the book
    # keeps what its decisions derive from them up to date as events change
    # them, so an event costs about the same on a fleet of 2 or of 200: each
    # worker's view (rebuilt only when that worker changes), its reserved
    # load, the workers' tally for ``decide``, the workers with room for a
    # cost (by ``route_rank``), the idle workers in order, the held requests
    # in arrival order and heaps of the deadlines.
    # Every change to a worker goes through ``_changed``, to a grant through
    # ``_add_grant``/``_drop_grant``, to a waiting request through
    # ``_put_waiting``/``_pop_waiting``/``_end_hold``.

    def __init__(self, settings: BookSettings, now: float):
        self.workers: dict[int, Worker] = {}
        self.grants: dict[int, Grant] = {}
        self.waiting: dict[int, Waiting] = {}
        self.sessions: dict[int, SeenSession] = {}
        self.created: list[int] = []  # every worker id ever provisioned, in order
        self.last_activity = now
        self.last_decision: Decision | None = None
        self.closing = False
        # Set both to lists to record every event (now, method, args) and
        # every command issued (now, command): what ``replay`` takes.
        self.events: list[tuple[float, str, tuple[Any, ...]]] | None = None
        self.issued: list[tuple[float, Command]] | None = None
        self._ids = itertools.count(1)
        self._next_request_idx = 1
        self._seq = itertools.count()
        self.settings = settings

    @property
    def settings(self) -> BookSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: BookSettings) -> None:
        # Deadlines, room and overdue demand all depend on the settings: derive them anew.
        self._settings = settings
        self._rebuild()

    def _rebuild(self) -> None:
        """Derives every kept figure from the public records, from scratch."""
        self._views: dict[int, WorkerView] = {}
        self._all_views: list[WorkerView] | None = None
        self._grants_of: dict[int, dict[int, float]] = {}
        self._reserved: dict[int, float] = {}
        for grant in self.grants.values():
            self._grants_of.setdefault(grant.worker_id, {})[grant.request_idx] = grant.cost
        for wid, costs in self._grants_of.items():
            self._reserved[wid] = sum(costs.values())
        self._sessions_of: dict[int, dict[int, None]] = {}
        for idx, seen in self.sessions.items():
            self._sessions_of.setdefault(seen.worker_id, {})[idx] = None
        # In workers' order (a worker's load or perf, 0.0 where it does not count), so sums
        # add the same numbers in the same order as a pass over the workers does.
        self._held: dict[int, float] = dict.fromkeys(self.workers, 0.0)
        self._perf: dict[int, float] = dict.fromkeys(self.workers, 0.0)
        self._reported: set[int] = set()  # ready with max_perf > 0
        self._live: set[int] = set()
        self._errored: set[int] = set()
        self._cold: set[int] = set()
        # Live workers holding nothing, each with its key in _idle_by_since.
        self._idle: dict[int, tuple[float, int]] = {}
        self._busy_ids: set[int] = set()  # not cold, holding load or a session
        self._tally: Tally | None = None
        self._idle_views: tuple[WorkerView, ...] | None = None
        # The idle workers in id order, and by (idle_since, id); those whose view is not kept yet.
        self._idle_ids: list[int] = []
        self._idle_by_since: list[tuple[float, int]] = []
        self._idle_unviewed: set[int] = set()
        self._cold_views: tuple[WorkerView, ...] | None = None
        self._memo: _DecisionMemo | None = None
        self._unclocked: set[int] = set(self.workers)  # changed since the idle clocks were looked at
        self._room: dict[float, _Room] = {}  # cost -> the workers with room for it
        self._room_dirty: set[int] = set()
        for worker in self.workers.values():
            self._classify(worker)
        # Waiting requests, in waiting's order: the cost of those found overdue (0.0 for the rest)
        # and those not found overdue yet.
        self._over: dict[int, float] = dict.fromkeys(self.waiting, 0.0)
        self._over_sum: float | None = None  # sum(_over.values()), while _over is unchanged
        self._fresh: dict[int, WaitingRequest] = {idx: e.request for idx, e in self.waiting.items()}
        self._fresh_version = 0  # bumped whenever _fresh changes
        self._change_memo: _ChangeMemo | None = None
        self._over_at = -math.inf
        self._over_version = -1  # _fresh_version when _over_at was last counted
        self._requests: tuple[WaitingRequest, ...] | None = None
        self._held_order: list[tuple[float, int]] = sorted(
            (e.request.since, idx) for idx, e in self.waiting.items() if e.held_until is not None
        )
        s = self._settings
        self._grant_heap: list[tuple[float, int, int, Grant]] = []
        for grant in self.grants.values():
            self._push_grant(grant)
        self._hold_heap: list[tuple[float, int, int, Waiting]] = []
        self._poll_heap: list[tuple[float, int, int, Waiting]] = []
        for idx, entry in self.waiting.items():
            self._push_waiting(idx, entry)
        self._load_heap: list[tuple[float, int, int, float]] = []
        for worker in self.workers.values():
            if worker.phase is LOADING:
                moment = worker.phase_since + s.load_timeout
                heapq.heappush(self._load_heap, (moment, next(self._seq), worker.id, worker.phase_since))

    # -- events ---------------------------------------------------------------------

    def route(self, now: float, cost: float, request_idx: int, hold: bool = False) -> Routed:
        """A grant on a worker with room, or a request index to poll with; ``hold``: the call stays open."""
        self._record(now, "route", (cost, request_idx, hold))
        self._touch(now)
        self.last_activity = now
        if request_idx <= 0:
            request_idx = self._next_request_idx
        self._next_request_idx = max(self._next_request_idx, request_idx + 1)
        # The same index again after a grant: its worker turned it down, route anew.
        earlier = self._drop_grant(request_idx)
        entry = self.waiting.get(request_idx)
        queued_since = entry.request.since if entry else earlier.queued_since if earlier else now
        worker_id = self._choose(cost)
        if worker_id is None:
            if entry is None:
                log.info("request %d waits for a worker (cost %g)", request_idx, cost)
            held_until = now + self.settings.route_hold if hold and self.settings.route_hold > 0 else None
            request = WaitingRequest(request_idx=request_idx, cost=cost, since=queued_since)
            if entry is not None and entry.request == request:
                request = entry.request
            self._put_waiting(request_idx, Waiting(request, now, held_until))
            return Routed(request_idx, held_until=held_until)
        self._grant(now, request_idx, worker_id, cost, queued_since)
        return Routed(request_idx, worker_id=worker_id)

    def route_gone(self, now: float, request_idx: int) -> bool:
        """The client of a /route/ call went away before its answer reached it: no demand from now on.

        Drops the request whether it was waiting or had just been granted a
        worker (the grant never reached the client). True if there was one.
        """
        self._record(now, "route_gone", (request_idx,))
        self._touch(now)
        entry = self._pop_waiting(request_idx)
        grant = self._drop_grant(request_idx)
        if entry is None and grant is None:
            return False
        since = entry.request.since if entry else grant.queued_since  # type: ignore[union-attr]
        log.info("request %d given up by its client after %.1fs; dropped", request_idx, now - since)
        return True

    def report(self, now: float, report: Report) -> bool:
        """A worker's report; False when it names no worker that can report."""
        self._record(now, "report", (report,))
        self._touch(now)
        worker = self.workers.get(report.worker_id)
        if worker is None or worker.phase not in (LOADING, READY, STOPPING):
            return False
        worker.last_report = now
        worker.cur_load = report.cur_load
        worker.max_perf = report.max_perf
        worker.working = report.working
        worker.sessions = report.sessions
        self._track_sessions(worker, now)
        self._changed(worker)
        if worker.phase is STOPPING:
            return True
        if report.error:
            worker.error = report.error
            self._set_phase(worker, ERRORED, now)
            log.warning("worker %d reported an error: %s", worker.id, report.error)
        elif worker.phase is LOADING and worker.max_perf > 0:
            self._set_phase(worker, READY, now)
            # Its scale-down clock starts now: a waiting client may take a
            # few seconds to poll again and find it.
            if worker.idle_since is not None:
                worker.idle_since = now
                self._changed(worker)
            log.info("worker %d ready after %.1fs (max_perf %g)", worker.id, now - worker.booted_at, worker.max_perf)
        return True

    def deleted(self, now: float, worker_id: int, entries: Iterable[Deleted]) -> None:
        """A worker's list of requests and sessions that ended: each ends its grant."""
        entries = tuple(entries)
        self._record(now, "deleted", (worker_id, entries))
        self._touch(now)
        for item in entries:
            grant = self.grants.get(item.request_idx)
            if grant is None or grant.worker_id != worker_id:
                continue
            self._drop_grant(item.request_idx)
            if item.success:
                continue
            if item.status == REJECTED:
                log.info("request %d turned down by busy worker %d; it waits again", item.request_idx, worker_id)
                if item.request_idx not in self.waiting:
                    # The SDK routes a refused create again with the same
                    # index: it is still demand, as old as it was.
                    request = WaitingRequest(grant.request_idx, grant.cost, grant.queued_since)
                    self._put_waiting(grant.request_idx, Waiting(request, last_poll=now))
            else:
                log.info("request %d refused by worker %d (%s)", item.request_idx, worker_id, item.status or "failed")

    def started(self, now: float, worker_id: int) -> None:
        """Its process runs: the worker loads until it reports ready."""
        self._record(now, "started", (worker_id,))
        worker = self.workers.get(worker_id)
        if worker is None or worker.phase not in (PROVISIONING, LOADING):
            return
        worker.cur_load = worker.max_perf = 0.0
        worker.working = ()
        worker.sessions = 0
        worker.error = ""
        self._set_phase(worker, LOADING, now)

    def failed(self, now: float, worker_id: int, error: str) -> None:
        """Its process exited or never started: it is errored, and replaced where still needed."""
        self._record(now, "failed", (worker_id, error))
        worker = self.workers.get(worker_id)
        if worker is None or worker.phase not in (PROVISIONING, LOADING, READY):
            return
        worker.error = error
        self._set_phase(worker, ERRORED, now)
        log.warning("worker %d %s", worker.id, error)

    def stopped(self, now: float, worker_id: int) -> None:
        """Its process is gone after a Stop: cold (files kept) or removed."""
        self._record(now, "stopped", (worker_id,))
        self._touch(now)
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        for idx in list(self._grants_of.get(worker_id, ())):
            self._drop_grant(idx)
        for idx in list(self._sessions_of.pop(worker_id, ())):
            del self.sessions[idx]
            log.info("session %d on worker %d ended with the worker", idx, worker_id)
        if worker.keep_on_stop and not self.closing:
            worker.cur_load = worker.max_perf = 0.0
            worker.working = ()
            worker.sessions = 0
            self._set_phase(worker, COLD, now)
        else:
            del self.workers[worker_id]
            del self._held[worker_id]
            del self._perf[worker_id]
            self._changed(worker)

    # -- the step -------------------------------------------------------------------

    def step(self, now: float) -> list[Command]:
        """Expires what is due, serves held requests, decides and applies; the commands to carry out."""
        commands: list[Command] = []
        self._touch(now)
        self._expire(now, commands)
        self._serve_held(now, commands)
        # After serving: a worker that frees up and is handed on at once is never idle.
        self._clock_idle(now)
        self._touch(now)
        decision = self._decide(now)
        self.last_decision = decision
        if not self.closing:
            self._apply(decision, now, commands)
        if self.issued is not None:
            self.issued.extend((now, command) for command in commands)
        return commands

    def next_wakeup(self, now: float) -> float | None:
        """When ``step`` must next run if no event comes first; None: only an event changes anything."""
        s = self._settings
        moments = []
        grants = self._grant_heap
        while grants and self.grants.get(grants[0][2]) is not grants[0][3]:
            heapq.heappop(grants)
        if grants:
            moments.append(grants[0][0])
        holds = self._hold_heap
        while holds and not self._holds(holds[0]):
            heapq.heappop(holds)
        if holds:
            moments.append(holds[0][0])
        polls = self._poll_heap
        while polls and not self._polls(polls[0]):
            heapq.heappop(polls)
        if polls:
            moments.append(polls[0][0])
        loads = self._load_heap
        while loads and not self._loads(loads[0]):
            heapq.heappop(loads)
        if loads:
            moments.append(loads[0][0])
        if not self.closing:
            overdue = self._count_overdue(now)
            tally = self.tally()
            # While anything is busy every step moves the last activity to its own
            # moment, so inactivity can only start after the event or expiry that ends it.
            busy = self._busy()
            memo = self._change_memo
            if (
                memo is not None
                and (memo.tally is tally or memo.tally == tally)
                and memo.fresh_version == self._fresh_version
                and memo.busy == busy
                and (busy or memo.last_activity == self.last_activity)
                and memo.overdue == overdue
                and (memo.moment is None or memo.moment > now + _MEMO_MARGIN)
            ):
                # Same inputs, and no moment of theirs has come yet: the same answer.
                change = memo.moment
            else:
                change = change_from(
                    tally, self._fresh.values(), now, self.last_activity, s.params, s.policy, busy=busy, overdue=overdue
                )
                self._change_memo = _ChangeMemo(
                    tally=tally,
                    fresh_version=self._fresh_version,
                    busy=busy,
                    last_activity=self.last_activity,
                    overdue=overdue,
                    moment=change,
                )
            if change is not None:
                moments.append(change)
        return min(moments) if moments else None

    def close(self, now: float) -> list[Command]:
        """Shutdown: every worker not already stopping is stopped and removed; no decision applies after."""
        self.closing = True
        commands: list[Command] = []
        for worker in list(self.workers.values()):
            if worker.phase is not STOPPING:
                commands.append(self._stop(worker, now, keep=False, reason="shutdown"))
        for idx, entry in list(self.waiting.items()):
            if entry.held_until is not None:
                self._end_hold(idx, entry)
                commands.append(Answer(idx, None))
        return commands

    # -- views ----------------------------------------------------------------------

    def reserved(self, worker_id: int) -> float:
        return self._reserved.get(worker_id, 0)

    def view(self, worker_id: int) -> WorkerView:
        """What ``scaling`` sees of one worker; kept until the worker changes."""
        view = self._views.get(worker_id)
        if view is None:
            w = self.workers[worker_id]
            view = self._views[worker_id] = WorkerView(
                id=w.id,
                phase=w.phase,
                created_at=w.created_at,
                cur_load=w.cur_load,
                max_perf=w.max_perf,
                reserved=self._reserved.get(worker_id, 0),
                idle_since=w.idle_since,
                sessions=w.sessions,
            )
        return view

    def views(self) -> list[WorkerView]:
        if self._all_views is None:
            self._all_views = [self.view(wid) for wid in self.workers]
        return list(self._all_views)

    def snapshot(self, now: float) -> Snapshot:
        if self._requests is None:
            self._requests = tuple(w.request for w in self.waiting.values())
        return Snapshot(now=now, workers=tuple(self.views()), waiting=self._requests, last_activity=self.last_activity)

    def tally(self) -> Tally:
        """The workers' part of ``decide``'s input, as ``scaling.tally`` gives it for the views."""
        if self._tally is None:
            view = self.view
            reported = self._reported
            if self._cold_views is None:
                self._cold_views = tuple(sorted(map(view, self._cold), key=lambda w: (w.created_at, w.id)))
            if self._idle_views is None:
                for wid in self._idle_unviewed:
                    view(wid)
                self._idle_unviewed.clear()
                self._idle_views = tuple(map(self._views.__getitem__, self._idle_ids))
            self._tally = Tally(
                perf=sum(self._perf.values()) / len(reported) if reported else self.settings.policy.assumed_perf,
                held=sum(self._held.values()),
                live=len(self._live),
                still_there=bool(self._live or self._errored),
                errored=tuple(sorted(self._errored)),  # workers' order is id order
                cold=self._cold_views,
                idle=self._idle_views,
            )
        return self._tally

    def live(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.phase in LIVE]

    def sessions_on(self, worker_id: int) -> list[int]:
        """The sessions (request indexes) ``worker_id`` reports holding now."""
        return [idx for idx, s in self.sessions.items() if s.worker_id == worker_id]

    # -- inside ---------------------------------------------------------------------

    def _record(self, now: float, method: str, args: tuple[Any, ...]) -> None:
        if self.events is not None:
            self.events.append((now, method, args))

    def _busy(self) -> bool:
        return bool(self.waiting or self.grants or self._busy_ids)

    def _touch(self, now: float) -> None:
        # Called before every change, so the last activity is the moment the
        # last load ended, not the step that noticed it.
        if (self.waiting or self.grants or self._busy_ids) and now > self.last_activity:
            self.last_activity = now

    def _decide(self, now: float) -> Decision:
        s = self._settings
        overdue = self._count_overdue(now)
        tally = self.tally()
        inactive = inactive_since(self.last_activity, now, s.params)
        # decide_from reads the clock only through the inactivity timeout and the
        # idle workers' scale-down delay: with the same tally, overdue load and
        # inactivity, and before any idle worker's delay runs out, it answers as
        # it did. (A decision that asked for anything changed the tally: a
        # worker it starts or stops moves between the tally's counts.)
        memo = self._memo
        if (
            memo is not None
            and (memo.tally is tally or memo.tally == tally)
            and memo.overdue == overdue
            and memo.inactive == inactive
            and memo.made_at <= now < memo.until
        ):
            return memo.decision
        decision = decide_from(tally, overdue, now, self.last_activity, s.params, s.policy)
        # Kept until a margin before the first idle worker becomes stoppable (see _MEMO_MARGIN).
        delay = s.policy.scale_down_delay - EPSILON
        # The idle workers not stoppable yet, idle since after now - delay, come last by idle_since;
        # the bisection is moved to where the test itself changes, as the subtraction rounds.
        since = self._idle_by_since
        i = bisect.bisect_right(since, (now - delay, math.inf))
        while i > 0 and now - since[i - 1][0] < delay:
            i -= 1
        while i < len(since) and not now - since[i][0] < delay:
            i += 1
        until = since[i][0] + delay - _MEMO_MARGIN if i < len(since) else math.inf
        self._memo = _DecisionMemo(
            tally=tally, overdue=overdue, inactive=inactive, made_at=now, until=until, decision=decision
        )
        return decision

    def _count_overdue(self, now: float) -> float:
        """The cost of the requests overdue at ``now``, as ``scaling.overdue_load`` gives it for the waiting."""
        if now < self._over_at:
            # The clock went back: what was overdue may not be.
            self._over = dict.fromkeys(self.waiting, 0.0)
            self._over_sum = None
            self._fresh = {idx: e.request for idx, e in self.waiting.items()}
            self._fresh_version += 1
        if now == self._over_at and self._fresh_version == self._over_version:
            fresh = False  # the same moment and the same requests not yet overdue: none has become so
        else:
            fresh = bool(self._fresh)
        self._over_at = now
        if fresh:
            params = self._settings.params
            due = [r for r in self._fresh.values() if is_overdue(r, now, params)]
            for request in due:
                del self._fresh[request.request_idx]
                self._fresh_version += 1
                self._over[request.request_idx] = request.cost
                self._over_sum = None
        self._over_version = self._fresh_version
        if self._over_sum is None:
            self._over_sum = sum(self._over.values())
        return self._over_sum

    def _choose(self, cost: float) -> int | None:
        """``choose_worker`` over the workers: the first, by ``route_rank``, of those with room for ``cost``."""
        params = self._settings.params
        room = self._room.get(cost)
        if room is None:
            if len(self._room) >= 8:
                self._room.clear()  # many costs: keep the rooms of the recent ones only
            room = self._room[cost] = _Room()
            self._room_dirty.update(self._reported)  # has_room takes only these
        if self._room_dirty:
            for wid in self._room_dirty:
                view = self.view(wid) if wid in self.workers else None
                for each, kept in self._room.items():
                    if view is not None and has_room(view, each, params):
                        kept.put(view)
                    else:
                        kept.drop(wid)
            self._room_dirty.clear()
        return room.first()

    def _changed(self, worker: Worker) -> None:
        """Whatever changed on ``worker`` (or its grants), what derives from it is worked out anew."""
        wid = worker.id
        self._views.pop(wid, None)
        self._all_views = None
        self._unclocked.add(wid)
        self._room_dirty.add(wid)
        self._classify(worker)

    def _classify(self, worker: Worker) -> None:
        """Files the worker in the sets the tally and the room come from; the tally is redone only if its part moved."""
        wid = worker.id
        held, perf = self._held.get(wid), self._perf.get(wid)
        was_live, was_errored, was_cold, was_idle = (
            wid in self._live,
            wid in self._errored,
            wid in self._cold,
            wid in self._idle,
        )
        gone = wid not in self.workers
        if not gone:
            phase = worker.phase
            load = worker.cur_load + self._reserved.get(wid, 0)
            live = phase in LIVE
            errored = phase is ERRORED
            cold = phase is COLD
            busy = not cold and (worker.cur_load > EPSILON or worker.sessions != 0)
            idle = live and load <= EPSILON and worker.sessions == 0 and worker.idle_since is not None
            new_held = load if live or errored else 0.0
            new_perf = worker.max_perf if phase is READY and worker.max_perf > 0 else 0.0
            if (
                not (was_idle or was_cold or idle or cold)
                and live == was_live
                and errored == was_errored
                and busy == (wid in self._busy_ids)
                and new_held == held
                and new_perf == perf
            ):
                return  # none of the tally's views is its own, and its counts and sums are as they were
        # The tally's tuples of idle and of cold views are built again only when one of theirs changed.
        if was_idle:
            self._idle_views = None
            self._unfile_idle(wid)
        if was_cold:
            self._cold_views = None
        for ids in (self._reported, self._live, self._errored, self._cold, self._busy_ids):
            ids.discard(wid)
        if gone:
            self._tally = None
            return
        if busy:
            self._busy_ids.add(wid)
        self._held[wid] = new_held
        self._perf[wid] = new_perf
        if new_perf:
            self._reported.add(wid)
        if live:
            self._live.add(wid)
            if idle:
                self._idle_views = None
                self._file_idle(wid, worker.idle_since)  # type: ignore[arg-type]
        elif errored:
            self._errored.add(wid)
        elif cold:
            self._cold.add(wid)
            self._cold_views = None
        if (
            was_cold
            or was_idle
            or idle
            or cold
            or was_live != live
            or was_errored != errored
            or held != new_held
            or perf != new_perf
        ):
            self._tally = None

    def _file_idle(self, wid: int, since: float) -> None:
        bisect.insort(self._idle_ids, wid)
        key = self._idle[wid] = (since, wid)
        bisect.insort(self._idle_by_since, key)
        self._idle_unviewed.add(wid)  # its view was just dropped, or never made

    def _unfile_idle(self, wid: int) -> None:
        ids = self._idle_ids
        del ids[bisect.bisect_left(ids, wid)]
        by_since = self._idle_by_since
        del by_since[bisect.bisect_left(by_since, self._idle.pop(wid))]
        self._idle_unviewed.discard(wid)

    def _push_grant(self, grant: Grant) -> None:
        moment = grant.at + self._settings.grant_timeout
        heapq.heappush(self._grant_heap, (moment, next(self._seq), grant.request_idx, grant))

    def _add_grant(self, grant: Grant) -> None:
        self.grants[grant.request_idx] = grant
        costs = self._grants_of.setdefault(grant.worker_id, {})
        costs[grant.request_idx] = grant.cost
        self._reserved[grant.worker_id] = sum(costs.values())
        self._push_grant(grant)
        worker = self.workers.get(grant.worker_id)
        if worker is not None:
            self._changed(worker)

    def _drop_grant(self, request_idx: int) -> Grant | None:
        grant = self.grants.pop(request_idx, None)
        if grant is None:
            return None
        wid = grant.worker_id
        costs = self._grants_of[wid]
        del costs[request_idx]
        if costs:
            self._reserved[wid] = sum(costs.values())
        else:
            del self._grants_of[wid]
            del self._reserved[wid]
        worker = self.workers.get(wid)
        if worker is not None:
            self._changed(worker)
        return grant

    def _holds(self, item: tuple[float, int, int, Waiting]) -> bool:
        """Whether a hold deadline in the heap is still the request's own."""
        entry = item[3]
        return self.waiting.get(item[2]) is entry and entry.held_until == item[0]

    def _polls(self, item: tuple[float, int, int, Waiting]) -> bool:
        entry = item[3]
        return (
            self.waiting.get(item[2]) is entry
            and entry.held_until is None
            and entry.last_poll + self._settings.waiting_timeout == item[0]
        )

    def _loads(self, item: tuple[float, int, int, float]) -> bool:
        worker = self.workers.get(item[2])
        return worker is not None and worker.phase is LOADING and worker.phase_since == item[3]

    def _push_waiting(self, idx: int, entry: Waiting) -> None:
        if entry.held_until is not None:
            heapq.heappush(self._hold_heap, (entry.held_until, next(self._seq), idx, entry))
        else:
            moment = entry.last_poll + self._settings.waiting_timeout
            heapq.heappush(self._poll_heap, (moment, next(self._seq), idx, entry))

    def _put_waiting(self, idx: int, entry: Waiting) -> None:
        old = self.waiting.get(idx)
        self.waiting[idx] = entry
        if old is None or old.request is not entry.request:
            self._requests = None
            self._over[idx] = 0.0  # a key already there keeps its place, as in waiting
            self._over_sum = None
            self._fresh[idx] = entry.request
            self._fresh_version += 1
        was_held = old is not None and old.held_until is not None
        key = (entry.request.since, idx)
        if was_held and (entry.held_until is None or old.request.since != entry.request.since):  # type: ignore[union-attr]
            del self._held_order[bisect.bisect_left(self._held_order, (old.request.since, idx))]  # type: ignore[union-attr]
            was_held = False
        if entry.held_until is not None and not was_held:
            bisect.insort(self._held_order, key)
        self._push_waiting(idx, entry)

    def _pop_waiting(self, idx: int) -> Waiting | None:
        entry = self.waiting.pop(idx, None)
        if entry is None:
            return None
        self._requests = None
        del self._over[idx]
        self._over_sum = None
        if self._fresh.pop(idx, None) is not None:
            self._fresh_version += 1
        if entry.held_until is not None:
            del self._held_order[bisect.bisect_left(self._held_order, (entry.request.since, idx))]
        return entry

    def _end_hold(self, idx: int, entry: Waiting, last_poll: float | None = None) -> None:
        del self._held_order[bisect.bisect_left(self._held_order, (entry.request.since, idx))]
        entry.held_until = None
        if last_poll is not None:
            entry.last_poll = last_poll
        self._push_waiting(idx, entry)

    def _grant(self, now: float, request_idx: int, worker_id: int, cost: float, queued_since: float) -> None:
        self._pop_waiting(request_idx)
        worker = self.workers[worker_id]
        worker.idle_since = None
        self._add_grant(Grant(request_idx, worker_id, cost, now, queued_since))
        log.info("request %d routed to worker %d after %.1fs", request_idx, worker_id, now - queued_since)

    def _serve_held(self, now: float, commands: list[Command]) -> None:
        """Hands workers with room to held requests, the longest-waiting first; ends holds that are over."""
        held = self._held_order
        if not held:
            return
        while held:
            idx = held[0][1]
            entry = self.waiting[idx]
            worker_id = self._choose(entry.request.cost)
            if worker_id is None:
                break  # served in arrival order, like a queue: no overtaking
            self._grant(now, idx, worker_id, entry.request.cost, entry.request.since)  # leaves held
            commands.append(Answer(idx, worker_id))
        over = []
        heap = self._hold_heap
        while heap and (not self._holds(heap[0]) or now >= heap[0][0] - EPSILON):
            item = heapq.heappop(heap)
            if self._holds(item):
                over.append((item[3].request.since, item[2]))
        for _, idx in sorted(over):
            self._end_hold(idx, self.waiting[idx], last_poll=now)
            commands.append(Answer(idx, None))

    def _expire(self, now: float, commands: list[Command]) -> None:
        s = self._settings
        grants = self._grant_heap
        while grants and (self.grants.get(grants[0][2]) is not grants[0][3] or now >= grants[0][0] - EPSILON):
            _, _, idx, grant = heapq.heappop(grants)
            if self.grants.get(idx) is grant:
                self._drop_grant(idx)
                log.debug("grant %d on worker %d not seen in its reports; no longer counted", idx, grant.worker_id)
        polls = self._poll_heap
        while polls and (not self._polls(polls[0]) or now >= polls[0][0] - EPSILON):
            poll = heapq.heappop(polls)
            if self._polls(poll):
                self._pop_waiting(poll[2])
                log.info("request %d no longer polled; dropped", poll[2])
        loads = self._load_heap
        while loads and (not self._loads(loads[0]) or now >= loads[0][0] - EPSILON):
            load = heapq.heappop(loads)
            if self._loads(load):
                worker = self.workers[load[2]]
                worker.error = f"not ready {s.load_timeout:g}s after starting"
                self._set_phase(worker, ERRORED, now)
                log.warning("worker %d %s", worker.id, worker.error)

    def _clock_idle(self, now: float) -> None:
        """Starts the idle clock of each changed worker that now holds nothing, and stops it for the rest."""
        if self._unclocked:
            unclocked = self._unclocked
            self._unclocked = set()
            for wid in unclocked:
                worker = self.workers.get(wid)
                if worker is None:
                    continue
                if worker.cur_load + self._reserved.get(wid, 0) > EPSILON or worker.sessions:
                    if worker.idle_since is not None:
                        worker.idle_since = None
                        self._changed(worker)
                elif worker.idle_since is None:
                    worker.idle_since = now
                    self._changed(worker)

    def _apply(self, decision: Decision, now: float, commands: list[Command]) -> None:
        for worker_id in decision.destroy:
            worker = self.workers[worker_id]
            reason = f"errored: {worker.error}" if worker.phase is ERRORED else self._surplus(worker, now)
            commands.append(self._stop(worker, now, keep=False, reason=reason))
        for worker_id in decision.stop:
            worker = self.workers[worker_id]
            commands.append(self._stop(worker, now, keep=True, reason=self._surplus(worker, now)))
        for worker_id in decision.resume:
            worker = self.workers[worker_id]
            worker.idle_since = worker.booted_at = now
            self._set_phase(worker, LOADING, now)
            log.info(
                "worker %d starting again from cold: load %g, workers wanted %d",
                worker_id,
                decision.load,
                decision.target,
            )
            commands.append(Resume(worker_id))
        for _ in range(decision.provision):
            worker_id = next(self._ids)
            worker = self.workers[worker_id] = Worker(
                id=worker_id, created_at=now, phase_since=now, booted_at=now, idle_since=now
            )
            self._held[worker_id] = 0.0
            self._perf[worker_id] = 0.0
            self._changed(worker)
            self.created.append(worker_id)
            log.info("worker %d provisioning: load %g, workers wanted %d", worker_id, decision.load, decision.target)
            commands.append(Provision(worker_id))

    def _stop(self, worker: Worker, now: float, *, keep: bool, reason: str) -> Stop:
        worker.keep_on_stop = keep
        self._set_phase(worker, STOPPING, now)
        log.info("worker %d stopping (%s)", worker.id, reason)
        return Stop(worker.id, keep, reason)

    @staticmethod
    def _surplus(worker: Worker, now: float) -> str:
        idle = now - worker.idle_since if worker.idle_since is not None else 0.0
        return f"surplus, idle {idle:.1f}s"

    def _set_phase(self, worker: Worker, phase: Phase, now: float) -> None:
        worker.phase = phase
        worker.phase_since = now
        if phase is LOADING:
            moment = now + self._settings.load_timeout
            heapq.heappush(self._load_heap, (moment, next(self._seq), worker.id, now))
        self._changed(worker)

    def _track_sessions(self, worker: Worker, now: float) -> None:
        wid = worker.id
        mine = self._sessions_of.setdefault(wid, {})
        for idx in worker.working:
            grant = self.grants.get(idx)
            if grant is not None and grant.worker_id == wid:
                self._drop_grant(idx)
            if idx not in self.sessions:
                self.sessions[idx] = SeenSession(idx, wid, now)
                mine[idx] = None
                log.info("session %d open on worker %d", idx, wid)
        for idx in [idx for idx in mine if idx not in worker.working]:
            seen = self.sessions.pop(idx)
            del mine[idx]
            log.info("session %d on worker %d ended after %.1fs", idx, wid, now - seen.since)
        if not mine:
            del self._sessions_of[wid]


def replay(
    settings: BookSettings, events: Iterable[tuple[float, str, tuple[Any, ...]]], until: float
) -> list[tuple[float, Command]]:
    """Runs recorded events through a fresh book on a virtual clock; every command issued, with its time.

    The book steps after each event and at each ``next_wakeup`` up to
    ``until``, as a driver that sleeps until the next deadline or event
    does; a real-time run recorded with ``events``/``issued`` should issue
    the same commands at nearly the same times.
    """
    queue = sorted(events, key=lambda e: e[0])
    start = queue[0][0] if queue else 0.0
    book = Book(settings, start)
    out: list[tuple[float, Command]] = []
    now = start
    i = 0
    while True:
        wake = book.next_wakeup(now)
        upcoming = queue[i][0] if i < len(queue) else None
        if upcoming is not None and (wake is None or upcoming <= wake):
            now, method, args = queue[i]
            i += 1
            getattr(book, method)(now, *args)
        elif wake is not None and wake <= until:
            now = max(wake, math.nextafter(now, math.inf))
        else:
            return out
        out.extend((now, command) for command in book.step(now))
