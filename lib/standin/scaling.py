"""How the local stand-in sizes the fleet and picks a worker for a route.

Vast does not publish its autoscaler. This is the stand-in's model of it,
written as plain functions of a snapshot (no clock, no I/O) so every rule can
be checked on its own; ``lib.standin.fleet`` gathers the snapshot and carries out the
decision. The README gives the same model as formulas.

With ``P`` the capacity of one worker, ``L`` the load, ``u`` ``target_util``:

    L      = sum(cur_load + reserved over live workers)
             + sum(cost of requests waiting longer than target_queue_time)
    N      = ceil(max(L, min_load) / (u * P))           capped at max_workers
    N      = 1 instead of 0 while workers exist and inactivity_timeout has not
             elapsed since the last activity (never 0 when it is unset)

A worker takes a route when it is ready, has not reported an error, and
``load + cost <= max_perf`` (or it is idle) and ``load / max_perf <= max_queue_time``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from lib.standin.params import default

# Loads are sums of floats: 3 x 100 / 1.0 / 100 must give 3 workers, not 4.
EPSILON = 1e-9
# Relative to a load: far above the error of adding the same costs in another order, far below
# the EPSILON by which a load that is an exact number of workers still rounds down.
_ROUNDING = 1e-12


class Phase(str, enum.Enum):
    PROVISIONING = "provisioning"  # created; the cold start (image pull, model download) is a delay
    LOADING = "loading"  # process running, not reported ready yet
    READY = "ready"
    ERRORED = "errored"  # reported an error, or its process exited or never got ready
    STOPPING = "stopping"
    COLD = "cold"  # stopped with its files kept: starting it again skips provisioning


# The phases under module names: a member looked up on its enum class costs several times a
# global's look-up, and the book and the planner test phases at every event.
PROVISIONING = Phase.PROVISIONING
LOADING = Phase.LOADING
READY = Phase.READY
ERRORED = Phase.ERRORED
STOPPING = Phase.STOPPING
COLD = Phase.COLD

LIVE = (PROVISIONING, LOADING, READY)
# Scale-down gives up the least useful first: not yet started, then loading, then ready.
_STOP_ORDER = {PROVISIONING: 0, LOADING: 1, READY: 2}


@dataclass(frozen=True)
class EndpointParams:
    """The endpoint's scaling parameters, as Vast names them (what each does: ``lib.standin.params``)."""

    min_load: float = default("min_load")
    target_util: float = default("target_util")
    max_workers: int = default("max_workers")
    cold_workers: int = default("cold_workers")
    max_queue_time: float = default("max_queue_time")
    target_queue_time: float = default("target_queue_time")
    inactivity_timeout: float | None = default("inactivity_timeout")

    def problems(self) -> list[str]:
        """Each invalid value with its allowed range; empty when all hold."""
        found = []
        if not (self.min_load >= 0 and math.isfinite(self.min_load)):
            found.append(f"min_load {self.min_load} must be a number >= 0")
        if not (0 < self.target_util <= 1):
            found.append(f"target_util {self.target_util} must be in (0, 1]")
        if self.max_workers < 1:
            found.append(f"max_workers {self.max_workers} must be >= 1")
        if not (0 <= self.cold_workers <= self.max_workers):
            found.append(f"cold_workers {self.cold_workers} must be between 0 and max_workers ({self.max_workers})")
        if not (self.max_queue_time > 0 and math.isfinite(self.max_queue_time)):
            found.append(f"max_queue_time {self.max_queue_time} must be a number of seconds > 0")
        if not (self.target_queue_time >= 0 and math.isfinite(self.target_queue_time)):
            found.append(f"target_queue_time {self.target_queue_time} must be a number of seconds >= 0")
        if self.inactivity_timeout is not None and not (
            self.inactivity_timeout >= 0 and math.isfinite(self.inactivity_timeout)
        ):
            found.append(f"inactivity_timeout {self.inactivity_timeout} must be a number of seconds >= 0, or unset")
        return found


@dataclass(frozen=True)
class LocalPolicy:
    """What the stand-in decides that Vast does not expose as endpoint parameters."""

    # A surplus worker is stopped only after being idle this long, so a
    # dispatcher that ends a session and opens the next one keeps its worker.
    scale_down_delay: float = default("scale_down_delay")
    # Capacity assumed for a worker that has not reported max_perf yet.
    assumed_perf: float = 100.0


