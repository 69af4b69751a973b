"""The fleet's bookkeeping as a state machine on a virtual clock: grants, waiters, holds, idle clocks, phases."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from lib.standin.book import Answer, Book, BookSettings, Deleted, Provision, Report, Resume, Stop
from lib.standin.scaling import (
    Decision,
    EndpointParams,
    LocalPolicy,
    Phase,
    Snapshot,
    WorkerView,
    choose_worker,
    decide,
    next_change,
)

T0 = 1000.0


def book_with(**overrides) -> Book:
    """No inactivity timeout and no waiter ever overdue unless asked: nothing starts or stops by itself."""
    params = dict(inactivity_timeout=None, target_queue_time=3600.0)
    params.update({k: overrides.pop(k) for k in list(overrides) if k in EndpointParams.__dataclass_fields__})
    policy = {k: overrides.pop(k) for k in list(overrides) if k in LocalPolicy.__dataclass_fields__}
    settings = BookSettings(
        params=EndpointParams(**params),
        policy=LocalPolicy(**policy),
        **{"grant_timeout": 5.0, "waiting_timeout": 20.0, "route_hold": 6.0, **overrides},
    )
    return Book(settings, T0)


def ready_worker(book: Book, now: float = T0) -> int:
    """Provisions one more worker through the book's own commands (a min_load for one step) and brings it to ready."""
    settings = book.settings
    book.settings = replace(settings, params=replace(settings.params, min_load=100.0 * (len(book.live()) + 1)))
    try:
        (command,) = [c for c in book.step(now) if isinstance(c, Provision)]
    finally:
        book.settings = settings
    book.started(now, command.worker_id)
    assert book.report(now, Report(command.worker_id, max_perf=100.0))
    return command.worker_id


def test_worker_becomes_ready_with_its_first_report_showing_max_perf():
    """A loading worker is routable once a report shows max_perf, and not before."""
    book = book_with(min_load=100.0)
    (provision,) = book.step(T0)
    assert provision == Provision(1) and book.workers[1].phase is Phase.PROVISIONING
    book.started(T0 + 1, 1)
    assert book.report(T0 + 1, Report(1, max_perf=0.0))
    assert book.workers[1].phase is Phase.LOADING
    assert book.route(T0 + 1, 100.0, 0).worker_id is None
    book.report(T0 + 2, Report(1, max_perf=100.0))
    assert book.workers[1].phase is Phase.READY


def test_second_route_right_after_a_grant_waits_instead_of_sharing_the_worker():
    """Two routes in a row with one idle worker: the first gets it, the second waits for another."""
    book = book_with()
    wid = ready_worker(book)
    first = book.route(T0, 100.0, 0)
    second = book.route(T0, 100.0, 0)
    assert first.worker_id == wid
    assert second.worker_id is None and second.request_idx != first.request_idx
    assert list(book.waiting) == [second.request_idx]


def test_grant_is_replaced_by_the_reported_session_without_counting_twice():
    """Once the worker reports the granted request as working, its load comes from the report alone."""
    book = book_with()
    wid = ready_worker(book)
    grant = book.route(T0, 100.0, 0)
    book.report(T0, Report(wid, cur_load=100.0, max_perf=100.0, working=(grant.request_idx,)))
    assert book.grants == {}
    assert [(w.cur_load, w.reserved) for w in book.views()] == [(100.0, 0.0)]
    assert book.sessions_on(wid) == [grant.request_idx]
    book.report(T0, Report(wid, cur_load=0.0, max_perf=100.0))
    assert book.sessions == {}
    assert book.route(T0, 100.0, 0).worker_id == wid


def test_rejected_create_is_demand_again_and_keeps_its_queue_age():
    """A "Rejected" entry (busy worker, 429) frees the grant and the request waits again, as old as it was."""
    book = book_with()
    first = ready_worker(book)
    grant = book.route(T0, 100.0, 0)
    book.deleted(T0 + 1, first, [Deleted(grant.request_idx, success=False, status="Rejected")])
    assert book.grants == {}
    assert list(book.waiting) == [grant.request_idx], "still demand until the SDK routes it again"
    book.report(T0 + 2, Report(first, cur_load=100.0, max_perf=100.0, working=(777,)))  # someone else took it
    second = ready_worker(book, T0 + 2)
    again = book.route(T0 + 2, 100.0, grant.request_idx)
    assert (again.request_idx, again.worker_id) == (grant.request_idx, second)
    assert book.grants[grant.request_idx].queued_since == T0


