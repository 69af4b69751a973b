"""The stand-in's instances: real worker processes, started and stopped as the book says.

``Fleet`` is the I/O driver of ``lib.standin.book.Book``: it feeds the book
what the SDK and the workers send, on the wall clock, carries out the book's
commands (start a worker after the cold start, stop one, answer a held
/route/), and sleeps until the book's next deadline or the next event; it
never polls. Each instance is a ``python -m workers.null.worker`` in its own
process group, working directory and ports, with the optional consumer
command in the same group; ``aclose`` stops them all, and an ``atexit`` hook
kills any still running should the event loop die first.
"""

from __future__ import annotations

import asyncio
import atexit
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

from lib.standin.book import (
    Answer,
    Book,
    BookSettings,
    Command,
    Deleted,
    Grant,
    Provision,
    Report,
    Resume,
    SeenSession,
    Stop,
    Waiting,
    Worker,
)
from lib.standin.process import WorkerPorts, WorkerProcess, worker_env
from lib.standin.scaling import LIVE, Decision, Phase
from workers.null.aio import stop_task

log = logging.getLogger(__name__)

__all__ = ["Fleet", "FleetSettings", "Instance", "RouteAnswer", "Grant", "Waiting", "SeenSession"]


# The SDK gives up on a /route/ call after 10 s; a held one is answered before.
MAX_ROUTE_ANSWER = 8.0


@dataclass(frozen=True)
class FleetSettings:
    # What the book decides by: the endpoint's parameters, the policy, its timeouts and the route hold.
    book: BookSettings = field(default_factory=BookSettings)
    # Seconds from creating an instance to starting its worker: Vast's cold start.
    provisioning_delay: float = 3.0
    # SIGTERM, then SIGKILL after this long; the worker exits within 5 s.
    stop_grace: float = 8.0
    # While instances exist, the fleet line is repeated this often so ages stay current.
    summary_every: float = 10.0
    python: str = sys.executable
    worker_env: tuple[tuple[str, str], ...] = ()
    # A command run beside every worker, in its environment and process
    # group, as a template's on-start script runs a queue consumer on Vast.
    consumer: tuple[str, ...] | None = None
    # NULL_CLAIM_DEADLINE for workers with a consumer: a session no consumer
    # claims within this many seconds is released by the worker itself.
    claim_deadline: float = 30.0

    def problems(self) -> list[str]:
        book = self.book
        found = list(book.params.problems())
        if book.route_hold > MAX_ROUTE_ANSWER:
            found.append(
                f"route_hold {book.route_hold} must be at most {MAX_ROUTE_ANSWER:g} s: the SDK gives up on a /route/ "
                "call after 10 s"
            )
        for name, value in (
            ("provisioning_delay", self.provisioning_delay),
            ("load_timeout", book.load_timeout),
            ("grant_timeout", book.grant_timeout),
            ("waiting_timeout", book.waiting_timeout),
            ("route_hold", book.route_hold),
            ("stop_grace", self.stop_grace),
            ("claim_deadline", self.claim_deadline),
        ):
            if not value >= 0:
                found.append(f"{name} {value} must be a number of seconds >= 0")
        if not book.policy.scale_down_delay >= 0:
            found.append(f"scale_down_delay {book.policy.scale_down_delay} must be a number of seconds >= 0")
        if not book.policy.assumed_perf > 0:
            found.append(f"assumed_perf {book.policy.assumed_perf} must be > 0")
        if self.consumer is not None and not self.consumer:
            found.append("consumer must be a command, not empty")
        return found

    def env_for_worker(self) -> dict[str, str]:
        """The extra environment every worker gets on top of what Vast sets."""
        extra = dict(self.worker_env)
        if self.consumer:
            extra.setdefault("NULL_CLAIM_DEADLINE", f"{self.claim_deadline:g}")
        return extra


