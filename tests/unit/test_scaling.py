"""The local stand-in's scaling model and route choice, as pure functions of a snapshot."""

from __future__ import annotations

import math
from collections.abc import Iterable

from hypothesis import example, given
from hypothesis import strategies as st

from lib.standin.scaling import (
    Decision,
    EndpointParams,
    LocalPolicy,
    Phase,
    Snapshot,
    WaitingRequest,
    WorkerView,
    choose_worker,
    decide,
    first_after,
    has_room,
    next_change,
    target_workers,
)

NOW = 1000.0
POLICY = LocalPolicy(scale_down_delay=5.0, assumed_perf=100.0)


def worker(
    id: int,
    phase: Phase = Phase.READY,
    *,
    load: float = 0.0,
    reserved: float = 0.0,
    max_perf: float | None = None,
    idle_for: float | None = None,
    age: float = 60.0,
) -> WorkerView:
    if max_perf is None:
        max_perf = 100.0 if phase is Phase.READY else 0.0
    busy = load + reserved > 0
    return WorkerView(
        id=id,
        phase=phase,
        created_at=NOW - age + id * 1e-3,  # lower ids are older
        cur_load=load,
        max_perf=max_perf,
        reserved=reserved,
        idle_since=None if busy else NOW - (age if idle_for is None else idle_for),
    )


def snapshot(
    workers: Iterable[WorkerView] = (),
    waiting: Iterable[WaitingRequest] = (),
    idle_for: float = 0.0,
) -> Snapshot:
    return Snapshot(now=NOW, workers=tuple(workers), waiting=tuple(waiting), last_activity=NOW - idle_for)


def acts(decision: Decision) -> tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """What a decision does: its target and the workers it starts and stops (not the load it saw)."""
    return decision.target, decision.provision, decision.resume, decision.stop, decision.destroy


def sessions_on(n: int) -> list[WorkerView]:
    return [worker(i, load=100.0) for i in range(1, n + 1)]


def test_target_util_one_gives_one_worker_per_session():
    """With cost = max_perf = 100 and target_util 1.0, N open sessions ask for exactly N workers."""
    params = EndpointParams(target_util=1.0)
    for n in (1, 2, 3, 7):
        assert target_workers(snapshot(sessions_on(n)), params, POLICY) == n


def test_target_util_point_nine_asks_for_one_extra_worker():
    """target_util 0.9 turns one session's 100 into 111 of capacity: two workers, one of them idle."""
    params = EndpointParams(target_util=0.9)
    assert target_workers(snapshot(sessions_on(1)), params, POLICY) == 2
    decision = decide(snapshot(sessions_on(1)), params, POLICY)
    assert decision.provision == 1


def test_waiting_request_counts_as_load_once_it_has_waited_target_queue_time():
    """A request waiting for a worker triggers a cold start after target_queue_time, not before."""
    params = EndpointParams(target_util=1.0, target_queue_time=0.5)
    fresh = WaitingRequest(request_idx=1, cost=100.0, since=NOW - 0.2)
    overdue = WaitingRequest(request_idx=1, cost=100.0, since=NOW - 0.6)
    assert decide(snapshot(waiting=[fresh]), params, POLICY).provision == 0
    decision = decide(snapshot(waiting=[overdue]), params, POLICY)
    assert decision.provision == 1 and decision.load == 100.0


def test_workers_still_loading_count_as_capacity_so_waiting_requests_do_not_start_more():
    """Three waiting sessions and three workers already provisioning start no fourth worker."""
    params = EndpointParams(target_util=1.0, target_queue_time=0.0)
    waiting = [WaitingRequest(i, 100.0, NOW - 3) for i in (1, 2, 3)]
    starting = [worker(1, Phase.PROVISIONING, age=1), worker(2, Phase.LOADING, age=1), worker(3, Phase.LOADING, age=1)]
    assert decide(snapshot(starting, waiting), params, POLICY).changes is False


def test_granted_session_not_yet_reported_still_counts_as_load():
    """A grant handed out but not in the worker's reports keeps that worker counted as busy."""
    params = EndpointParams(target_util=1.0)
    assert target_workers(snapshot([worker(1, reserved=100.0), worker(2, load=100.0)]), params, POLICY) == 2