def test_refused_body_or_success_ends_the_grant_at_once_and_is_no_demand():
    """An unsuccessful entry that is not "Rejected" (a refused body) and a success each just end the grant."""
    book = book_with()
    wid = ready_worker(book)
    refused = book.route(T0, 100.0, 0)
    book.deleted(T0 + 0.1, wid, [Deleted(refused.request_idx, success=False, status="422 Unprocessable")])
    assert book.grants == {} and book.waiting == {}
    pinged = book.route(T0 + 0.2, 100.0, 0)
    assert pinged.worker_id == wid, "the worker is free again at once, not after grant_timeout"
    book.deleted(T0 + 0.3, wid, [Deleted(pinged.request_idx, success=True, status="Success")])
    assert book.grants == {} and book.waiting == {}
    assert book.route(T0 + 0.4, 100.0, 0).worker_id == wid


def test_grant_never_reported_stops_counting_after_grant_timeout():
    """A grant whose session never shows in reports is dropped after grant_timeout, freeing the worker."""
    book = book_with()
    wid = ready_worker(book)
    grant = book.route(T0, 100.0, 0)
    assert book.next_wakeup(T0) == T0 + 5.0
    book.step(T0 + 4.9)
    assert list(book.grants) == [grant.request_idx]
    book.step(T0 + 5.0)
    assert book.grants == {}
    assert book.route(T0 + 5.0, 100.0, 0).worker_id == wid


def test_waiting_request_no_longer_polled_is_forgotten():
    """A client that stops polling stops counting as demand waiting_timeout after its last route call."""
    book = book_with()
    answer = book.route(T0, 100.0, 0)
    book.route(T0 + 19.0, 100.0, answer.request_idx)
    book.step(T0 + 38.0)
    assert list(book.waiting) == [answer.request_idx]
    assert book.next_wakeup(T0 + 38.0) == T0 + 39.0
    book.step(T0 + 39.0)
    assert book.waiting == {}


def test_reported_error_marks_the_worker_errored_and_it_is_stopped():
    """A report with error_msg takes the worker out of routing for good, and the next step stops it."""
    book = book_with()
    wid = ready_worker(book)
    book.report(T0, Report(wid, max_perf=100.0, error="model server crashed"))
    assert book.workers[wid].phase is Phase.ERRORED
    book.report(T0, Report(wid, max_perf=100.0))
    assert book.workers[wid].phase is Phase.ERRORED
    assert book.route(T0, 100.0, 0).worker_id is None
    commands = book.step(T0)
    assert Stop(wid, keep=False, reason="errored: model server crashed") in commands
    book.stopped(T0 + 1, wid)
    assert wid not in book.workers


def test_report_from_a_worker_it_did_not_start_changes_nothing():
    """Reports naming no current worker are ignored."""
    book = book_with()
    assert book.report(T0, Report(42, max_perf=100.0)) is False
    assert book.workers == {}


def test_request_index_from_the_client_is_kept_and_never_reissued():
    """A request_idx the book did not issue (say, after a restart) is adopted and new ones come after it."""
    book = book_with()
    assert book.route(T0, 100.0, 50).request_idx == 50
    assert book.route(T0, 100.0, 0).request_idx == 51


def test_held_route_gets_the_worker_at_the_step_after_it_reports_ready():
    """A held /route/ is answered with a grant at the step right after a worker reports ready."""
    book = book_with(min_load=100.0)
    (provision,) = book.step(T0)
    held = book.route(T0, 100.0, 0, hold=True)
    assert held.worker_id is None and held.held_until == T0 + 6.0
    book.started(T0 + 1, provision.worker_id)
    book.report(T0 + 2, Report(provision.worker_id, max_perf=100.0))
    assert book.step(T0 + 2) == [Answer(held.request_idx, provision.worker_id)]
    assert book.waiting == {} and list(book.grants) == [held.request_idx]


