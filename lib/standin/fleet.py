"""The stand-in's instances: real worker processes, started and stopped by the scaling model.

A ``Fleet`` keeps what workers reported, the grants it handed out and the
requests waiting for a worker; every tick it turns that into a
``lib.standin.scaling.Snapshot``, asks ``lib.standin.scaling.decide`` what to do and does it.
Each instance is a ``python -m workers.null.worker`` in its own process
group, working directory and ports; ``aclose`` stops them all, and an
``atexit`` hook kills any still running should the event loop die first.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.standin.process import WorkerPorts, WorkerProcess, worker_env
from lib.standin.scaling import (
    EPSILON,
    LIVE,
    Decision,
    EndpointParams,
    LocalPolicy,
    Phase,
    Snapshot,
    WaitingRequest,
    WorkerView,
    choose_worker,
    decide,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetSettings:
    params: EndpointParams = field(default_factory=EndpointParams)
    policy: LocalPolicy = field(default_factory=LocalPolicy)
    # Seconds from creating an instance to starting its worker: Vast's cold start.
    provisioning_delay: float = 3.0
    # A worker not ready this long after its process started is replaced.
    load_timeout: float = 60.0
    # A grant its worker's reports do not show after this long stops counting.
    grant_timeout: float = 5.0
    # A waiting request the SDK stopped polling for is forgotten after this
    # long; the SDK polls at least every 5 s plus its 10 s route timeout.
    waiting_timeout: float = 20.0
    # A /route/ with no free worker is answered as soon as one frees up, or
    # with a waiting answer after this long. Under the SDK's 10 s route
    # timeout; it spares the SDK's up-to-5 s random pauses between polls.
    route_hold: float = 6.0
    # SIGTERM, then SIGKILL after this long; the worker exits within 5 s.
    stop_grace: float = 8.0
    tick: float = 0.2
    # While instances exist, the fleet line is repeated this often so ages stay current.
    summary_every: float = 10.0
    python: str = sys.executable
    worker_env: tuple[tuple[str, str], ...] = ()

    def problems(self) -> list[str]:
        found = list(self.params.problems())
        for name in (
            "provisioning_delay",
            "load_timeout",
            "grant_timeout",
            "waiting_timeout",
            "route_hold",
            "stop_grace",
        ):
            value = getattr(self, name)
            if not value >= 0:
                found.append(f"{name} {value} must be a number of seconds >= 0")
        if not self.policy.scale_down_delay >= 0:
            found.append(f"scale_down_delay {self.policy.scale_down_delay} must be a number of seconds >= 0")
        if not self.policy.assumed_perf > 0:
            found.append(f"assumed_perf {self.policy.assumed_perf} must be > 0")
        return found


@dataclass
class Instance:
    id: int
    cwd: Path
    created_at: float
    phase: Phase = Phase.PROVISIONING
    phase_since: float = 0.0
    ports: WorkerPorts | None = None
    process: WorkerProcess | None = None
    task: asyncio.Future[Any] | None = None
    cur_load: float = 0.0
    max_perf: float = 0.0
    error: str = ""
    working: tuple[int, ...] = ()
    idle_since: float | None = None
    last_report: float | None = None
    booted_at: float = 0.0  # created, or restarted from cold

    @property
    def url(self) -> str:
        return self.ports.url if self.ports else ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


@dataclass
class Grant:
    request_idx: int
    worker_id: int
    cost: float
    at: float
    queued_since: float


@dataclass
class Waiting:
    request: WaitingRequest
    last_poll: float


@dataclass
class SeenSession:
    request_idx: int
    worker_id: int
    since: float


@dataclass(frozen=True)
class RouteAnswer:
    request_idx: int
    worker_id: int | None = None
    url: str | None = None


class Fleet:
    def __init__(
        self,
        settings: FleetSettings,
        *,
        workdir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.clock = clock
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="null-local-")) if workdir is None else workdir
        self.report_addr = ""
        self.instances: dict[int, Instance] = {}
        self.waiting: dict[int, Waiting] = {}
        self.grants: dict[int, Grant] = {}
        self.sessions: dict[int, SeenSession] = {}
        self.created: list[int] = []  # every instance id ever created, in order
        self.started_at = clock()
        self.last_activity = self.started_at
        self.last_decision: Decision | None = None
        self._ids = itertools.count(1)
        self._next_request_idx = 1
        self._loop_task: asyncio.Future[None] | None = None
        self._poke = asyncio.Event()
        self._changed = asyncio.Condition()
        self._parked: dict[int, asyncio.Future[RouteAnswer]] = {}
        self._closing = False
        self._last_summary: tuple[Any, ...] = ()
        self._last_summary_at = 0.0

    # -- lifecycle ------------------------------------------------------------

    def start(self, report_addr: str) -> None:
        """Runs the scaling loop; workers report to ``report_addr``."""
        self.report_addr = report_addr
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.kill_now)
        self._loop_task = asyncio.ensure_future(self._run())

    async def aclose(self) -> None:
        """Stops every instance (SIGTERM, then SIGKILL after the grace) and removes their files."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._loop_task
        for inst in list(self.instances.values()):
            if inst.phase is not Phase.STOPPING:
                self._retire(inst, keep=False, reason="shutdown")
        pending = [inst.task for inst in self.instances.values() if inst.task is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.kill_now()
        atexit.unregister(self.kill_now)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill_now(self) -> None:
        """SIGKILL to every worker's process group; safe from atexit with no event loop."""
        for inst in list(self.instances.values()):
            if inst.process is not None and inst.process.running and inst.pid:
                with suppress(ProcessLookupError, PermissionError):
                    # start_new_session made the worker its group's leader.
                    os.killpg(inst.pid, signal.SIGKILL)

    async def wait_for(self, predicate: Callable[[Fleet], Any], timeout: float) -> Any:
        """Waits until ``predicate(self)`` is truthy and returns it; TimeoutError after ``timeout``."""

        async def until() -> Any:
            async with self._changed:
                while True:
                    value = predicate(self)
                    if value:
                        return value
                    await self._changed.wait()

        return await asyncio.wait_for(until(), timeout)

    # -- what the SDK and the workers send --------------------------------------

    async def route_held(self, cost: float, request_idx: int) -> RouteAnswer:
        """``route``, but a request that must wait is held up to ``route_hold`` for a worker to free up."""
        answer = self.route(cost, request_idx)
        if answer.url is not None or self.settings.route_hold <= 0:
            return answer
        parked: asyncio.Future[RouteAnswer] = asyncio.get_running_loop().create_future()
        self._parked[answer.request_idx] = parked
        try:
            return await asyncio.wait_for(asyncio.shield(parked), self.settings.route_hold)
        except asyncio.TimeoutError:
            return answer
        finally:
            if self._parked.get(answer.request_idx) is parked:
                del self._parked[answer.request_idx]
            parked.cancel()

    def _serve_parked(self) -> None:
        """Hands workers with room to held requests, the longest-waiting first."""
        if not self._parked:
            return
        ordered = sorted((entry.request.since, idx) for idx, entry in self.waiting.items() if idx in self._parked)
        for _, idx in ordered:
            parked = self._parked[idx]
            if parked.done():
                continue
            answer = self.route(self.waiting[idx].request.cost, idx)
            if answer.url is None:
                break  # served in arrival order, like a queue: no overtaking
            parked.set_result(answer)

    def route(self, cost: float, request_idx: int) -> RouteAnswer:
        """A grant on a worker with room, or a request index to poll again with."""
        now = self.clock()
        self.last_activity = now
        if request_idx <= 0:
            request_idx = self._next_request_idx
        self._next_request_idx = max(self._next_request_idx, request_idx + 1)
        # The same index again after a grant: its worker turned it down (429), route anew.
        earlier = self.grants.pop(request_idx, None)
        entry = self.waiting.get(request_idx)
        queued_since = entry.request.since if entry else earlier.queued_since if earlier else now
        worker_id = choose_worker(self._views(now), cost, self.settings.params)
        if worker_id is None:
            if entry is None:
                log.info("request %d waits for a worker (cost %g)", request_idx, cost)
            self.waiting[request_idx] = Waiting(WaitingRequest(request_idx, cost, queued_since), last_poll=now)
            self._poke.set()
            return RouteAnswer(request_idx)
        self.waiting.pop(request_idx, None)
        self.grants[request_idx] = Grant(request_idx, worker_id, cost, now, queued_since)
        inst = self.instances[worker_id]
        inst.idle_since = None
        log.info("request %d routed to worker %d after %.1fs", request_idx, worker_id, now - queued_since)
        self._poke.set()
        return RouteAnswer(request_idx, worker_id, inst.url)

    def on_report(self, report: Mapping[str, Any]) -> bool:
        """Takes a worker's /worker_status/ body; False when it is from no current instance."""
        now = self.clock()
        inst = self.instances.get(report["id"])
        if inst is None or inst.phase not in (Phase.LOADING, Phase.READY, Phase.STOPPING):
            return False
        inst.last_report = now
        inst.cur_load = float(report.get("cur_load") or 0.0)
        inst.max_perf = float(report.get("max_perf") or 0.0)
        inst.working = tuple(int(i) for i in report.get("working_request_idxs") or ())
        error = str(report.get("error_msg") or "")
        self._track_sessions(inst, now)
        if inst.phase is Phase.STOPPING:
            return True
        if error:
            inst.error = error
            self._set_phase(inst, Phase.ERRORED, now)
            log.warning("worker %d reported an error: %s", inst.id, error)
        elif inst.phase is Phase.LOADING and inst.max_perf > 0:
            self._set_phase(inst, Phase.READY, now)
            # Its scale-down clock starts now: a waiting client may take a
            # few seconds to poll again and find it.
            if inst.idle_since is not None:
                inst.idle_since = now
            log.info("worker %d ready after %.1fs (max_perf %g)", inst.id, now - inst.booted_at, inst.max_perf)
        self._serve_parked()
        self._poke.set()
        return True

    def on_deleted(self, worker_id: int, requests: list[Mapping[str, Any]]) -> None:
        """Takes a worker's /delete_requests/ list: finished or refused requests and sessions."""
        now = self.clock()
        for item in requests:
            idx = item.get("request_idx")
            grant = self.grants.get(idx) if isinstance(idx, int) else None
            if grant is not None and grant.worker_id == worker_id:
                del self.grants[idx]
            if item.get("success") is False:
                log.info("request %s refused by worker %d (%s)", idx, worker_id, item.get("status"))
                if grant is not None and idx not in self.waiting:
                    # The SDK routes a refused create again with the same
                    # index: it is still demand, as old as it was.
                    request = WaitingRequest(grant.request_idx, grant.cost, grant.queued_since)
                    self.waiting[grant.request_idx] = Waiting(request, last_poll=now)
        self._serve_parked()
        self._poke.set()

    def _track_sessions(self, inst: Instance, now: float) -> None:
        for idx in inst.working:
            grant = self.grants.get(idx)
            if grant is not None and grant.worker_id == inst.id:
                del self.grants[idx]
            if idx not in self.sessions:
                self.sessions[idx] = SeenSession(idx, inst.id, now)
                log.info("session %d open on worker %d", idx, inst.id)
        for idx, seen in list(self.sessions.items()):
            if seen.worker_id == inst.id and idx not in inst.working:
                del self.sessions[idx]
                log.info("session %d on worker %d ended after %.1fs", idx, inst.id, now - seen.since)

    # -- the scaling loop ---------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            await self._nap()
            self._poke.clear()
            try:
                self.step()
            except Exception:
                log.exception("scaling step failed; retrying on the next tick")
            async with self._changed:
                self._changed.notify_all()

    async def _nap(self) -> None:
        """Until poked or a tick passes."""
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancel
        # that lands as the event is set, and this loop would never stop.
        waiter = asyncio.ensure_future(self._poke.wait())
        try:
            await asyncio.wait({waiter}, timeout=self.settings.tick)
        finally:
            waiter.cancel()

    def step(self) -> Decision:
        """One pass: expire stale state, decide, act, show what changed."""
        now = self.clock()
        self._expire(now)
        views = self._views(now)
        if any(w.load > EPSILON for w in views) or self.waiting:
            self.last_activity = now
        snapshot = Snapshot(
            now=now,
            workers=tuple(views),
            waiting=tuple(w.request for w in self.waiting.values()),
            last_activity=self.last_activity,
        )
        decision = decide(snapshot, self.settings.params, self.settings.policy)
        self.last_decision = decision
        if not self._closing:
            self._apply(decision, now)
            self._serve_parked()
        self._show(now)
        return decision

    def _expire(self, now: float) -> None:
        for idx, grant in list(self.grants.items()):
            if now - grant.at > self.settings.grant_timeout:
                del self.grants[idx]
                log.debug("grant %d on worker %d not seen in its reports; no longer counted", idx, grant.worker_id)
        for idx, entry in list(self.waiting.items()):
            if now - entry.last_poll > self.settings.waiting_timeout:
                del self.waiting[idx]
                log.info("request %d no longer polled; dropped", idx)
        for inst in self.instances.values():
            # returncode stays None while the process is still being spawned.
            if (
                inst.phase in (Phase.LOADING, Phase.READY)
                and inst.process is not None
                and inst.process.returncode is not None
            ):
                inst.error = f"process exited with code {inst.process.returncode}"
                self._set_phase(inst, Phase.ERRORED, now)
                log.warning("worker %d %s; its last output:\n%s", inst.id, inst.error, inst.process.tail(8))
            elif inst.phase is Phase.LOADING and now - inst.phase_since > self.settings.load_timeout:
                inst.error = f"not ready {self.settings.load_timeout:g}s after starting"
                self._set_phase(inst, Phase.ERRORED, now)
                log.warning("worker %d %s", inst.id, inst.error)
        for inst in self.instances.values():
            reserved = self._reserved(inst.id)
            if inst.cur_load + reserved > EPSILON:
                inst.idle_since = None
            elif inst.idle_since is None:
                inst.idle_since = now

    def _reserved(self, worker_id: int) -> float:
        return sum(g.cost for g in self.grants.values() if g.worker_id == worker_id)

    def _views(self, now: float) -> list[WorkerView]:
        return [
            WorkerView(
                id=inst.id,
                phase=inst.phase,
                created_at=inst.created_at,
                cur_load=inst.cur_load,
                max_perf=inst.max_perf,
                reserved=self._reserved(inst.id),
                idle_since=inst.idle_since,
            )
            for inst in self.instances.values()
        ]

    def _apply(self, decision: Decision, now: float) -> None:
        for worker_id in decision.destroy:
            inst = self.instances[worker_id]
            reason = f"errored: {inst.error}" if inst.phase is Phase.ERRORED else self._surplus_reason(inst, now)
            self._retire(inst, keep=False, reason=reason)
        for worker_id in decision.stop:
            inst = self.instances[worker_id]
            self._retire(inst, keep=True, reason=self._surplus_reason(inst, now))
        for worker_id in decision.resume:
            inst = self.instances[worker_id]
            self._set_phase(inst, Phase.LOADING, now)
            inst.idle_since = inst.booted_at = now
            log.info(
                "worker %d starting again from cold: load %g, workers wanted %d",
                inst.id,
                decision.load,
                decision.target,
            )
            inst.task = asyncio.ensure_future(self._launch(inst, delay=0.0))
        for _ in range(decision.provision):
            worker_id = next(self._ids)
            inst = Instance(
                id=worker_id,
                cwd=self.workdir / f"worker-{worker_id}",
                created_at=now,
                phase_since=now,
                idle_since=now,
                booted_at=now,
            )
            self.instances[inst.id] = inst
            self.created.append(inst.id)
            log.info(
                "worker %d provisioning: load %g, workers wanted %d (cold start %.1fs)",
                inst.id,
                decision.load,
                decision.target,
                self.settings.provisioning_delay,
            )
            inst.task = asyncio.ensure_future(self._launch(inst, delay=self.settings.provisioning_delay))

    def _surplus_reason(self, inst: Instance, now: float) -> str:
        idle = now - inst.idle_since if inst.idle_since is not None else 0.0
        return f"surplus, idle {idle:.1f}s"

    # -- one instance ---------------------------------------------------------------

    def _set_phase(self, inst: Instance, phase: Phase, now: float) -> None:
        inst.phase = phase
        inst.phase_since = now

    async def _launch(self, inst: Instance, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        now = self.clock()
        inst.ports = WorkerPorts.allocate()
        env = worker_env(
            ports=inst.ports,
            container_id=inst.id,
            report_addr=self.report_addr,
            extra=dict(self.settings.worker_env),
        )
        inst.process = WorkerProcess(env=env, cwd=inst.cwd, python=self.settings.python)
        inst.cur_load = inst.max_perf = 0.0
        inst.working = ()
        inst.error = ""
        self._set_phase(inst, Phase.LOADING, now)
        try:
            await inst.process.start()
        except Exception as exc:  # a missing interpreter, no file descriptors left...
            inst.process = None
            if inst.phase is Phase.LOADING:
                inst.error = f"could not start: {exc}"
                self._set_phase(inst, Phase.ERRORED, self.clock())
                log.warning("worker %d %s", inst.id, inst.error)
            return
        log.info("worker %d loading: pid %d, %s", inst.id, inst.process.pid, inst.url)
        self._poke.set()

    def _retire(self, inst: Instance, *, keep: bool, reason: str) -> None:
        launching = inst.task if inst.task is not None and not inst.task.done() else None
        self._set_phase(inst, Phase.STOPPING, self.clock())
        log.info("worker %d stopping (%s)", inst.id, reason)
        inst.task = asyncio.ensure_future(self._stop(inst, keep, launching))

    async def _stop(self, inst: Instance, keep: bool, launching: asyncio.Future[Any] | None) -> None:
        if launching is not None:
            # Before its process exists the launch is only sleeping out the cold
            # start; after, it is inside process.start() and must finish so
            # the process it forks is not lost.
            if inst.process is None:
                launching.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await launching
        code = None
        if inst.process is not None:
            code = await inst.process.stop(self.settings.stop_grace)
        for idx, grant in list(self.grants.items()):
            if grant.worker_id == inst.id:
                del self.grants[idx]
        for idx, seen in list(self.sessions.items()):
            if seen.worker_id == inst.id:
                del self.sessions[idx]
                log.info("session %d on worker %d ended with the worker", idx, inst.id)
        now = self.clock()
        exit_note = "" if code is None else f", exit code {code}"
        if keep and not self._closing:
            inst.process = None
            inst.ports = None
            inst.cur_load = inst.max_perf = 0.0
            inst.working = ()
            self._set_phase(inst, Phase.COLD, now)
            log.info("worker %d cold: stopped, files kept for a fast restart%s", inst.id, exit_note)
        else:
            self.instances.pop(inst.id, None)
            shutil.rmtree(inst.cwd, ignore_errors=True)
            log.info("worker %d stopped%s", inst.id, exit_note)
        self._poke.set()

    # -- what the terminal shows ---------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Each instance as /get_endpoint_workers/ lists it (the SDK's Worker fields, plus a few)."""
        now = self.clock()
        rows = []
        for inst in sorted(self.instances.values(), key=lambda i: i.id):
            rows.append(
                {
                    "id": inst.id,
                    "status": inst.phase.value,
                    "cur_load": inst.cur_load,
                    "new_load": 0.0,
                    "cur_load_rolling_avg": inst.cur_load,
                    "cur_perf": 0.0,
                    "perf": inst.max_perf,
                    "measured_perf": inst.max_perf,
                    "dlperf": 0.0,
                    "reliability": 1.0,
                    "reqs_working": len(inst.working),
                    "disk_usage": 0.0,
                    "loaded_at": inst.phase_since if inst.phase is Phase.READY else 0.0,
                    "started_at": inst.created_at,
                    "url": inst.url,
                    "pid": inst.pid,
                    "reserved": self._reserved(inst.id),
                    "age": round(now - inst.created_at, 3),
                    "error_msg": inst.error,
                    "sessions": [idx for idx, s in self.sessions.items() if s.worker_id == inst.id],
                }
            )
        return rows

    def summary(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        parts = []
        for inst in sorted(self.instances.values(), key=lambda i: i.id):
            text = f"#{inst.id} {inst.phase.value}"
            if inst.phase in (Phase.READY, Phase.STOPPING) or inst.cur_load:
                load = inst.cur_load + self._reserved(inst.id)
                text += f" {load:g}/{inst.max_perf or self.settings.policy.assumed_perf:g}"
            text += f" {now - inst.created_at:.0f}s"
            held = [idx for idx, s in self.sessions.items() if s.worker_id == inst.id]
            if held:
                text += " session " + ",".join(str(i) for i in held)
            parts.append(text)
        waiting = len(self.waiting)
        head = f"fleet: {len(self.live())} live"
        if waiting:
            head += f", {waiting} waiting"
        return head + (" | " + " | ".join(parts) if parts else "")

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.phase in LIVE]

    def running_pids(self) -> list[int]:
        return [i.pid for i in self.instances.values() if i.process is not None and i.process.running and i.pid]

    def _show(self, now: float) -> None:
        shape = tuple(
            (i.id, i.phase, i.cur_load + self._reserved(i.id), tuple(sorted(i.working)))
            for i in sorted(self.instances.values(), key=lambda i: i.id)
        ) + (len(self.waiting),)
        due = bool(self.instances) and now - self._last_summary_at >= self.settings.summary_every
        if shape != self._last_summary or due:
            self._last_summary = shape
            self._last_summary_at = now
            log.info("%s", self.summary(now))
