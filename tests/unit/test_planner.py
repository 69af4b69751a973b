"""The planner's model: known answers of the trace replay through the stand-in's book and scaling model."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.planner.model import Plan, simulate
from lib.planner.sweep import cheapest_within, pareto_front
from lib.planner.trace import Job, JobSeconds, bursts, diurnal, poisson
from lib.standin.book import Answer, Book, BookSettings, Deleted, Provision, Resume, Stop
from lib.standin.scaling import EndpointParams, LocalPolicy, Snapshot, WaitingRequest
from tests.helpers import usage_refused
from workers.null.dispatch.summary import percentile


def plan(cold: float = 3.0, **params) -> Plan:
    policy = params.pop("policy", LocalPolicy())
    extra = {k: params.pop(k) for k in ("stop_seconds", "route_hold", "max_sessions", "resume") if k in params}
    return Plan(params=EndpointParams(**params), policy=policy, cold_start=(cold, cold), **extra)


def mixed_trace(seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = poisson(0.2, 900, JobSeconds(mean=None, low=1, high=20), rng)
    jobs += bursts(2, 8, 400, JobSeconds(mean=5), rng)
    return sorted(jobs, key=lambda j: j.arrival)


def test_unlimited_workers_without_cold_start_or_queue_target_never_wait():
    """With no cap, a zero cold start and target_queue_time 0, every job starts the moment it arrives."""
    jobs = mixed_trace(1)
    result = simulate(jobs, plan(cold=0.0, max_workers=10_000, target_queue_time=0.0))
    assert result.jobs == len(jobs)
    assert max(result.waits) == pytest.approx(0.0, abs=1e-9)


def test_jobs_far_apart_each_meet_a_cold_start():
    """Jobs spaced beyond max(inactivity_timeout, scale-down delay) + 1 s each start a worker and wait it out."""
    cold, inactivity, delay = 4.0, 10.0, 5.0
    gap = max(inactivity, delay) + 1.5
    chosen = plan(cold=cold, cold_workers=0, inactivity_timeout=inactivity, policy=LocalPolicy(scale_down_delay=delay))
    # A job's wait is at most target_queue_time plus the cold start: its end is known before the run.
    longest_wait = chosen.params.target_queue_time + cold
    jobs, t = [], 0.0
    for duration in (2.0, 7.0, 1.0, 3.0, 5.0):
        jobs.append(Job(t, duration))
        t += longest_wait + duration + gap
    result = simulate(jobs, chosen)
    assert max(result.waits) <= longest_wait + 1e-9
    assert result.cold_starts == len(jobs)
    assert min(result.waits) >= cold


def test_min_load_of_one_worker_leaves_only_the_first_job_a_cold_start():
    """A min_load of one worker keeps it warm: of jobs that never overlap, only the first waits for a start."""
    jobs = [Job(0.0, 2.0)] + [Job(10.0 + 30.0 * i, 4.0) for i in range(6)]
    result = simulate(jobs, plan(cold=3.0, min_load=100.0))
    assert result.cold_starts == 1
    assert result.waits[0] >= 3.0
    assert result.waits[1:] == [0.0] * 6


def test_workers_kept_up_are_billed_to_the_fleets_last_change_not_to_a_wake_that_asks_nothing(monkeypatch):
    """A min_load worker is billed to the last job's end; a later wake at which nothing happens adds nothing."""
    plan = Plan(params=EndpointParams(min_load=100.0, max_workers=2), cold_start=(3.0, 3.0))
    jobs = [Job(0.0, 2.0)]
    plain = simulate(jobs, plan)
    # Ready at 3 s, the job runs from 3 s to 5 s, and the worker stays up for min_load.
    assert plain.waits == [pytest.approx(3.0)]
    assert plain.horizon_s == pytest.approx(5.0)
    assert plain.billed_worker_s == pytest.approx(5.0)
    real_wakeup = Book.next_wakeup

    def with_a_late_wake(self: Book, now: float) -> float | None:
        wake = real_wakeup(self, now)
        late = now + 100.0 if now < 50.0 else None  # one wake, long after the job, that asks for nothing
        return min((m for m in (wake, late) if m is not None), default=None)

    monkeypatch.setattr(Book, "next_wakeup", with_a_late_wake)
    woken = simulate(jobs, plan)
    assert woken.horizon_s == plain.horizon_s
    assert woken.billed_worker_s == plain.billed_worker_s


