"""The stand-in's bookkeeping between routes and reports: grants, waiting requests, worker states."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lib.standin.fleet import Fleet, FleetSettings, Instance
from lib.standin.process import WorkerPorts
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
    # No inactivity timeout and no cold start to reach: step() never starts or stops anything here.
    settings = FleetSettings(
        params=EndpointParams(inactivity_timeout=None, target_queue_time=3600.0),
        grant_timeout=5.0,
        waiting_timeout=20.0,
    )
    fleet = Fleet(settings, workdir=tmp_path, clock=clock)
    yield fleet
    await fleet.aclose()


def add_worker(fleet: Fleet, worker_id: int, port: int) -> Instance:
    """An instance whose process is started; reports decide the rest."""
    now = fleet.clock()
    inst = Instance(
        id=worker_id,
        cwd=fleet.workdir / f"worker-{worker_id}",
        created_at=now,
        phase=Phase.LOADING,
        phase_since=now,
        ports=WorkerPorts(port, port + 1, port + 2),
        idle_since=now,
    )
    fleet.instances[worker_id] = inst
    return inst


def report(worker_id: int, cur_load: float = 0.0, working=(), max_perf: float = 100.0, error: str = "") -> dict:
    return {
        "id": worker_id,
        "cur_load": cur_load,
        "max_perf": max_perf,
        "error_msg": error,
        "working_request_idxs": list(working),
    }


async def test_worker_becomes_ready_with_its_first_report_showing_max_perf(fleet):
    """A loading worker is routable once a report shows max_perf, and not before."""
    add_worker(fleet, 1, 40000)
    assert fleet.on_report(report(1, max_perf=0.0))
    assert fleet.instances[1].phase is Phase.LOADING
    assert fleet.route(100.0, 0).url is None
    fleet.on_report(report(1))
    assert fleet.instances[1].phase is Phase.READY


async def test_second_route_right_after_a_grant_waits_instead_of_sharing_the_worker(fleet):
    """Two routes in a row with one idle worker: the first gets it, the second waits for another."""
    add_worker(fleet, 1, 40000)
    fleet.on_report(report(1))
    first = fleet.route(100.0, 0)
    second = fleet.route(100.0, 0)
    assert first.worker_id == 1 and first.url == "http://127.0.0.1:40000"
    assert second.url is None and second.request_idx != first.request_idx
    assert list(fleet.waiting) == [second.request_idx]


async def test_grant_is_replaced_by_the_reported_session_without_counting_twice(fleet):
    """Once the worker reports the granted request as working, its load comes from the report alone."""
    add_worker(fleet, 1, 40000)
    fleet.on_report(report(1))
    grant = fleet.route(100.0, 0)
    fleet.on_report(report(1, cur_load=100.0, working=[grant.request_idx]))
    assert fleet.grants == {}
    assert [(w.cur_load, w.reserved) for w in fleet._views(fleet.clock())] == [(100.0, 0.0)]
    assert grant.request_idx in fleet.sessions
    fleet.on_report(report(1, cur_load=0.0))
    assert fleet.sessions == {}
    assert fleet.route(100.0, 0).worker_id == 1


async def test_refused_create_frees_the_grant_and_the_same_request_is_routed_again(fleet, clock):
    """After a worker's 429 (a failed entry in delete_requests) the request's re-route keeps its queue age."""
    add_worker(fleet, 1, 40000)
    add_worker(fleet, 2, 40010)
    fleet.on_report(report(1))
    grant = fleet.route(100.0, 0)
    fleet.on_deleted(1, [{"request_idx": grant.request_idx, "success": False, "status": "Rejected"}])
    assert fleet.grants == {}
    assert list(fleet.waiting) == [grant.request_idx], "still demand until the SDK routes it again"
    clock.now += 2.0
    fleet.on_report(report(1, cur_load=100.0, working=[777]))  # someone else took worker 1
    fleet.on_report(report(2))
    again = fleet.route(100.0, grant.request_idx)
    assert (again.request_idx, again.worker_id) == (grant.request_idx, 2)
    assert fleet.grants[grant.request_idx].queued_since == 1000.0


async def test_grant_never_reported_stops_counting_after_grant_timeout(fleet, clock):
    """A grant whose session never shows in reports is dropped after grant_timeout, freeing the worker."""
    add_worker(fleet, 1, 40000)
    fleet.on_report(report(1))
    fleet.route(100.0, 0)
    clock.now += 4.9
    fleet.step()
    assert len(fleet.grants) == 1
    clock.now += 0.2
    fleet.step()
    assert fleet.grants == {}
    assert fleet.route(100.0, 0).worker_id == 1


async def test_waiting_request_no_longer_polled_is_forgotten(fleet, clock):
    """A client that stops polling stops counting as demand after waiting_timeout."""
    answer = fleet.route(100.0, 0)
    clock.now += 19.0
    fleet.route(100.0, answer.request_idx)
    clock.now += 19.0
    fleet.step()
    assert list(fleet.waiting) == [answer.request_idx]
    clock.now += 2.0
    fleet.step()
    assert fleet.waiting == {}


async def test_reported_error_marks_the_worker_errored_and_unroutable(fleet):
    """A report with error_msg takes the worker out of routing for good, even if later reports look healthy."""
    add_worker(fleet, 1, 40000)
    fleet.on_report(report(1))
    fleet.on_report(report(1, error="model server crashed"))
    assert fleet.instances[1].phase is Phase.ERRORED
    assert fleet.instances[1].error == "model server crashed"
    fleet.on_report(report(1))
    assert fleet.instances[1].phase is Phase.ERRORED
    assert fleet.route(100.0, 0).url is None


async def test_report_from_a_worker_it_did_not_start_changes_nothing(fleet):
    """Reports naming no current instance are ignored."""
    assert fleet.on_report(report(42)) is False
    assert fleet.instances == {}


async def test_request_index_from_the_client_is_kept_and_never_reissued(fleet):
    """A request_idx the stand-in did not issue (say, after a restart) is adopted and new ones come after it."""
    assert fleet.route(100.0, 50).request_idx == 50
    assert fleet.route(100.0, 0).request_idx == 51


async def test_held_route_gets_the_worker_the_moment_it_reports_ready(fleet):
    """A /route/ held for want of a worker is answered with a grant as soon as a worker reports ready."""
    add_worker(fleet, 1, 40000)
    held = asyncio.ensure_future(fleet.route_held(100.0, 0))
    await asyncio.sleep(0)  # one loop step: the task runs up to its first await, parked
    assert not held.done()
    fleet.on_report(report(1))
    answer = await asyncio.wait_for(held, 1.0)
    assert answer.worker_id == 1 and answer.url == "http://127.0.0.1:40000"
    assert fleet.waiting == {} and list(fleet.grants) == [answer.request_idx]


async def test_held_routes_are_served_in_arrival_order(fleet, clock):
    """Two held requests and one worker freeing up: the one that has waited longer gets it, the other keeps waiting."""
    add_worker(fleet, 1, 40000)
    first = fleet.route(100.0, 0)
    clock.now += 1.0
    second = fleet.route(100.0, 0)
    # Polled again in the opposite order, both held.
    held_second = asyncio.ensure_future(fleet.route_held(100.0, second.request_idx))
    held_first = asyncio.ensure_future(fleet.route_held(100.0, first.request_idx))
    await asyncio.sleep(0)  # one loop step: both tasks run up to their first await, parked
    fleet.on_report(report(1))
    assert (await asyncio.wait_for(held_first, 1.0)).worker_id == 1
    assert not held_second.done()
    held_second.cancel()