def test_assumed_perf_sizes_the_fleet_before_any_worker_reported():
    """Before any worker reports max_perf, capacity per worker is the assumed figure."""
    params = EndpointParams(target_util=1.0, target_queue_time=0.0)
    waiting = [WaitingRequest(1, 100.0, NOW - 1), WaitingRequest(2, 100.0, NOW - 1)]
    assert target_workers(snapshot(waiting=waiting), params, LocalPolicy(assumed_perf=200.0)) == 1
    assert target_workers(snapshot(waiting=waiting), params, LocalPolicy(assumed_perf=100.0)) == 2


def test_min_load_keeps_capacity_without_any_load():
    """min_load above zero keeps workers running with no load at all, whatever the inactivity."""
    params = EndpointParams(target_util=1.0, min_load=150.0, inactivity_timeout=0.0)
    assert target_workers(snapshot(idle_for=3600), params, POLICY) == 2


def test_last_worker_stays_until_inactivity_timeout_has_elapsed():
    """With no load the last worker is kept until inactivity_timeout passes, then the target is zero."""
    params = EndpointParams(target_util=1.0, inactivity_timeout=10.0)
    idle = [worker(1, idle_for=60)]
    assert target_workers(snapshot(idle, idle_for=9.0), params, POLICY) == 1
    assert decide(snapshot(idle, idle_for=9.0), params, POLICY).changes is False
    assert target_workers(snapshot(idle, idle_for=10.0), params, POLICY) == 0
    assert decide(snapshot(idle, idle_for=10.0), params, POLICY).destroy == (1,)


def test_unset_inactivity_timeout_never_scales_to_zero():
    """Without an inactivity_timeout the endpoint keeps one worker however long it is idle."""
    params = EndpointParams(inactivity_timeout=None)
    assert target_workers(snapshot([worker(1)], idle_for=1e6), params, POLICY) == 1


def test_no_workers_and_no_load_starts_nothing():
    """A fresh endpoint with no load stays at zero workers."""
    assert decide(snapshot(), EndpointParams(), POLICY).changes is False


def test_surplus_worker_stops_only_after_the_scale_down_delay():
    """A surplus idle worker survives the scale-down delay, so a session right after a release reuses it."""
    params = EndpointParams(target_util=1.0)
    busy_and_idle = [worker(1, load=100.0), worker(2, idle_for=4.9)]
    assert decide(snapshot(busy_and_idle), params, POLICY).changes is False
    busy_and_idle = [worker(1, load=100.0), worker(2, idle_for=5.0)]
    assert decide(snapshot(busy_and_idle), params, POLICY).destroy == (2,)


def test_scale_down_never_stops_a_worker_holding_load_or_a_reservation():
    """Even far over target, workers holding a session or a grant keep running."""
    params = EndpointParams(target_util=1.0, max_workers=1)
    workers = [worker(1, load=100.0), worker(2, reserved=100.0), worker(3, load=100.0)]
    decision = decide(snapshot(workers), params, POLICY)
    assert decision.target == 1
    assert decision.destroy == () and decision.stop == ()


def test_scale_down_gives_up_workers_not_yet_ready_first():
    """When shrinking, a provisioning worker goes before a loading one, and that before a ready one."""
    params = EndpointParams(target_util=1.0, inactivity_timeout=0.0)
    workers = [
        worker(1, idle_for=60),
        worker(2, Phase.LOADING, idle_for=60),
        worker(3, Phase.PROVISIONING, idle_for=60),
    ]
    one_session = [worker(4, load=100.0)]
    assert decide(snapshot(workers + one_session), params, POLICY).destroy == (3, 2, 1)
    params_two = EndpointParams(target_util=0.5)
    assert decide(snapshot(workers + one_session), params_two, POLICY).destroy == (3, 2)


def test_cold_workers_keeps_scaled_down_workers_stopped_instead_of_removed():
    """With cold_workers 1, the first ready worker scaled down is kept cold and the next one removed."""
    params = EndpointParams(target_util=1.0, cold_workers=1, inactivity_timeout=0.0)
    decision = decide(snapshot([worker(1, idle_for=60), worker(2, idle_for=60)]), params, POLICY)
    assert decision.stop == (2,) and decision.destroy == (1,)