def test_a_worker_stopped_while_provisioning_does_not_lengthen_the_run_to_its_cancelled_start():
    """The ready moment of a worker stopped before it was ready is no change to the fleet: billing ends at the stop."""
    plan = Plan(params=EndpointParams(min_load=100.0, max_workers=2), cold_start=(10.0, 10.0))
    # The second job waits past target_queue_time while the first runs, so a second worker starts at
    # 10.7 s; the first worker frees up at 11 s and takes it, and the second goes 5 s later, unready.
    result = simulate([Job(0.0, 1.0), Job(10.2, 1.0)], plan)
    assert result.cold_starts == 2
    assert result.waits == [pytest.approx(10.0), pytest.approx(0.8)]
    assert result.horizon_s == pytest.approx(15.7)  # not 20.7, when the second would have been ready
    assert result.billed_worker_s == pytest.approx(15.7 + 5.0)


def test_one_worker_runs_simultaneous_jobs_one_after_another():
    """With max_workers 1, jobs that arrive together run one at a time on the one worker."""
    jobs = [Job(0.0, 2.0) for _ in range(6)]
    result = simulate(jobs, plan(cold=1.0, max_workers=1))
    starts = sorted(job.arrival + wait for job, wait in zip(jobs, result.waits, strict=True))
    assert result.peak_workers == 1
    assert result.cold_starts == 1
    for before, after in zip(starts, starts[1:], strict=False):
        assert after >= before + 2.0 - 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_billed_covers_busy_and_busy_is_the_sum_of_durations(seed):
    """Every busy second is billed, and busy worker-seconds are exactly the jobs' durations."""
    jobs = mixed_trace(seed)
    result = simulate(jobs, plan(cold=5.0, max_workers=6, cold_workers=2), seed=seed)
    assert result.busy_worker_s == pytest.approx(sum(j.duration for j in jobs))
    assert result.billed_worker_s >= result.busy_worker_s
    assert result.cost > 0


def test_same_inputs_and_seed_give_the_same_output():
    """Two runs of one trace, plan and seed agree to the last figure, cold-start draws included."""
    jobs = mixed_trace(3)
    chosen = Plan(cold_start=(2.0, 9.0), resume=(1.0, 2.0), params=EndpointParams(cold_workers=2))
    first = simulate(jobs, chosen, seed=11)
    second = simulate(jobs, chosen, seed=11)
    assert first.as_dict() == second.as_dict()
    assert first.waits == second.waits


def test_another_seed_draws_other_cold_starts():
    """The seed reaches the cold-start draws: a spread cold start gives other waits under another seed."""
    jobs = mixed_trace(3)
    chosen = Plan(cold_start=(2.0, 30.0))
    assert simulate(jobs, chosen, seed=1).waits != simulate(jobs, chosen, seed=2).waits


@pytest.mark.parametrize(
    "value",
    [
        EndpointParams(min_load=200.0, inactivity_timeout=None),
        LocalPolicy(scale_down_delay=2.0),
        Snapshot(now=3.0, waiting=(WaitingRequest(1, 100.0, 2.5),), last_activity=1.0),
        BookSettings(params=EndpointParams(max_workers=3), route_hold=0.0),
        Deleted(7, success=False, status="Rejected"),
        Provision(1),
        Resume(2),
        Stop(3, keep=True, reason="surplus"),
        Answer(4, None),
        Plan(params=EndpointParams(cold_workers=2), cold_start=(5.0, 9.0), cold_start_each=(6.0,), max_sessions=4),
    ],
    ids=lambda value: type(value).__name__,
)
def test_frozen_records_are_pickled_and_copied_by_their_fields(value):
    """As a sweep sends plans to its processes: what comes back is equal, of the same kind, and still frozen."""
    first = next(iter(value.__dataclass_fields__))
    for back in (pickle.loads(pickle.dumps(value)), copy.copy(value), copy.deepcopy(value)):
        assert back == value and type(back) is type(value)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(back, first, None)