# The records made anew as events come (a worker's view, a waiting request, the tally, a
# decision) are named tuples: as immutable as a frozen dataclass, and made in a quarter of its time.
class WorkerView(NamedTuple):
    id: int
    phase: Phase
    created_at: float
    cur_load: float = 0.0
    max_perf: float = 0.0
    # Cost of grants handed out for this worker that its reports do not show yet.
    reserved: float = 0.0
    # Since when it has held no load and no reservation; None while it holds some.
    idle_since: float | None = None
    # Sessions (or requests) it reports working on. A worker holding one is
    # never idle, whatever load it reports: a session of any cost fills it.
    sessions: int = 0

    @property
    def load(self) -> float:
        return self.cur_load + self.reserved


class WaitingRequest(NamedTuple):
    request_idx: int
    cost: float
    since: float


@dataclass(frozen=True)
class Snapshot:
    now: float
    workers: tuple[WorkerView, ...] = ()
    waiting: tuple[WaitingRequest, ...] = ()
    # Last moment there was load, a reservation, a waiting request or a route call.
    last_activity: float = 0.0


class Decision(NamedTuple):
    target: int  # live workers wanted
    load: float  # L
    perf: float  # P
    provision: int = 0  # new instances to create (they go through the cold start)
    resume: tuple[int, ...] = ()  # cold instances to start again
    stop: tuple[int, ...] = ()  # live instances to stop and keep cold
    destroy: tuple[int, ...] = ()  # instances to stop (if running) and remove

    @property
    def changes(self) -> bool:
        return bool(self.provision or self.resume or self.stop or self.destroy)


def has_room(worker: WorkerView, cost: float, params: EndpointParams) -> bool:
    """Whether ``worker`` may take a route of ``cost`` now."""
    perf = worker.max_perf
    if worker.phase is not READY or perf <= 0:
        return False
    load = worker.cur_load + worker.reserved
    # An idle worker takes any single request, even one costlier than its max_perf.
    fits = load <= EPSILON or load + cost <= perf + EPSILON
    short_queue = load / perf <= params.max_queue_time + EPSILON
    return fits and short_queue


def choose_worker(workers: Iterable[WorkerView], cost: float, params: EndpointParams) -> int | None:
    """The least-loaded worker with room for ``cost`` (oldest first on ties), or None to wait."""
    candidates = [w for w in workers if has_room(w, cost, params)]
    if not candidates:
        return None
    return min(candidates, key=route_rank).id


def route_rank(worker: WorkerView) -> tuple[float, float, int]:
    """The order in which workers with room take a route: least loaded for its size, then oldest, then by id."""
    return (worker.load / worker.max_perf, worker.created_at, worker.id)


def worker_perf(workers: Iterable[WorkerView], policy: LocalPolicy) -> float:
    """P: the mean max_perf ready workers report, or the assumed figure before any has."""
    reported = [w.max_perf for w in workers if w.phase is READY and w.max_perf > 0]
    return sum(reported) / len(reported) if reported else policy.assumed_perf


def total_load(snapshot: Snapshot, params: EndpointParams) -> float:
    """L: what live and errored workers hold or are promised, plus requests waiting too long."""
    return tally(snapshot.workers, LocalPolicy()).held + overdue_load(snapshot.waiting, snapshot.now, params)


def overdue_load(waiting: Iterable[WaitingRequest], now: float, params: EndpointParams) -> float:
    """The cost of the requests that have waited at least target_queue_time: demand for a new worker."""
    # A request that has waited less may still be taken by a worker that frees up.
    return sum(r.cost for r in waiting if is_overdue(r, now, params))


def is_overdue(request: WaitingRequest, now: float, params: EndpointParams) -> bool:
    return now - request.since >= params.target_queue_time - EPSILON


def inactive_long_enough(snapshot: Snapshot, params: EndpointParams) -> bool:
    return inactive_since(snapshot.last_activity, snapshot.now, params)


def inactive_since(last_activity: float, now: float, params: EndpointParams) -> bool:
    timeout = params.inactivity_timeout
    return timeout is not None and now - last_activity >= timeout - EPSILON