def test_scale_up_restarts_cold_workers_before_provisioning_new_ones():
    """Demand for two workers with one cold instance resumes it and provisions only one more."""
    params = EndpointParams(target_util=1.0, cold_workers=1, target_queue_time=0.0)
    waiting = [WaitingRequest(1, 100.0, NOW - 1), WaitingRequest(2, 100.0, NOW - 1)]
    decision = decide(snapshot([worker(1, Phase.COLD, max_perf=0.0)], waiting), params, POLICY)
    assert decision.resume == (1,) and decision.provision == 1


def test_max_workers_caps_the_fleet():
    """Demand beyond max_workers provisions up to the cap and no further."""
    params = EndpointParams(target_util=1.0, max_workers=2, target_queue_time=0.0)
    waiting = [WaitingRequest(i, 100.0, NOW - 1) for i in range(5)]
    assert decide(snapshot(waiting=waiting), params, POLICY).provision == 2


def test_worker_reporting_an_error_is_removed_and_replaced():
    """An errored worker holding a session is stopped and a new instance is provisioned in its place."""
    params = EndpointParams(target_util=1.0)
    decision = decide(snapshot([worker(1, Phase.ERRORED, load=100.0), worker(2, load=100.0)]), params, POLICY)
    assert decision.destroy == (1,) and decision.provision == 1


def test_lone_idle_errored_worker_is_replaced_until_inactivity_timeout():
    """An idle errored worker that was the endpoint's last one is replaced while the endpoint is not yet inactive."""
    params = EndpointParams(target_util=1.0, inactivity_timeout=10.0)
    decision = decide(snapshot([worker(1, Phase.ERRORED)], idle_for=1.0), params, POLICY)
    assert decision.destroy == (1,) and decision.provision == 1
    decision = decide(snapshot([worker(1, Phase.ERRORED)], idle_for=11.0), params, POLICY)
    assert decision.destroy == (1,) and decision.provision == 0


def test_occupied_worker_gets_no_route():
    """A worker holding a session of cost 100 with max_perf 100 is skipped; the request waits."""
    params = EndpointParams()
    assert choose_worker([worker(1, load=100.0)], 100.0, params) is None
    assert choose_worker([worker(1, load=100.0), worker(2)], 100.0, params) == 2


def test_granted_but_unreported_session_makes_its_worker_occupied():
    """A second route right after a grant does not go to the same still-idle-looking worker."""
    assert choose_worker([worker(1, reserved=100.0)], 100.0, EndpointParams()) is None


def test_worker_whose_queue_exceeds_max_queue_time_gets_no_route():
    """A worker whose load / max_perf is above max_queue_time is skipped even with room left."""
    busy = worker(1, load=60.0)
    assert has_room(busy, 10.0, EndpointParams(max_queue_time=1.0))
    assert not has_room(busy, 10.0, EndpointParams(max_queue_time=0.5))


def test_only_ready_workers_get_routes():
    """Provisioning, loading, errored, stopping and cold workers never get a route."""
    params = EndpointParams()
    for phase in (Phase.PROVISIONING, Phase.LOADING, Phase.ERRORED, Phase.STOPPING, Phase.COLD):
        assert choose_worker([worker(1, phase, max_perf=100.0)], 100.0, params) is None


def test_route_goes_to_the_least_loaded_worker_oldest_first_on_ties():
    """Among workers with room, the least loaded wins; equal loads go to the oldest."""
    params = EndpointParams(max_queue_time=10.0)
    bigger = [
        worker(1, load=50.0, max_perf=200.0),
        worker(2, load=10.0, max_perf=200.0),
        worker(3, load=10.0, max_perf=200.0),
    ]
    assert choose_worker(bigger, 10.0, params) == 2


def test_idle_worker_takes_a_request_costlier_than_its_max_perf():
    """A request costing more than any worker's max_perf still gets an idle worker instead of waiting forever."""
    assert choose_worker([worker(1)], 250.0, EndpointParams()) == 1