def test_a_result_pickled_and_read_back_gives_the_same_figures():
    """A sweep's processes send their results back pickled: every figure survives the trip."""
    result = simulate(mixed_trace(3), Plan(cold_start=(2.0, 9.0), params=EndpointParams(cold_workers=2)), seed=5)
    back = pickle.loads(pickle.dumps(result))
    assert back.as_dict() == result.as_dict()
    assert back.waits == result.waits


@pytest.mark.parametrize(
    "chosen",
    [
        Plan(cold_start=(5.0, 40.0)),
        Plan(params=EndpointParams(max_workers=4, cold_workers=2, min_load=100.0), cold_start=(5.0, 20.0)),
        Plan(route_hold=0.0, cold_start=(10.0, 10.0), max_sessions=5),
        Plan(params=EndpointParams(target_util=0.5, inactivity_timeout=None), cold_start=(1.0, 1.0)),
    ],
)
def test_skipping_steps_that_ask_for_nothing_changes_no_figure(chosen):
    """The planner's shortcut (no book step where none can act) gives exactly what stepping after every event gives."""
    jobs = mixed_trace(5)
    fast = simulate(jobs, chosen, seed=4)
    exact = simulate(jobs, chosen, seed=4, exact=True)
    assert fast.as_dict() == exact.as_dict()
    assert fast.waits == exact.waits


def test_a_session_waiting_for_hours_keeps_polling_at_the_sdks_longest_pause():
    """A session that waits through thousands of polls pauses at most max_poll between them, and starts at once."""
    # One worker, taken for an hour; the second job's session is answered at once (no hold) and polls.
    jobs = [Job(0.0, 3600.0), Job(0.0, 1.0)]
    chosen = Plan(params=EndpointParams(max_workers=1), cold_start=(0.0, 0.0), route_hold=0.0, max_poll=0.5)
    result = simulate(jobs, chosen)
    first_ends = result.waits[0] + 3600.0
    assert first_ends <= result.waits[1] <= first_ends + 0.5 + 1e-6


def test_cold_workers_resume_instead_of_provisioning():
    """With cold_workers, a stopped worker is resumed for the next burst and its seconds billed at the stopped price."""
    jobs = [Job(0.0, 5.0)] * 3 + [Job(200.0, 5.0)] * 3
    result = simulate(jobs, plan(cold=20.0, cold_workers=3, inactivity_timeout=10.0, resume=(2.0, 2.0)))
    assert result.resumed >= 1
    assert result.cold_worker_s > 0
    assert max(result.waits[3:]) < 20.0


def test_dispatcher_cap_limits_sessions_and_so_workers():
    """The dispatcher opens no more sessions than max_sessions, so no more workers are started."""
    jobs = [Job(0.0, 3.0) for _ in range(10)]
    result = simulate(jobs, plan(cold=1.0, max_sessions=2, target_queue_time=0.0))
    assert result.peak_workers <= 2


def test_peak_sessions_counts_the_sessions_alive_at_once_under_the_cap():
    """Six jobs at once open six sessions, or as many as the dispatcher's cap allows."""
    jobs = [Job(0.0, 2.0) for _ in range(6)]
    assert simulate(jobs, plan(cold=1.0, max_workers=1)).peak_sessions == 6
    assert simulate(jobs, plan(cold=1.0, max_workers=1, max_sessions=4)).peak_sessions == 4


