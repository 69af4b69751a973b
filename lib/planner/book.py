"""The fleet's bookkeeping on a virtual clock: workers, waiting sessions, idle clocks, billing.

What ``lib.standin.fleet.Fleet`` keeps between scaling steps, without its
processes and sockets, so the planner can drive it from events: sessions ask
for a worker and wait, waiting sessions are served oldest first as workers
free up (the stand-in's route hold, with no overtaking), a released worker
starts its idle clock, and the phase a worker is in is billed by the second.
Every decision is the stand-in's own: ``choose_worker`` picks the worker,
the caller runs ``decide`` on ``snapshot()``.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from lib.standin.scaling import (
    EPSILON,
    LIVE,
    EndpointParams,
    LocalPolicy,
    Phase,
    Snapshot,
    WaitingRequest,
    WorkerView,
    choose_worker,
)


@dataclass
class _Worker:
    id: int
    created_at: float
    phase: Phase
    phase_since: float
    cur_load: float = 0.0
    max_perf: float = 0.0
    idle_since: float | None = None
    keep: bool = False  # while stopping: becomes cold rather than gone
    generation: int = 0  # bumped on every start and stop, so a stale event is ignored
    view: WorkerView | None = None

    def as_view(self) -> WorkerView:
        if self.view is None:
            self.view = WorkerView(
                id=self.id,
                phase=self.phase,
                created_at=self.created_at,
                cur_load=self.cur_load,
                max_perf=self.max_perf,
                idle_since=self.idle_since,
            )
        return self.view


class Book:
    def __init__(self, params: EndpointParams, policy: LocalPolicy, *, perf: float):
        self.params = params
        self.policy = policy
        self.perf = perf
        self.workers: dict[int, _Worker] = {}
        self.waiting: deque[WaitingRequest] = deque()
        self.last_activity = 0.0
        self.live_count = 0
        self.counts = {phase: 0 for phase in Phase}
        self.held = 0.0  # load on all workers
        self._loaded = 0  # workers holding load
        # Ready workers holding nothing: with every session filling its worker
        # (cost == max_perf), the only ones choose_worker can pick.
        self._free: dict[int, _Worker] = {}
        self._ids = itertools.count(1)
        self._phase_s = {phase.value: 0.0 for phase in Phase}

    # -- sessions ----------------------------------------------------------------

    def ask(self, request_idx: int, cost: float, now: float) -> None:
        """A session asks for a worker; it waits until ``serve`` finds it one."""
        self.last_activity = now
        self.waiting.append(WaitingRequest(request_idx, cost, now))

    def serve(self, now: float) -> Iterator[tuple[int, int]]:
        """Waiting sessions routed now, oldest first, as ``(request_idx, worker_id)``; stops at the first that waits."""
        while self.waiting and self._free:
            request = self.waiting[0]
            worker_id = choose_worker([w.as_view() for w in self._free.values()], request.cost, self.params)
            if worker_id is None:
                return
            self.waiting.popleft()
            worker = self.workers[worker_id]
            if worker.cur_load <= EPSILON:
                self._loaded += 1
            del self._free[worker_id]
            worker.cur_load += request.cost
            self.held += request.cost
            worker.idle_since = None
            worker.view = None
            self.last_activity = now
            yield request.request_idx, worker_id

    def release(self, worker_id: int, cost: float, now: float) -> None:
        """A session on ``worker_id`` ended: its load is gone; an emptied worker starts its idle clock."""
        worker = self.workers[worker_id]
        worker.cur_load -= cost
        self.held -= cost
        if worker.cur_load <= EPSILON:
            worker.cur_load = 0.0
            worker.idle_since = now
            self._loaded -= 1
            if worker.phase is Phase.READY:
                self._free[worker_id] = worker
        worker.view = None
        self.last_activity = now

    # -- workers -----------------------------------------------------------------

    def provision(self, now: float) -> int:
        worker = _Worker(next(self._ids), created_at=now, phase=Phase.PROVISIONING, phase_since=now, idle_since=now)
        self.workers[worker.id] = worker
        self.live_count += 1
        self.counts[Phase.PROVISIONING] += 1
        return worker.id

    def resume(self, worker_id: int, now: float) -> None:
        worker = self.workers[worker_id]
        self._set_phase(worker, Phase.LOADING, now)
        worker.idle_since = now
        worker.generation += 1

    def ready(self, worker_id: int, generation: int, max_perf: float, now: float) -> bool:
        """Its ready report; False when the worker was stopped since that start."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.generation != generation or worker.phase not in (Phase.PROVISIONING, Phase.LOADING):
            return False
        self._set_phase(worker, Phase.READY, now)
        worker.max_perf = max_perf
        if worker.cur_load <= EPSILON:
            self._free[worker_id] = worker
        # Its scale-down clock starts at ready, as in the stand-in.
        if worker.idle_since is not None:
            worker.idle_since = now
        return True

    def stop(self, worker_id: int, *, keep: bool, now: float) -> bool | None:
        """Starts stopping it; True when a process must stop (that takes time), None if already stopping or cold."""
        worker = self.workers[worker_id]
        if worker.phase is Phase.COLD:
            self._set_phase(worker, Phase.STOPPING, now)
            worker.keep = False
            worker.generation += 1
            return False
        if worker.phase is Phase.STOPPING:
            return None
        had_process = worker.phase is not Phase.PROVISIONING
        self._set_phase(worker, Phase.STOPPING, now)
        worker.keep = keep
        worker.generation += 1
        return had_process

    def stopped(self, worker_id: int, generation: int, now: float) -> Phase | None:
        """It has stopped: COLD when kept, None when gone (or the event is stale)."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.generation != generation or worker.phase is not Phase.STOPPING:
            return None
        if worker.keep:
            self._set_phase(worker, Phase.COLD, now)
            worker.cur_load = worker.max_perf = 0.0
            return Phase.COLD
        self._set_phase(worker, Phase.STOPPING, now)  # bills the stopping seconds
        self.counts[Phase.STOPPING] -= 1
        del self.workers[worker_id]
        return None

    def generation(self, worker_id: int) -> int:
        return self.workers[worker_id].generation

    # -- what the scaling model sees -------------------------------------------------

    def snapshot(self, now: float, waiting_limit: int | None = None) -> Snapshot:
        """The fleet as ``decide`` takes it; at most ``waiting_limit`` of the oldest waiting sessions."""
        if self._loaded or self.waiting:
            self.last_activity = now
        return Snapshot(
            now=now, workers=self._views(), waiting=self._oldest(waiting_limit), last_activity=self.last_activity
        )

    def summary(self, now: float, waiting_limit: int | None = None) -> Snapshot:
        """A snapshot with the same target as ``snapshot()``: the fleet folded into one worker.

        ``target_workers`` reads the workers only through the load they hold,
        the mean max_perf of ready ones (every worker reports the same) and
        whether any is live, so one view carrying those gives it the same answer.
        """
        if self._loaded or self.waiting:
            self.last_activity = now
        workers: tuple[WorkerView, ...] = ()
        if self.live_count:
            ready = self.counts[Phase.READY] > 0
            folded = WorkerView(
                id=0,
                phase=Phase.READY if ready else Phase.PROVISIONING,
                created_at=0.0,
                cur_load=self.held,
                max_perf=self.perf if ready else 0.0,
            )
            workers = (folded,)
        return Snapshot(now=now, workers=workers, waiting=self._oldest(waiting_limit), last_activity=self.last_activity)

    def may_change(self, target: int, now: float) -> bool:
        """Whether ``decide`` would start or stop anything now, given the target it will compute.

        It provisions or resumes when the target is above the live workers,
        stops or destroys when it is below and some live worker has been idle
        the scale-down delay, and destroys cold workers beyond cold_workers.
        """
        live = self.live_count
        if target > live or self.counts[Phase.COLD] > self.params.cold_workers:
            return True
        if target < live:
            limit = now - self.policy.scale_down_delay + EPSILON
            for worker in self.workers.values():
                if (
                    worker.phase in LIVE
                    and worker.cur_load <= EPSILON
                    and worker.idle_since is not None
                    and worker.idle_since <= limit
                ):
                    return True
        return False

    def next_change(self, now: float, target: int) -> float | None:
        """The first moment after ``now`` at which the decision can change with no event.

        Time alone moves it in three ways: a waiting session passes
        target_queue_time and counts as demand; the fleet passes
        inactivity_timeout; and, while the target is below the live workers,
        an idle worker passes the scale-down delay.
        """
        params = self.params
        found = math.inf
        for request in self.waiting:
            at = request.since + params.target_queue_time
            if at > now + EPSILON:
                found = at  # the oldest not yet overdue; the rest pass later
                break
        if target < self.live_count:
            delay = self.policy.scale_down_delay
            for worker in self.workers.values():
                if worker.phase in LIVE and worker.idle_since is not None and worker.cur_load <= EPSILON:
                    at = worker.idle_since + delay
                    if now + EPSILON < at < found:
                        found = at
        if params.inactivity_timeout is not None:
            at = self.last_activity + params.inactivity_timeout
            if now + EPSILON < at < found:
                found = at
        return found if found < math.inf else None

    def _oldest(self, limit: int | None) -> tuple[WaitingRequest, ...]:
        waiting = self.waiting
        if limit is not None and len(waiting) > limit:
            return tuple(itertools.islice(waiting, limit))
        return tuple(waiting)

    def close(self, now: float) -> dict[str, float]:
        """Seconds spent in each phase, summed over workers, with every worker billed up to ``now``."""
        totals = dict(self._phase_s)
        for worker in self.workers.values():
            totals[worker.phase.value] += max(0.0, now - worker.phase_since)
        return totals

    def _views(self) -> tuple[WorkerView, ...]:
        return tuple(worker.as_view() for worker in self.workers.values())

    def _set_phase(self, worker: _Worker, phase: Phase, now: float) -> None:
        self._phase_s[worker.phase.value] += now - worker.phase_since
        was_live = worker.phase in LIVE
        self.counts[worker.phase] -= 1
        self.counts[phase] += 1
        if phase is not Phase.READY:
            self._free.pop(worker.id, None)
        worker.phase = phase
        worker.phase_since = now
        worker.view = None
        self.live_count += (phase in LIVE) - was_live