def test_invalid_endpoint_parameters_are_named_with_their_range():
    """Each out-of-range parameter is reported with its name and the allowed values."""
    problems = EndpointParams(target_util=1.5, max_workers=0, cold_workers=-1, min_load=-1).problems()
    text = "; ".join(problems)
    for expected in ("target_util 1.5 must be in (0, 1]", "max_workers 0", "cold_workers -1", "min_load -1"):
        assert expected in text
    assert EndpointParams().problems() == []


@given(sessions=st.integers(min_value=0, max_value=20), workers=st.integers(min_value=0, max_value=20))
def test_sessions_costing_max_perf_never_share_a_worker(sessions, workers):
    """Routing sessions of cost 100 one after another over idle workers gives each its own worker, then waits."""
    params = EndpointParams()
    fleet = [worker(i) for i in range(1, workers + 1)]
    chosen = []
    for _ in range(sessions):
        picked = choose_worker(fleet, 100.0, params)
        if picked is None:
            break
        chosen.append(picked)
        fleet = [
            WorkerView(w.id, w.phase, w.created_at, w.cur_load, w.max_perf, w.reserved + 100.0, None)
            if w.id == picked
            else w
            for w in fleet
        ]
    assert len(chosen) == len(set(chosen)) == min(sessions, workers)


@given(
    sessions=st.integers(min_value=0, max_value=50),
    util=st.sampled_from([0.5, 0.75, 0.9, 1.0]),
)
def test_target_is_sessions_over_target_util_rounded_up(sessions, util):
    """The target is ceil(sessions / target_util) with cost = max_perf, and at least one while not inactive."""
    params = EndpointParams(target_util=util, max_workers=1000)
    target = target_workers(snapshot(sessions_on(sessions)), params, POLICY)
    expected = math.ceil(round(sessions / util, 9))
    assert target == max(expected, 1 if sessions else 0)


def test_worker_holding_a_session_is_never_stopped_as_surplus_whatever_load_it_reports():
    """A ready worker that reports a session but a load of 0 (a session of cost 0) is not idle: scale-down keeps it."""
    params = EndpointParams(target_util=1.0, inactivity_timeout=0.0)
    held = WorkerView(id=1, phase=Phase.READY, created_at=NOW - 60, max_perf=100.0, idle_since=NOW - 60, sessions=1)
    decision = decide(snapshot([held], idle_for=3600), params, POLICY)
    assert decision.stop == () and decision.destroy == ()
    assert next_change(snapshot([held], idle_for=3600), params, POLICY) is None


def test_next_change_is_when_a_waiting_request_passes_target_queue_time():
    """A fresh waiting request changes the decision exactly when it has waited target_queue_time."""
    params = EndpointParams(target_util=1.0, target_queue_time=0.5, inactivity_timeout=None)
    fresh = WaitingRequest(request_idx=1, cost=100.0, since=NOW - 0.2)
    moment = next_change(snapshot(waiting=[fresh]), params, POLICY)
    assert moment is not None and abs(moment - (NOW + 0.3)) < 1e-6
    later = Snapshot(now=moment, waiting=(fresh,), last_activity=NOW)
    assert decide(later, params, POLICY).provision == 1
    overdue = WaitingRequest(request_idx=1, cost=100.0, since=NOW - 0.6)
    assert next_change(snapshot(waiting=[overdue]), params, POLICY) is None


def test_next_change_is_when_an_idle_worker_may_be_stopped_and_when_inactivity_ends():
    """Idle workers: the surplus one at its scale-down delay, the last one at inactivity_timeout."""
    params = EndpointParams(target_util=1.0, inactivity_timeout=10.0)
    two = [worker(1, load=100.0), worker(2, idle_for=2.0)]
    assert next_change(snapshot(two), params, POLICY) == NOW + 3.0 - 1e-9
    last = [worker(1, idle_for=60.0)]
    assert next_change(snapshot(last, idle_for=4.0), params, POLICY) == NOW + 6.0 - 1e-9
    assert next_change(snapshot(last, idle_for=11.0), params, POLICY) is None
    assert next_change(snapshot(), params, POLICY) is None