@pytest.mark.parametrize("seed", [0, 1])
def test_a_cap_at_the_peak_sessions_replays_the_same_as_no_cap(seed):
    """What the planner tells the dispatcher to set: a cap no lower than the most sessions alive changes nothing."""
    jobs = mixed_trace(seed)
    uncapped = plan(cold=8.0, max_workers=3)
    free = simulate(jobs, uncapped, seed=seed)
    assert free.peak_sessions > 3  # a backlog, so the sessions outnumber the workers
    capped = simulate(jobs, dataclasses.replace(uncapped, max_sessions=free.peak_sessions), seed=seed)
    assert capped.waits == free.waits
    assert {**capped.as_dict(), "params": None} == {**free.as_dict(), "params": None}
    # A cap that binds does change them.
    one = simulate(jobs, dataclasses.replace(uncapped, max_sessions=1), seed=seed)
    assert one.peak_sessions == 1 and one.waits != free.waits


def test_timeline_records_queue_depth_and_workers():
    """A recorded run keeps, per moment, the jobs waiting and the workers in each phase."""
    jobs = [Job(0.0, 2.0) for _ in range(4)]
    result = simulate(jobs, plan(cold=2.0, max_workers=2), record=True)
    assert result.timeline
    assert max(row[1] for row in result.timeline) == 4
    assert max(row[2] + row[3] + row[4] for row in result.timeline) == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_timeline_shows_each_phase_change_at_its_moment(seed):
    """The workers by phase in the timeline, summed over time, are the billed worker-seconds.

    A worker stopped while provisioning is gone at once, with no step of the
    book: its row must still come at that moment, or the timeline would show it
    stopping until the next step.
    """
    jobs = mixed_trace(seed)
    result = simulate(jobs, plan(cold=8.0, max_workers=6, stop_seconds=0.5), seed=seed, record=True)
    rows = result.timeline
    assert rows
    billed = 0.0
    for row, after in zip(rows, rows[1:] + [(result.horizon_s,)], strict=True):
        end = min(after[0], result.horizon_s)
        if end > row[0]:
            billed += (end - row[0]) * sum(row[2:6])  # provisioning, loading, ready, stopping
    assert billed == pytest.approx(result.billed_worker_s, rel=1e-9)


def test_generators_are_seeded_and_shaped():
    """Generated traces repeat under a seed, and a diurnal day is quiet at midnight and busy at noon."""
    first = diurnal(0.5, 24, JobSeconds(mean=10), random.Random(7))
    assert first == diurnal(0.5, 24, JobSeconds(mean=10), random.Random(7))
    night = sum(1 for j in first if j.arrival < 3 * 3600)
    noon = sum(1 for j in first if 10.5 * 3600 <= j.arrival < 13.5 * 3600)
    assert noon > 5 * night
    assert 0.5 * 43200 * 0.9 < len(first) < 0.5 * 43200 * 1.1
    spaced = bursts(3, 4, 60.0, JobSeconds(mean=None, low=1, high=2), random.Random(1))
    assert [j.arrival for j in spaced] == [0.0] * 4 + [60.0] * 4 + [120.0] * 4
    assert all(1 <= j.duration <= 2 for j in spaced)


def test_percentile_interpolates():
    """The one percentile the planner, demo and bench report interpolates between neighbours, as numpy does."""
    values = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.0
    assert percentile(values, 95) == pytest.approx(3.8)
    assert percentile([], 95) is None


def test_pareto_front_and_cheapest_choice():
    """The front keeps sets no other beats on both cost and p95; the choice is the cheapest within the limit."""
    jobs = [Job(0.0, 5.0) for _ in range(4)] + [Job(100.0, 5.0) for _ in range(4)]
    results = [simulate(jobs, plan(cold=10.0, max_workers=n)) for n in (1, 2, 4)]
    p95 = [r.wait_stats()["p95"] for r in results]
    costs = [r.cost for r in results]
    front = pareto_front(results)
    assert front == sorted(front, key=lambda i: costs[i])
    for i in range(3):
        dominated = any(costs[j] <= costs[i] and p95[j] < p95[i] for j in range(3) if j != i)
        assert (i in front) == (not dominated)
    limit = sorted(p95)[1]
    chosen = cheapest_within(results, limit)
    assert p95[chosen] <= limit
    assert all(costs[chosen] <= costs[i] for i in range(3) if p95[i] <= limit)
    assert cheapest_within(results, -1.0) is None


