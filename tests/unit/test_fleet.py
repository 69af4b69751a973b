"""The fleet as the book's I/O driver: held routes, cancelled clients and worker reports, without processes."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from lib.standin.book import BookSettings
from lib.standin.fleet import Fleet, FleetSettings
from lib.standin.process import WorkerPorts, free_port
from lib.standin.scaling import EndpointParams, Phase


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fleet(tmp_path: Path, clock: Clock):
    # No inactivity timeout, no waiter ever overdue and a cold start never
    # reached: only the test's own reports move a worker.
    settings = FleetSettings(
        book=BookSettings(
            params=EndpointParams(inactivity_timeout=None, target_queue_time=3600.0, min_load=0.0),
            grant_timeout=5.0,
            waiting_timeout=20.0,
            route_hold=6.0,
        ),
        provisioning_delay=3600.0,
    )
    fleet = Fleet(settings, workdir=tmp_path, clock=clock)
    yield fleet
    await fleet.aclose()


def add_worker(fleet: Fleet, port: int) -> int:
    """One more instance, provisioned by the book (a min_load for one step) and given ports as if started."""
    settings = fleet.book.settings
    params = EndpointParams(**{**settings.params.__dict__, "min_load": 100.0 * (len(fleet.live()) + 1)})
    fleet.book.settings = type(settings)(**{**settings.__dict__, "params": params})
    try:
        before = set(fleet.instances)
        fleet.step()
        (worker_id,) = set(fleet.instances) - before
    finally:
        fleet.book.settings = settings
    fleet.instances[worker_id].ports = WorkerPorts(port, port + 1, port + 2)
    fleet.book.started(fleet.clock(), worker_id)
    return worker_id


def report(worker_id: int, cur_load: float = 0.0, working=(), max_perf: float = 100.0, error: str = "") -> dict:
    return {
        "id": worker_id,
        "cur_load": cur_load,
        "max_perf": max_perf,
        "error_msg": error,
        "working_request_idxs": list(working),
    }


async def test_held_route_gets_the_worker_the_moment_it_reports_ready(fleet):
    """A /route/ held for want of a worker is answered with a grant as soon as a worker reports ready."""
    wid = add_worker(fleet, 40000)
    held = asyncio.ensure_future(fleet.route_held(100.0, 0))
    await asyncio.sleep(0)  # one loop step: the task runs up to its first await, parked
    assert not held.done()
    fleet.on_report(report(wid))
    answer = await asyncio.wait_for(held, 1.0)
    assert answer.worker_id == wid and answer.url == "http://127.0.0.1:40000"
    assert fleet.waiting == {} and list(fleet.grants) == [answer.request_idx]


async def test_held_routes_are_served_in_arrival_order(fleet, clock):
    """Two held requests and one worker freeing up: the one that has waited longer gets it, the other keeps waiting."""
    wid = add_worker(fleet, 40000)
    first = fleet.route(100.0, 0)
    clock.now += 1.0
    second = fleet.route(100.0, 0)
    # Polled again in the opposite order, both held.
    held_second = asyncio.ensure_future(fleet.route_held(100.0, second.request_idx))
    held_first = asyncio.ensure_future(fleet.route_held(100.0, first.request_idx))
    await asyncio.sleep(0)  # one loop step: both tasks run up to their first await, parked
    fleet.on_report(report(wid))
    assert (await asyncio.wait_for(held_first, 1.0)).worker_id == wid
    assert not held_second.done()
    held_second.cancel()


async def test_cancelled_held_route_stops_counting_at_once_and_the_worker_goes_to_the_next(fleet, clock):
    """A held route whose client went away (its handler cancelled) is no demand; the freed worker goes to the next."""
    wid = add_worker(fleet, 40000)
    fleet.on_report(report(wid, cur_load=100.0, working=[7]))
    gone = asyncio.ensure_future(fleet.route_held(100.0, 0))
    clock.now += 1.0
    stays = asyncio.ensure_future(fleet.route_held(100.0, 0))
    await asyncio.sleep(0)
    assert len(fleet.waiting) == 2
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert len(fleet.waiting) == 1, "dropped when its client went away, not waiting_timeout later"
    fleet.on_report(report(wid))  # the session ended
    answer = await asyncio.wait_for(stays, 1.0)
    assert answer.worker_id == wid


async def test_rejected_create_is_routed_again_but_a_refused_body_ends_its_grant(fleet):
    """A /delete_requests/ entry "Rejected" makes the request wait again; another failure only frees the worker."""
    wid = add_worker(fleet, 40000)
    fleet.on_report(report(wid))
    busy = fleet.route(100.0, 0)
    fleet.on_deleted(wid, [{"request_idx": busy.request_idx, "success": False, "status": "Rejected"}])
    assert list(fleet.waiting) == [busy.request_idx] and fleet.grants == {}
    fleet.waiting.clear()
    refused = fleet.route(100.0, 0)
    fleet.on_deleted(wid, [{"request_idx": refused.request_idx, "success": False, "status": "Unprocessable"}])
    assert fleet.waiting == {} and fleet.grants == {}
    assert fleet.route(100.0, 0).worker_id == wid


async def test_reported_error_stops_the_worker_and_reports_from_strangers_are_ignored(fleet):
    """Reported errors take a worker out of routing and the next step stops it; reports from strangers are ignored."""
    wid = add_worker(fleet, 40000)
    fleet.on_report(report(wid))
    assert fleet.instances[wid].phase is Phase.READY
    fleet.on_report(report(wid, error="model server crashed"))
    assert fleet.instances[wid].phase is Phase.STOPPING
    assert fleet.on_report(report(42)) is False
    assert fleet.route(100.0, 0).url is None


def test_a_free_port_is_kept_from_other_requests_for_one_and_a_server_takes_it():
    """A bind on port 0 is never handed a port free_port gave out (the kernel keeps it for every process
    alike); a server binding it with SO_REUSEADDR, as every server started here does, gets it at once."""
    given = {free_port() for _ in range(50)}
    # The kernel picks ports on bind(0) at random: unkept, 50 ports among some 14,000 would come back
    # about 18 times in 5,000 binds.
    again = []
    for _ in range(5000):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            again.append(probe.getsockname()[1])
    assert given.isdisjoint(again)
    assert len(given) == 50 and given.isdisjoint(free_port() for _ in range(200))
    for port in list(given)[:3]:
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
    ports = WorkerPorts.allocate()
    assert len({ports.worker, ports.http, ports.control}) == 3


async def test_a_deadline_that_falls_while_the_loop_steps_wakes_it_at_once(tmp_path):
    """Two requests half a millisecond apart: after the step for the first one's overdue moment, the loop
    wakes at once for the second's, even when its clock read after the step is past it."""

    class Slow:
        """A clock that moves on 2 ms at each reading once running: the step's own work."""

        def __init__(self) -> None:
            self.now, self.running = 1000.0, False

        def __call__(self) -> float:
            if self.running:
                self.now += 0.002
            return self.now

    clock = Slow()
    settings = FleetSettings(
        book=BookSettings(
            params=EndpointParams(inactivity_timeout=None, target_queue_time=0.5, max_workers=10), route_hold=6.0
        ),
        provisioning_delay=3600.0,
    )
    fleet = Fleet(settings, workdir=tmp_path, clock=clock)
    try:
        fleet.book.route(1000.0, 100.0, 1, hold=True)
        fleet.book.route(1000.0005, 100.0, 2, hold=True)
        fleet.book.step(1000.0005)
        clock.now, clock.running = 1000.4982, True  # the loop's step reads 1000.5002: only request 1 is overdue
        naps = []

        async def nap(timeout):
            naps.append(timeout)
            fleet._closing = True  # one turn of the loop

        fleet._nap = nap
        await fleet._run()
        assert len(fleet.book.workers) == 1  # provisioned for request 1
        assert naps == [0.0]  # request 2 was overdue by the time the loop looked: it steps again at once
    finally:
        await fleet.aclose()


async def test_a_fleet_makes_its_own_directory_only_when_it_starts_and_removes_it_when_it_closes(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    unstarted = Fleet(FleetSettings())
    await unstarted.aclose()
    assert list(tmp_path.iterdir()) == []  # built and closed, never started: nothing left
    fleet = Fleet(FleetSettings(book=BookSettings(params=EndpointParams(inactivity_timeout=None))))
    assert list(tmp_path.iterdir()) == []
    fleet.start("127.0.0.1:9")
    (made,) = tmp_path.iterdir()
    assert made == fleet.workdir and made.name.startswith("null-local-")
    await fleet.aclose()
    assert list(tmp_path.iterdir()) == []