def test_next_change_passes_over_a_request_whose_load_cannot_move_the_target():
    """At max_workers a request reaching target_queue_time adds load but no worker: no moment for it."""
    params = EndpointParams(target_util=1.0, max_workers=1, target_queue_time=0.5, inactivity_timeout=None)
    busy = [worker(1, load=100.0)]
    fresh = WaitingRequest(request_idx=1, cost=100.0, since=NOW - 0.2)
    assert next_change(snapshot(busy, waiting=[fresh]), params, POLICY) is None
    # One more worker allowed: the same request asks for it when it has waited 0.5 s.
    roomier = EndpointParams(target_util=1.0, max_workers=2, target_queue_time=0.5, inactivity_timeout=None)
    moment = next_change(snapshot(busy, waiting=[fresh]), roomier, POLICY)
    assert moment is not None and abs(moment - (NOW + 0.3)) < 1e-6


def test_next_change_counts_the_request_that_moves_the_target_not_the_first():
    """A worker half full and two half-worker requests: the target moves when the second is overdue."""
    params = EndpointParams(target_util=1.0, max_workers=5, target_queue_time=0.5, inactivity_timeout=None)
    busy = [worker(1, load=50.0)]
    first = WaitingRequest(request_idx=1, cost=50.0, since=NOW - 0.4)
    second = WaitingRequest(request_idx=2, cost=50.0, since=NOW - 0.1)
    shot = snapshot(busy, waiting=[first, second])
    moment = next_change(shot, params, POLICY)
    assert moment is not None and abs(moment - (NOW + 0.4)) < 1e-6
    # Until then the first one's load changes only the decision's load, not what it does.
    before = Snapshot(moment - 0.01, shot.workers, shot.waiting, shot.last_activity)
    assert acts(decide(before, params, POLICY)) == acts(decide(shot, params, POLICY))
    assert decide(before, params, POLICY).load > decide(shot, params, POLICY).load
    assert decide(Snapshot(moment, shot.workers, shot.waiting, shot.last_activity), params, POLICY).provision == 1


def test_next_change_leaves_out_idle_workers_while_none_is_surplus():
    """An idle worker's scale-down delay matters only while the target is below the live workers."""
    params = EndpointParams(target_util=1.0, min_load=200.0, inactivity_timeout=10.0)
    two = [worker(1, load=100.0), worker(2, idle_for=2.0)]
    assert next_change(snapshot(two), params, POLICY) is None
    fewer = EndpointParams(target_util=1.0, min_load=100.0, inactivity_timeout=10.0)
    assert next_change(snapshot(two), fewer, POLICY) == NOW + 3.0 - 1e-9


def test_next_change_moves_on_even_where_the_clock_cannot_resolve_epsilon():
    """On epoch-sized clocks the moment returned is still after now, so a caller stepping to it progresses."""
    params = EndpointParams(target_queue_time=0.5)
    now = 1.7e9
    request = WaitingRequest(request_idx=1, cost=100.0, since=now - 0.5 + 1e-12)
    shot = Snapshot(now=now, waiting=(request,), last_activity=now)
    moment = next_change(shot, params, POLICY)
    assert moment is None or moment > now


@given(
    origin=st.floats(min_value=0.0, max_value=2e9, allow_nan=False, allow_infinity=False),
    span=st.floats(min_value=0.0, max_value=3600.0, allow_nan=False, allow_infinity=False),
)
def test_first_after_is_the_first_instant_the_subtraction_reaches_the_span(origin, span):
    """first_after(o, s) - o >= s, and at the float just before it the test still fails."""
    moment = first_after(origin, span)
    assert moment - origin >= span
    assert math.nextafter(moment, -math.inf) - origin < span
    assert abs(moment - (origin + span)) <= 4 * math.ulp(origin + span)