class Tally(NamedTuple):
    """What ``decide`` reads from the workers, gathered once; the book keeps one up to date as events come."""

    perf: float  # P
    held: float  # load of live and errored workers
    live: int  # live workers
    still_there: bool  # any live or errored worker
    errored: tuple[int, ...]  # ids of errored workers, in snapshot order
    cold: tuple[WorkerView, ...]  # cold workers, oldest first
    idle: tuple[WorkerView, ...]  # live workers holding nothing, in snapshot order


def tally(workers: Sequence[WorkerView], policy: LocalPolicy) -> Tally:
    """The workers' part of the decision, in one pass over them."""
    reported: list[float] = []
    held: list[float] = []
    errored: list[int] = []
    cold: list[WorkerView] = []
    idle: list[WorkerView] = []
    live = 0
    for w in workers:
        phase = w.phase
        if phase is COLD:
            cold.append(w)
            continue
        if phase is STOPPING:
            continue
        held.append(w.load)
        if phase is ERRORED:
            errored.append(w.id)
            continue
        live += 1
        if phase is READY and w.max_perf > 0:
            reported.append(w.max_perf)
        if _idle(w):
            idle.append(w)
    return Tally(
        perf=sum(reported) / len(reported) if reported else policy.assumed_perf,
        held=sum(held),
        live=live,
        still_there=bool(held),
        errored=tuple(errored),
        cold=tuple(sorted(cold, key=lambda w: (w.created_at, w.id))),
        idle=tuple(idle),
    )


def target_workers(snapshot: Snapshot, params: EndpointParams, policy: LocalPolicy) -> int:
    """N: how many live workers the endpoint should run."""
    t = tally(snapshot.workers, policy)
    load = t.held + overdue_load(snapshot.waiting, snapshot.now, params)
    return _target(t, load, snapshot.now, snapshot.last_activity, params)


def _target(t: Tally, load: float, now: float, last_activity: float, params: EndpointParams) -> int:
    demand = max(load, params.min_load)
    wanted = math.ceil(demand / (params.target_util * t.perf) - EPSILON) if demand > EPSILON else 0
    if wanted == 0 and not inactive_since(last_activity, now, params):
        wanted = 1 if t.still_there else 0
    return min(max(wanted, 0), params.max_workers)


def decide(snapshot: Snapshot, params: EndpointParams, policy: LocalPolicy) -> Decision:
    """What to start and stop so the fleet moves toward the target."""
    t = tally(snapshot.workers, policy)
    overdue = overdue_load(snapshot.waiting, snapshot.now, params)
    return decide_from(t, overdue, snapshot.now, snapshot.last_activity, params, policy)


def decide_from(
    t: Tally, overdue: float, now: float, last_activity: float, params: EndpointParams, policy: LocalPolicy
) -> Decision:
    """``decide`` from the workers' tally and the overdue load: what a caller keeping both up to date calls."""
    load = t.held + overdue
    target = _target(t, load, now, last_activity, params)
    # An errored worker is removed; its capacity no longer counts, so the
    # target above starts a replacement wherever one is still needed.
    destroy = list(t.errored)
    cold = t.cold
    resume: tuple[int, ...] = ()
    stop: list[int] = []
    provision = 0

    missing = target - t.live
    if missing > 0:
        resume = tuple(w.id for w in cold[:missing])
        cold = cold[len(resume) :]
        provision = missing - len(resume)
    elif missing < 0:
        idle = _stoppable(t.idle, now, policy)
        kept_cold = len(cold)
        for worker in idle[:-missing]:
            # Only a loaded worker is worth keeping cold.
            if worker.phase is READY and kept_cold < params.cold_workers:
                stop.append(worker.id)
                kept_cold += 1
            else:
                destroy.append(worker.id)
    surplus_cold = len(cold) + len(stop) - params.cold_workers
    if surplus_cold > 0:
        destroy.extend(w.id for w in cold[:surplus_cold])
    return Decision(
        target=target,
        load=load,
        perf=t.perf,
        provision=provision,
        resume=resume,
        stop=tuple(stop),
        destroy=tuple(destroy),
    )


def _idle(worker: WorkerView) -> bool:
    return worker.load <= EPSILON and worker.sessions == 0 and worker.idle_since is not None


def _stoppable(idle: Sequence[WorkerView], now: float, policy: LocalPolicy) -> list[WorkerView]:
    """Of the idle workers (a tally's ``idle``: none holds load or a session), those a scale-down may take now,
    least useful first."""
    delay = policy.scale_down_delay - EPSILON
    due = [w for w in idle if now - w.idle_since >= delay]  # type: ignore[operator]
    return sorted(due, key=lambda w: (_STOP_ORDER[w.phase], -w.created_at, -w.id))