def test_hold_ends_with_the_waiting_answer_and_the_request_still_waits():
    """At route_hold the held call gets the waiting answer; the request stays demand until waiting_timeout."""
    book = book_with()
    held = book.route(T0, 100.0, 0, hold=True)
    assert book.next_wakeup(T0) == T0 + 6.0
    assert book.step(T0 + 6.0) == [Answer(held.request_idx, None)]
    assert list(book.waiting) == [held.request_idx]
    assert book.next_wakeup(T0 + 6.0) == T0 + 26.0


def test_held_routes_are_served_in_arrival_order():
    """Two held requests and one worker freeing up: the one that has waited longer gets it, the other keeps waiting."""
    book = book_with()
    first = book.route(T0, 100.0, 0)
    second = book.route(T0 + 1, 100.0, 0)
    book.route(T0 + 2, 100.0, second.request_idx, hold=True)
    book.route(T0 + 2, 100.0, first.request_idx, hold=True)
    wid = ready_worker(book, T0 + 3)
    answers = [c for c in book.step(T0 + 3) if isinstance(c, Answer)]
    assert answers == [Answer(first.request_idx, wid)]
    assert list(book.waiting) == [second.request_idx]


def test_client_gone_from_a_held_route_is_dropped_and_the_worker_goes_to_the_next():
    """A held route whose client disconnects stops counting at once; the freed worker goes to the next waiter."""
    book = book_with(target_queue_time=0.0)
    wid = ready_worker(book)
    book.report(T0, Report(wid, cur_load=100.0, max_perf=100.0, working=(9,)))
    gone = book.route(T0 + 1, 100.0, 0, hold=True)
    stays = book.route(T0 + 2, 100.0, 0, hold=True)
    assert book.route_gone(T0 + 3, gone.request_idx)
    assert list(book.waiting) == [stays.request_idx]
    assert book.snapshot(T0 + 3).waiting[0].request_idx == stays.request_idx
    book.report(T0 + 4, Report(wid, max_perf=100.0))  # the session ended
    answers = [c for c in book.step(T0 + 4) if isinstance(c, Answer)]
    assert answers == [Answer(stays.request_idx, wid)]


def test_client_gone_after_its_grant_was_made_frees_the_worker():
    """A grant made for a held call whose client had gone never reached anyone: it is dropped, not left to time out."""
    book = book_with()
    wid = ready_worker(book)
    granted = book.route(T0, 100.0, 0)
    assert book.route_gone(T0 + 0.1, granted.request_idx)
    assert book.grants == {}
    assert book.route(T0 + 0.2, 100.0, 0).worker_id == wid


def test_worker_holding_a_session_at_low_load_is_kept_while_an_idle_one_is_stopped():
    """Scale-down takes the idle worker and keeps the one reporting a session, whatever load it reports."""
    book = book_with(inactivity_timeout=0.0, scale_down_delay=1.0)
    held = ready_worker(book)
    idle = ready_worker(book)
    book.report(T0, Report(held, cur_load=0.0, max_perf=100.0, working=(5,)))
    book.step(T0)
    wake = book.next_wakeup(T0)
    assert wake is not None and abs(wake - (T0 + 1.0)) < 1e-6
    commands = book.step(T0 + 1.0)
    assert [c.worker_id for c in commands if isinstance(c, Stop)] == [idle]
    assert book.next_wakeup(T0 + 1.0) is None, "nothing left to wake for while the session is held"


def test_surplus_worker_goes_cold_then_resumes_for_new_demand():
    """With cold_workers 1 a surplus ready worker is stopped and kept, and resumed when demand comes back."""
    book = book_with(inactivity_timeout=0.0, scale_down_delay=0.5, cold_workers=1, target_queue_time=0.0)
    wid = ready_worker(book)
    book.step(T0)
    wake = book.next_wakeup(T0)
    assert wake is not None
    assert book.step(wake) == [Stop(wid, keep=True, reason="surplus, idle 0.5s")]
    book.stopped(wake + 1, wid)
    assert book.workers[wid].phase is Phase.COLD
    book.route(wake + 2, 100.0, 0)
    assert book.step(wake + 2) == [Resume(wid)]
    assert book.created == [wid]