@given(
    now=st.floats(min_value=1e3, max_value=2e9, allow_nan=False, allow_infinity=False),
    waited=st.floats(min_value=0.0, max_value=0.499),
    idle_for=st.floats(min_value=0.0, max_value=4.99),
    quiet_for=st.floats(min_value=0.0, max_value=9.99),
    case=st.sampled_from(["overdue", "stoppable", "inactive"]),
)
# Moments from a replayed day where the sum rounded to just before the test changes.
@example(now=4124.638079741971, waited=0.0, idle_for=0.0, quiet_for=0.0, case="overdue")
@example(now=4151.283413049335, waited=0.0, idle_for=0.0, quiet_for=0.0, case="stoppable")
@example(now=4124.638079741971, waited=0.0, idle_for=0.0, quiet_for=0.0, case="inactive")
def test_a_step_at_next_change_sees_the_change(now, waited, idle_for, quiet_for, case):
    """On any clock, even epoch seconds, decide acts differently at the moment named, not an ulp after it.

    A moment that came a rounding too early would cost a driver a step that
    does nothing and a second step an instant later.
    """
    params = EndpointParams(target_util=1.0, target_queue_time=0.5, inactivity_timeout=10.0)

    def ready(id: int, **kw: float | None) -> WorkerView:
        return WorkerView(id=id, phase=Phase.READY, created_at=now - 60.0 + id, max_perf=100.0, **kw)  # type: ignore[arg-type]

    if case == "overdue":
        workers: tuple[WorkerView, ...] = (ready(1, cur_load=100.0),)
        waiting: tuple[WaitingRequest, ...] = (WaitingRequest(1, 100.0, now - waited),)
        last = now
    elif case == "stoppable":
        workers = (ready(1, cur_load=100.0), ready(2, idle_since=now - idle_for))
        waiting, last = (), now
    else:
        workers, waiting, last = (ready(1, idle_since=now - 60.0),), (), now - quiet_for
    shot = Snapshot(now=now, workers=workers, waiting=waiting, last_activity=last)
    moment = next_change(shot, params, POLICY)
    assert moment is not None and moment > now
    at = Snapshot(moment, workers, waiting, last)
    assert acts(decide(at, params, POLICY)) != acts(decide(shot, params, POLICY))
    before = math.nextafter(moment, -math.inf)
    if before > now:
        assert acts(decide(Snapshot(before, workers, waiting, last), params, POLICY)) == acts(
            decide(shot, params, POLICY)
        )


_phases = st.sampled_from(list(Phase))


@st.composite
def snapshots(draw):
    n = draw(st.integers(min_value=0, max_value=5))
    workers = []
    for i in range(n):
        phase = draw(_phases)
        load = draw(st.sampled_from([0.0, 0.0, 50.0, 100.0]))
        idle_for = draw(st.floats(min_value=0.0, max_value=20.0))
        workers.append(
            WorkerView(
                id=i + 1,
                phase=phase,
                created_at=NOW - 100 + i,
                cur_load=load,
                max_perf=100.0 if phase is Phase.READY else 0.0,
                idle_since=None if load else NOW - idle_for,
                sessions=draw(st.integers(min_value=0, max_value=1)),
            )
        )
    waiting = [
        WaitingRequest(i + 1, draw(st.sampled_from([50.0, 100.0, 250.0])), NOW - draw(st.floats(0.0, 3.0)))
        for i in range(draw(st.integers(min_value=0, max_value=4)))
    ]
    return snapshot(workers, waiting, idle_for=draw(st.floats(min_value=0.0, max_value=20.0)))


@given(
    shot=snapshots(),
    params=st.builds(
        EndpointParams,
        min_load=st.sampled_from([0.0, 100.0]),
        target_util=st.sampled_from([1.0, 0.9, 0.5]),
        max_workers=st.integers(min_value=1, max_value=6),
        cold_workers=st.integers(min_value=0, max_value=1),
        target_queue_time=st.floats(min_value=0.0, max_value=2.0),
        inactivity_timeout=st.one_of(st.none(), st.floats(min_value=0.0, max_value=15.0)),
    ),
    fraction=st.floats(min_value=0.0, max_value=0.999),
)
def test_decision_stays_the_same_until_next_change(shot, params, fraction):
    """decide() acts the same at every moment before next_change() as at the snapshot's own time."""
    moment = next_change(shot, params, POLICY)
    assert moment is None or moment > shot.now
    horizon = (moment if moment is not None else shot.now + 100.0) - shot.now
    later = Snapshot(shot.now + horizon * fraction, shot.workers, shot.waiting, shot.last_activity)
    assert acts(decide(later, params, POLICY)) == acts(decide(shot, params, POLICY))