def first_after(origin: float, span: float) -> float:
    """The first clock value ``t`` at which ``t - origin >= span``, as the subtraction rounds.

    ``origin + span`` can round to an instant a little before that (the test
    then still fails there) or a little after it: on epoch-second clocks an ulp
    is 2e-7 s. A moment named for a test to change is this one, so the step
    taken there sees the change, and no earlier instant would.
    """
    moment = origin + span
    if moment - origin >= span:
        below = math.nextafter(moment, -math.inf)
        while below - origin >= span:
            moment, below = below, math.nextafter(below, -math.inf)
    else:
        while moment - origin < span:
            moment = math.nextafter(moment, math.inf)
    return moment


def next_change(snapshot: Snapshot, params: EndpointParams, policy: LocalPolicy) -> float | None:
    """The earliest moment after ``snapshot.now`` at which ``decide`` may act differently, or None.

    Only the clock moves: the workers, waiting requests and last activity stay
    as in ``snapshot``. Three things in ``decide`` depend on the time alone:

    - a waiting request starts to count as load once it has waited
      ``target_queue_time``; that matters once the added load moves the
      target;
    - an idle live worker becomes stoppable once it has been idle
      ``policy.scale_down_delay``; that matters while the target is below
      the live workers;
    - the last worker may go once ``inactivity_timeout`` has passed since the
      last activity (only while ``min_load`` is 0).

    The answer may be early (``decide`` then acts the same again) but never
    late: for every ``t`` in ``[snapshot.now, next_change)``, ``decide`` at
    ``t`` gives the same target and the same workers to start and stop as at
    ``snapshot.now`` (its ``load`` may have grown). It is always greater than
    ``snapshot.now``, so a caller that moves its clock there and asks again
    makes progress. None: nothing changes until an event.
    """
    t = tally(snapshot.workers, policy)
    overdue = overdue_load(snapshot.waiting, snapshot.now, params)
    return change_from(t, snapshot.waiting, snapshot.now, snapshot.last_activity, params, policy, overdue=overdue)


def change_from(
    t: Tally,
    waiting: Iterable[WaitingRequest],
    now: float,
    last_activity: float,
    params: EndpointParams,
    policy: LocalPolicy,
    busy: bool = False,
    *,
    overdue: float,
) -> float | None:
    """``next_change`` from the workers' tally and the ``overdue`` load at ``now``.

    ``waiting`` must hold every request not yet overdue at ``now`` (overdue
    ones may be there too). ``busy``: some load, grant, session or waiting
    request is there, so the caller moves the last activity to every moment
    it decides at until an event ends that; the inactivity timeout cannot run
    out before then.
    """
    queue_time = params.target_queue_time
    load = t.held + overdue
    target = _target(t, load, now, last_activity, params)
    moments = []
    wait = queue_time - EPSILON
    fresh = sorted((r.since, r.cost) for r in waiting if now - r.since < wait)
    for since, cost in fresh:
        moment = first_after(since, wait)
        # The load grows by each request in turn; the first that moves the target counts.
        # Summed in another order than decide's, so a target that a rounding could move counts too.
        load += cost
        active = moment if busy else last_activity
        slack = _ROUNDING * max(1.0, load)
        if (
            _target(t, load - slack, moment, active, params) != target
            or _target(t, load + slack, moment, active, params) != target
        ):
            moments.append(moment)
            break
    if target < t.live:
        # Every worker in t.idle has an idle_since. Of those not idle long enough yet, the one idle
        # longest becomes stoppable first.
        delay = policy.scale_down_delay - EPSILON
        not_yet = [w.idle_since for w in t.idle if w.idle_since is not None and now - w.idle_since < delay]
        if not_yet:
            moments.append(first_after(min(not_yet), delay))
    timeout = params.inactivity_timeout
    if (
        timeout is not None
        and params.min_load <= EPSILON
        and t.still_there
        and not busy
        and not inactive_since(last_activity, now, params)
    ):
        moments.append(first_after(last_activity, timeout - EPSILON))
    if not moments:
        return None
    # On large clock values (epoch seconds) the sum above can round to now or
    # before it: then the next representable instant, so a caller moves on.
    return max(min(moments), math.nextafter(now, math.inf))