@dataclass
class Instance:
    """One instance's I/O side; what the autoscaler knows of it is ``state``, the book's record."""

    state: Worker
    cwd: Path
    ports: WorkerPorts | None = None
    process: WorkerProcess | None = None
    consumer: WorkerProcess | None = None
    task: asyncio.Future[Any] | None = None

    @property
    def id(self) -> int:
        return self.state.id

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def created_at(self) -> float:
        return self.state.created_at

    @property
    def cur_load(self) -> float:
        return self.state.cur_load

    @property
    def max_perf(self) -> float:
        return self.state.max_perf

    @property
    def working(self) -> tuple[int, ...]:
        return self.state.working

    @property
    def error(self) -> str:
        return self.state.error

    @property
    def url(self) -> str:
        return self.ports.url if self.ports else ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


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
        self.book = Book(settings.book, clock())
        self._own_workdir = workdir is None
        self._workdir = workdir
        self.report_addr = ""
        self.instances: dict[int, Instance] = {}
        self.urls: dict[int, str] = {}  # every worker's URL once its process started, kept after it is gone
        self.started_at = self.book.last_activity
        self._loop_task: asyncio.Future[None] | None = None
        self._poke = asyncio.Event()
        self._changed = asyncio.Event()
        self._parked: dict[int, asyncio.Future[RouteAnswer]] = {}
        self._closing = False
        self._last_summary: tuple[Any, ...] = ()
        self._last_summary_at = 0.0

    # -- what the book holds, under the names tests and callers use ------------------

    @property
    def waiting(self) -> dict[int, Waiting]:
        return self.book.waiting

    @property
    def grants(self) -> dict[int, Grant]:
        return self.book.grants

    @property
    def sessions(self) -> dict[int, SeenSession]:
        return self.book.sessions

    @property
    def created(self) -> list[int]:
        return self.book.created

    @property
    def last_decision(self) -> Decision | None:
        return self.book.last_decision

    @property
    def last_activity(self) -> float:
        return self.book.last_activity

    def holding_sessions(self) -> dict[int, list[int]]:
        """Instance id -> the sessions (request indexes) it reports holding now; only those holding one."""
        held: dict[int, list[int]] = {}
        for idx, seen in self.book.sessions.items():
            held.setdefault(seen.worker_id, []).append(idx)
        return held

    @property
    def workdir(self) -> Path:
        """Where the workers' files go: the one given, or a temporary one of its own.

        Its own is made on first use (when the fleet starts) and removed when it
        closes, so a fleet that is built and never started leaves nothing behind.
        """
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="null-local-"))
        return self._workdir

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
            await stop_task(self._loop_task)
        self._carry_out(self.book.close(self.clock()))
        pending = [inst.task for inst in self.instances.values() if inst.task is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.kill_now()
        atexit.unregister(self.kill_now)
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def kill_now(self) -> None:
        """SIGKILL to every worker's process group (its consumer too); safe from atexit with no event loop."""
        for inst in list(self.instances.values()):
            self._kill_group(inst)

    def kill(self, instance_id: int) -> bool:
        """SIGKILL to one instance's process group, worker and consumer alike: the instance lost.

        The fleet learns of it as Vast would, from the process going away.
        False when that instance has no running process.
        """
        inst = self.instances.get(instance_id)
        if inst is None or inst.process is None or not inst.process.running:
            return False
        self._kill_group(inst)
        log.info("worker %d killed (SIGKILL to its process group)", instance_id)
        return True

    @staticmethod
    def _kill_group(inst: Instance) -> None:
        for proc in (inst.process, inst.consumer):
            if proc is not None and proc.running and proc.pid:
                with suppress(ProcessLookupError, PermissionError):
                    # The worker leads its own process group;
                    # the consumer joined that group.
                    os.killpg(inst.pid or proc.pid, signal.SIGKILL)

    async def wait_for(self, predicate: Callable[[Fleet], Any], timeout: float) -> Any:
        """Waits until ``predicate(self)`` is truthy and returns it; TimeoutError after ``timeout``."""

        async def until() -> Any:
            while True:
                value = predicate(self)
                if value:
                    return value
                changed = self._changed
                await changed.wait()

        return await asyncio.wait_for(until(), timeout)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- what the SDK and the workers send --------------------------------------

    async def route_held(self, cost: float, request_idx: int) -> RouteAnswer:
        """``route``, but a request that must wait is held up to ``route_hold`` for a worker to free up.

        Cancelled (its client went away), the request stops counting at once.
        """
        routed = self.book.route(self.clock(), cost, request_idx, hold=True)
        if routed.worker_id is not None or routed.held_until is None:
            self._drive()
            return self._answer(routed.request_idx, routed.worker_id)
        idx = routed.request_idx
        earlier = self._parked.pop(idx, None)
        if earlier is not None and not earlier.done():
            earlier.set_result(RouteAnswer(idx))  # the same index held twice: the newer call waits on
        parked: asyncio.Future[RouteAnswer] = asyncio.get_running_loop().create_future()
        self._parked[idx] = parked
        self._drive()
        try:
            # The book answers at the end of the hold; this guards against a
            # loop that fell behind, and still answers inside the SDK's 10 s.
            hold = self.settings.book.route_hold
            return await asyncio.wait_for(asyncio.shield(parked), min(hold + 1.0, MAX_ROUTE_ANSWER))
        except asyncio.TimeoutError:
            return RouteAnswer(idx)
        except asyncio.CancelledError:
            if self.book.route_gone(self.clock(), idx):
                self._drive()
            raise
        finally:
            if self._parked.get(idx) is parked:
                del self._parked[idx]
            parked.cancel()

    def route(self, cost: float, request_idx: int) -> RouteAnswer:
        """A grant on a worker with room, or a request index to poll again with."""
        routed = self.book.route(self.clock(), cost, request_idx)
        self._drive()
        return self._answer(routed.request_idx, routed.worker_id)

    def _answer(self, request_idx: int, worker_id: int | None) -> RouteAnswer:
        if worker_id is None:
            return RouteAnswer(request_idx)
        return RouteAnswer(request_idx, worker_id, self.instances[worker_id].url)

    def on_report(self, report: Mapping[str, Any]) -> bool:
        """Takes a worker's /worker_status/ body; False when it is from no current instance."""
        known = self.book.report(self.clock(), Report.from_body(report))
        if known:
            self._drive()
        return known

    def on_deleted(self, worker_id: int, requests: list[Mapping[str, Any]]) -> None:
        """Takes a worker's /delete_requests/ list: finished or refused requests and sessions."""
        entries = [
            Deleted(item["request_idx"], success=item.get("success") is not False, status=str(item.get("status") or ""))
            for item in requests
            if isinstance(item.get("request_idx"), int) and not isinstance(item.get("request_idx"), bool)
        ]
        self.book.deleted(self.clock(), worker_id, entries)
        self._drive()

    # -- the loop -------------------------------------------------------------------

    async def _run(self) -> None:
        # Every event steps the book as it comes in; this loop steps it at
        # the deadlines in between and sleeps otherwise. A poke (an event
        # came) only makes it work out its sleep anew.
        while not self._closing:
            self._poke.clear()
            try:
                stepped = self._drive(poke=False)
            except Exception:
                log.exception("scaling step failed; retrying shortly")
                await asyncio.sleep(1.0)
                continue
            await self._nap(self._sleep_for(stepped))

    def _sleep_for(self, stepped: float) -> float | None:
        """Seconds from now until the book's next deadline (or the next fleet line); None: until an event.

        The book names its next deadline as of the moment it last stepped (``stepped``). Asked as of a
        later clock reading, a deadline that fell in between (a request becoming overdue a millisecond
        after another) would already count, and the wake-up for it would be lost until the next event.
        """
        moments = []
        wake = self.book.next_wakeup(stepped)
        if wake is not None:
            moments.append(wake)
        if self.instances:
            moments.append(self._last_summary_at + self.settings.summary_every)
        return max(min(moments) - self.clock(), 0.0) if moments else None

    async def _nap(self, timeout: float | None) -> None:
        """Until poked or ``timeout`` passes."""
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancel
        # that lands as the event is set, and this loop would never stop.
        waiter = asyncio.ensure_future(self._poke.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()

    def step(self) -> Decision:
        """One pass now: expire what is due, decide, act, show what changed."""
        self._drive()
        assert self.book.last_decision is not None
        return self.book.last_decision

    def _drive(self, *, poke: bool = True) -> float:
        """Steps the book now and carries out what it says; ``poke``: the loop then works out its sleep anew.

        Returns the moment it stepped at.
        """
        now = self.clock()
        self._carry_out(self.book.step(now))
        self._show(now)
        if poke:
            self._poke.set()
        self._notify()
        return now

    def _carry_out(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Answer):
                parked = self._parked.get(command.request_idx)
                if parked is not None and not parked.done():
                    parked.set_result(self._answer(command.request_idx, command.worker_id))
            elif isinstance(command, Stop):
                inst = self.instances.get(command.worker_id)
                if inst is not None:
                    self._retire(inst, keep=command.keep)
            elif isinstance(command, Resume):
                inst = self.instances[command.worker_id]
                inst.task = asyncio.ensure_future(self._launch(inst, delay=0.0))
            elif isinstance(command, Provision):
                state = self.book.workers[command.worker_id]
                inst = Instance(state=state, cwd=self.workdir / f"worker-{state.id}")
                self.instances[inst.id] = inst
                inst.task = asyncio.ensure_future(self._launch(inst, delay=self.settings.provisioning_delay))

    # -- one instance ---------------------------------------------------------------

    async def _launch(self, inst: Instance, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        inst.ports = WorkerPorts.allocate()
        env = worker_env(
            ports=inst.ports,
            container_id=inst.id,
            report_addr=self.report_addr,
            extra=self.settings.env_for_worker(),
        )
        if self.settings.consumer and "BACKEND_HEALTH_URL" not in dict(self.settings.worker_env):
            env.pop("BACKEND_HEALTH_URL", None)
        inst.process = WorkerProcess(env=env, cwd=inst.cwd, python=self.settings.python)
        try:
            await inst.process.start()
            if self.settings.consumer:
                inst.consumer = WorkerProcess(
                    env=env,
                    cwd=inst.cwd,
                    argv=self.settings.consumer,
                    process_group=inst.process.pid,
                    output=inst.process.output,
                    prefix="consumer: ",
                )
                await inst.consumer.start()
        except Exception as exc:  # a missing interpreter or command, no file descriptors left...
            if inst.process.running:
                self._kill_group(inst)
            else:
                inst.process = None
            self.book.failed(self.clock(), inst.id, f"could not start: {exc}")
            self._drive()
            return
        self.book.started(self.clock(), inst.id)
        self.urls[inst.id] = inst.url
        consumer = f", consumer pid {inst.consumer.pid}" if inst.consumer is not None else ""
        log.info("worker %d loading: pid %d, %s%s", inst.id, inst.process.pid, inst.url, consumer)
        asyncio.ensure_future(self._watch(inst, inst.process))
        if inst.consumer is not None:
            asyncio.ensure_future(self._watch_consumer(inst, inst.consumer))
        self._drive()

    async def _watch(self, inst: Instance, process: WorkerProcess) -> None:
        """Tells the book when a worker's process ends by itself (a crash, a kill: the instance lost)."""
        with suppress(Exception):
            code = await process.wait()
            if inst.process is process and inst.phase in (Phase.LOADING, Phase.READY):
                self.book.failed(self.clock(), inst.id, f"process exited with code {code}")
                log.warning("worker %d: its last output:\n%s", inst.id, process.tail(8))
                self._drive()

    async def _watch_consumer(self, inst: Instance, consumer: WorkerProcess) -> None:
        with suppress(Exception):
            code = await consumer.wait()
            if inst.consumer is consumer and inst.phase in (Phase.LOADING, Phase.READY):
                log.warning("worker %d: its consumer exited with code %d", inst.id, code)
            self._notify()

    def _retire(self, inst: Instance, *, keep: bool) -> None:
        launching = inst.task if inst.task is not None and not inst.task.done() else None
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
        grace = self.settings.stop_grace
        procs = [p for p in (inst.consumer, inst.process) if p is not None]
        if procs:
            codes = await asyncio.gather(*(p.stop(grace) for p in procs), return_exceptions=True)
            code = codes[-1] if not isinstance(codes[-1], BaseException) else None
            self._kill_group(inst)  # anything the consumer left in the group
        self.book.stopped(self.clock(), inst.id)
        exit_note = "" if code is None else f", exit code {code}"
        if inst.id in self.book.workers:
            inst.process = inst.consumer = None
            inst.ports = None
            log.info("worker %d cold: stopped, files kept for a fast restart%s", inst.id, exit_note)
        else:
            self.instances.pop(inst.id, None)
            shutil.rmtree(inst.cwd, ignore_errors=True)
            log.info("worker %d stopped%s", inst.id, exit_note)
        if not self._closing:
            self._drive()
        else:
            self._notify()

    # -- what the terminal shows ---------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Each instance as /get_endpoint_workers/ lists it (the SDK's Worker fields, plus a few)."""
        now = self.clock()
        rows = []
        for inst in sorted(self.instances.values(), key=lambda i: i.id):
            state = inst.state
            rows.append(
                {
                    "id": inst.id,
                    "status": inst.phase.value,
                    "cur_load": state.cur_load,
                    "new_load": 0.0,
                    "cur_load_rolling_avg": state.cur_load,
                    "cur_perf": 0.0,
                    "perf": state.max_perf,
                    "measured_perf": state.max_perf,
                    "dlperf": 0.0,
                    "reliability": 1.0,
                    "reqs_working": len(state.working),
                    "disk_usage": 0.0,
                    "loaded_at": state.phase_since if inst.phase is Phase.READY else 0.0,
                    "started_at": state.created_at,
                    "url": inst.url,
                    "pid": inst.pid,
                    "consumer_pid": inst.consumer.pid if inst.consumer is not None else None,
                    "reserved": self.book.reserved(inst.id),
                    "age": round(now - state.created_at, 3),
                    "error_msg": state.error,
                    "sessions": self.book.sessions_on(inst.id),
                }
            )
        return rows

    def summary(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        parts = []
        for inst in sorted(self.instances.values(), key=lambda i: i.id):
            text = f"#{inst.id} {inst.phase.value}"
            if inst.phase in (Phase.READY, Phase.STOPPING) or inst.cur_load:
                load = inst.cur_load + self.book.reserved(inst.id)
                text += f" {load:g}/{inst.max_perf or self.settings.book.policy.assumed_perf:g}"
            text += f" {now - inst.created_at:.0f}s"
            held = self.book.sessions_on(inst.id)
            if held:
                text += " session " + ",".join(str(i) for i in held)
            parts.append(text)
        waiting = len(self.book.waiting)
        head = f"fleet: {len(self.live())} live"
        if waiting:
            head += f", {waiting} waiting"
        return head + (" | " + " | ".join(parts) if parts else "")

    def phase_counts(self) -> dict[str, int]:
        """How many instances are in each phase, every phase named."""
        counts = {phase.value: 0 for phase in Phase}
        for inst in self.instances.values():
            counts[inst.phase.value] += 1
        return counts

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.phase in LIVE]

    def running_pids(self) -> list[int]:
        return [i.pid for i in self.instances.values() if i.process is not None and i.process.running and i.pid]

    def _show(self, now: float) -> None:
        shape = tuple(
            (i.id, i.phase, i.cur_load + self.book.reserved(i.id), tuple(sorted(i.working)))
            for i in sorted(self.instances.values(), key=lambda i: i.id)
        ) + (len(self.book.waiting),)
        due = bool(self.instances) and now - self._last_summary_at >= self.settings.summary_every
        if shape != self._last_summary or due:
            self._last_summary = shape
            self._last_summary_at = now
            log.info("%s", self.summary(now))