def test_inactivity_counts_from_the_moment_the_last_load_ended():
    """Stepping only at events, the last worker stops inactivity_timeout after its session ended, not a step."""
    book = book_with(inactivity_timeout=4.0, scale_down_delay=0.0)
    wid = ready_worker(book)
    book.report(T0, Report(wid, cur_load=100.0, max_perf=100.0, working=(3,)))
    book.step(T0)
    book.report(T0 + 100.0, Report(wid, max_perf=100.0))  # the session ends long after the last step
    assert book.step(T0 + 100.0) == []
    wake = book.next_wakeup(T0 + 100.0)
    assert wake is not None and abs(wake - (T0 + 104.0)) < 1e-6
    assert [type(c) for c in book.step(wake)] == [Stop]


class CheckedBook(Book):
    """The book, with each derived figure it keeps checked against a recompute from its public records."""

    def fresh_views(self) -> list[WorkerView]:
        return [
            WorkerView(
                id=w.id,
                phase=w.phase,
                created_at=w.created_at,
                cur_load=w.cur_load,
                max_perf=w.max_perf,
                reserved=sum(g.cost for g in self.grants.values() if g.worker_id == w.id),
                idle_since=w.idle_since,
                sessions=w.sessions,
            )
            for w in self.workers.values()
        ]

    def fresh_snapshot(self, now: float) -> Snapshot:
        waiting = tuple(e.request for e in self.waiting.values())
        return Snapshot(now, tuple(self.fresh_views()), waiting, self.last_activity)

    def _choose(self, cost: float) -> int | None:
        chosen = super()._choose(cost)
        assert chosen == choose_worker(self.fresh_views(), cost, self.settings.params)
        return chosen

    def _decide(self, now: float) -> Decision:
        decision = super()._decide(now)
        assert self.views() == self.fresh_views()
        assert decision == decide(self.fresh_snapshot(now), self.settings.params, self.settings.policy)
        return decision

    def next_wakeup(self, now: float) -> float | None:
        s = self.settings
        moments = [g.at + s.grant_timeout for g in self.grants.values()]
        for entry in self.waiting.values():
            moments.append(entry.held_until if entry.held_until is not None else entry.last_poll + s.waiting_timeout)
        moments.extend(w.phase_since + s.load_timeout for w in self.workers.values() if w.phase is Phase.LOADING)
        params = s.params
        busy = bool(self.waiting or self.grants) or any(
            w.phase is not Phase.COLD and (w.cur_load > 1e-9 or w.sessions) for w in self.workers.values()
        )
        if busy and params.inactivity_timeout is not None and params.inactivity_timeout > 1e-9:
            # Each step moves the last activity on while anything is busy: no inactivity to wait for.
            # (A timeout of 0 has run out even at the moment of the last activity: busy or not, it is.)
            params = replace(params, inactivity_timeout=None)
        change = next_change(self.fresh_snapshot(now), params, s.policy)
        if change is not None:
            moments.append(change)
        wake = super().next_wakeup(now)
        assert wake == (min(moments) if moments else None)
        return wake


_costs = st.sampled_from([50.0, 100.0, 100.0, 250.0, 0.1])


@st.composite
def event_scripts(draw):
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "route",
                        "route",
                        "route_gone",
                        "report",
                        "report",
                        "deleted",
                        "started",
                        "failed",
                        "stopped",
                        "want",
                    ]
                ),
                st.floats(min_value=0.0, max_value=8.0),
                st.integers(min_value=0, max_value=6),
                st.integers(min_value=0, max_value=6),
                _costs,
                st.booleans(),
            ),
            max_size=60,
        )
    )