def test_speed_figure_names_the_trace_and_the_interpreter():
    """The bench's planner figure says what trace it replayed, on which interpreter, and how long it took."""
    import platform

    from lib.planner.speed import bench_planner

    figure = bench_planner(jobs=300, hours=24, job_seconds=2.0, cold_start=5.0, max_workers=5)
    assert 250 < figure["jobs"] < 350
    assert figure["cpu_s"] >= 0
    assert f"{figure['jobs']} jobs" in figure["line"]
    assert platform.python_version() in figure["line"]
    assert "diurnal 24 h" in figure["trace"]
    assert "min_load" not in figure["params"]


def test_speed_figure_with_a_kept_fleet_names_its_min_load_and_keeps_it_up():
    """A min_load keeps that many workers up the whole day, and the figure's line says so."""
    from lib.planner.speed import bench_planner

    figure = bench_planner(jobs=200, hours=24, job_seconds=2.0, cold_start=5.0, max_workers=8, min_load=800.0)
    assert "min_load 800" in figure["line"]
    assert figure["peak_workers"] == 8 and figure["cold_starts"] == 8


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--jobs", "0"], "--jobs 0: give 1 or more jobs"),
        (["--hours", "-1"], "--hours -1: give hours > 0"),
        (["--min-load", "-100"], "--min-load -100: give a load >= 0"),
    ],
)
def test_speed_refuses_a_bad_flag_in_one_line(argv, named, capsys):
    from lib.planner.speed import main

    line = usage_refused(capsys, main, argv)
    assert named in line, line


@settings(max_examples=25, deadline=None)
@given(
    arrivals=st.lists(st.floats(0, 120, allow_nan=False), min_size=1, max_size=25),
    durations=st.lists(st.floats(0, 30, allow_nan=False), min_size=25, max_size=25),
    cold=st.tuples(st.floats(0, 20), st.floats(0, 20)).map(sorted),
    max_workers=st.integers(1, 6),
    cold_workers=st.integers(0, 2),
    min_load=st.sampled_from([0.0, 100.0]),
    target_queue_time=st.sampled_from([0.0, 0.5, 3.0]),
    inactivity=st.sampled_from([None, 0.0, 4.0]),
    hold=st.sampled_from([0.0, 6.0]),
    seed=st.integers(0, 3),
)
def test_shortcut_matches_the_exact_replay_on_any_trace(
    arrivals, durations, cold, max_workers, cold_workers, min_load, target_queue_time, inactivity, hold, seed
):
    """On any small trace and plan, skipping the steps that ask for nothing gives the exact replay's figures."""
    jobs = [Job(a, d) for a, d in zip(sorted(arrivals), durations, strict=False)]
    params = EndpointParams(
        max_workers=max_workers,
        cold_workers=min(cold_workers, max_workers),
        min_load=min_load,
        target_queue_time=target_queue_time,
        inactivity_timeout=inactivity,
    )
    chosen = Plan(params=params, cold_start=(cold[0], cold[1]), resume=(cold[0] / 2, cold[1] / 2), route_hold=hold)
    fast = simulate(jobs, chosen, seed=seed)
    exact = simulate(jobs, chosen, seed=seed, exact=True)
    assert fast.as_dict() == exact.as_dict()
    assert fast.waits == exact.waits
    assert fast.busy_worker_s == pytest.approx(sum(j.duration for j in jobs))
    assert fast.billed_worker_s >= fast.busy_worker_s - 1e-6