@settings(max_examples=150, deadline=None)
@given(
    script=event_scripts(),
    cold_workers=st.integers(min_value=0, max_value=2),
    target_queue_time=st.sampled_from([0.0, 0.5, 3.0]),
    inactivity=st.sampled_from([None, 0.0, 4.0]),
    delay=st.sampled_from([0.0, 1.0, 5.0]),
    hold=st.sampled_from([0.0, 6.0]),
    origin=st.sampled_from([T0, 1.7e9]),  # and on an epoch-second clock, where an ulp is 2e-7 s
)
def test_kept_figures_give_the_commands_a_recompute_gives(
    script, cold_workers, target_queue_time, inactivity, delay, hold, origin
):
    """On any event script the views, routes, decisions and wake-ups the book keeps equal a recompute from scratch."""
    params = EndpointParams(
        max_workers=4, cold_workers=cold_workers, target_queue_time=target_queue_time, inactivity_timeout=inactivity
    )
    settings_ = BookSettings(
        params=params,
        policy=LocalPolicy(scale_down_delay=delay),
        grant_timeout=5.0,
        waiting_timeout=20.0,
        route_hold=hold,
        load_timeout=10.0,
    )
    book = CheckedBook(settings_, origin)
    now = origin
    for method, dt, a, b, cost, flag in script:
        now += dt
        ids = sorted(book.workers) or [1]
        wid = ids[a % len(ids)]
        known = sorted(set(book.grants) | set(book.waiting) | set(book.sessions)) or [0]
        idx = known[b % len(known)]
        if method == "route":
            book.route(now, cost, idx if flag else 0, hold=a % 2 == 0)
        elif method == "route_gone":
            book.route_gone(now, idx)
        elif method == "report":
            working = tuple(i for i in known[: b % 3] if i) if flag else ()
            book.report(
                now,
                Report(
                    wid,
                    cur_load=cost * len(working),
                    max_perf=0.0 if a == 6 else 100.0,
                    working=working,
                    error="boom" if a == 5 and b == 5 else "",
                ),
            )
        elif method == "deleted":
            book.deleted(now, wid, [Deleted(idx, success=flag, status="Rejected" if b % 2 else "422")])
        elif method == "started":
            book.started(now, wid)
        elif method == "failed":
            book.failed(now, wid, "exited")
        elif method == "stopped":
            book.stopped(now, wid)
        elif method == "want":
            book.settings = replace(settings_, params=replace(params, min_load=100.0 * a))
        book.step(now)
        wake = book.next_wakeup(now)
        if wake is not None and flag and wake - now < 8.0:
            now = max(now, wake)
            book.step(now)
            book.next_wakeup(now)


def _busy_fleet_script(book: Book, workers: int, rounds: int, seed: int) -> None:
    """``workers`` ready workers; then rounds of routes of mixed costs, reports of their sessions and ends."""
    import random

    rng = random.Random(seed)
    ids = [ready_worker(book) for _ in range(workers)]
    now = T0
    open_on: dict[int, list[int]] = {wid: [] for wid in ids}
    for _ in range(rounds):
        now += rng.uniform(0.0, 0.5)
        routed = book.route(now, rng.choice([10.0, 50.0, 100.0]), 0)
        if routed.worker_id is not None:
            open_on[routed.worker_id].append(routed.request_idx)
        wid = rng.choice(ids)
        if open_on[wid] and rng.random() < 0.5:
            open_on[wid].pop(0)  # its oldest session ends
        working = tuple(open_on[wid])
        book.report(now, Report(wid, cur_load=10.0 * len(working), max_perf=100.0, working=working))
        book.step(now)


def test_routes_on_a_large_fleet_with_changing_loads_pick_what_choose_worker_picks():
    """Thirty workers whose loads keep changing: every route takes the worker a recompute over all of them takes."""
    book = CheckedBook(book_with(max_workers=40).settings, T0)
    _busy_fleet_script(book, workers=30, rounds=600, seed=5)
    assert book.grants or book.sessions  # the script did route work onto the fleet


def test_a_route_looks_at_the_workers_that_changed_not_at_the_whole_fleet(monkeypatch):
    """The room check runs for each worker whose state moved, so a route costs the same on 10 workers or 200."""
    import lib.standin.book as book_module
    import lib.standin.scaling as scaling_module

    calls = []
    real = scaling_module.has_room

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(book_module, "has_room", counted)
    monkeypatch.setattr(scaling_module, "has_room", counted)  # choose_worker's own
    per_route = {}
    for workers in (10, 200):
        book = book_with(max_workers=workers, scale_down_delay=1e9)  # the idle fleet stays
        ids = [ready_worker(book) for _ in range(workers)]
        now = T0
        for i in range(101):
            if i == 1:
                calls.clear()  # the first route of a cost looks at every worker once
            now += 1.0
            routed = book.route(now, 100.0, 0)
            assert routed.worker_id == ids[0]  # the oldest idle worker, each time: its session ends at once
            book.report(now, Report(ids[0], cur_load=100.0, max_perf=100.0, working=(routed.request_idx,)))
            book.report(now, Report(ids[0], max_perf=100.0))
            book.step(now)
        per_route[workers] = len(calls) / 100
    assert per_route[200] <= per_route[10] + 1, per_route
