"""`python -m lib.planner.fidelity`: its input checks; tests/e2e/test_planner_fidelity.py runs the comparison."""

from __future__ import annotations

import pytest

from lib.planner.fidelity import DEFAULT_TRACE, main, write_trace
from lib.planner.trace import load_trace
from tests.helpers import usage_refused


def test_the_opening_jobs_written_as_a_trace_read_back_unchanged(tmp_path):
    whole = load_trace(DEFAULT_TRACE)
    part = load_trace(write_trace(whole[:10], tmp_path / "first.csv"))
    assert len(whole) == 30
    assert part == whole[:10]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--jobs", "0"], "--jobs 0: give a number of jobs >= 1"),
        (["--trace", "no-such-trace.csv"], "--trace no-such-trace.csv: no such file"),
        (["--provisioning-delay", "-1"], "--provisioning-delay -1: give seconds in [0, 60)"),
        (["--json", "no-such-dir/figures.json"], "--json no-such-dir/figures.json: there is no directory no-such-dir"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(argv, named, capsys):
    line = usage_refused(capsys, main, argv)
    assert named in line, line


def test_a_trace_with_a_bad_row_is_one_line_and_exit_2(tmp_path, capsys):
    trace = tmp_path / "bad.csv"
    trace.write_text("arrival,duration\n0,1\n2,-1\n")
    line = usage_refused(capsys, main, ["--trace", str(trace)])
    assert "bad.csv" in line, line


def test_each_workers_cold_start_runs_to_its_consumers_first_claim():
    """A worker's cold start, as the planner gets it, is its creation to its ready report plus the time its
    consumer took to claim the first session; a worker stopped while provisioning takes the others' mean."""
    from lib.planner.fidelity import real_figures

    t0 = 1000.0
    fleet = {
        "workers": [
            {"id": 1, "url": "http://w1", "phases": [[t0, "provisioning"], [t0 + 1, "loading"], [t0 + 2.0, "ready"],
                                                     [t0 + 9, "stopping"], [t0 + 9.2, "gone"]]},
            {"id": 2, "url": "http://w2", "phases": [[t0, "provisioning"], [t0 + 1, "loading"], [t0 + 2.4, "ready"],
                                                     [t0 + 9, "stopping"], [t0 + 9.2, "gone"]]},
            {"id": 3, "url": "http://w3", "phases": [[t0 + 3, "provisioning"], [t0 + 3.5, "stopping"],
                                                     [t0 + 3.5, "gone"]]},
        ]
    }  # fmt: skip

    def row(job: str, worker: str, reserved: float, claimed: float) -> dict:
        return {"job_id": job, "attempt": 1, "enqueued": t0 - 0.5, "reserved": reserved, "claimed": claimed,
                "started": claimed + 0.01, "outcome": "done", "worker": worker}  # fmt: skip

    rows = [
        row("j1", "http://w1", t0 + 2.0, t0 + 2.01),
        row("j2", "http://w2", t0 + 2.4, t0 + 2.7),  # its consumer was still starting
        row("j3", "http://w1", t0 + 5.0, t0 + 6.0),  # not the worker's first session: not counted
    ]
    figures = real_figures(rows, fleet)
    assert figures["cold_start_s"] == pytest.approx(2.2)
    assert figures["consumer_lag_s"] == pytest.approx((0.01 + 0.3) / 2)
    assert figures["cold_start_each"] == pytest.approx([2.01, 2.7, (2.01 + 2.7) / 2])
    assert figures["effective_cold_start_s"] == pytest.approx((2.01 + 2.7) / 2)


def test_the_default_trace_starts_the_same_workers_whatever_the_cold_starts_and_the_hops():
    """Replayed with each worker's cold start anywhere in 1-3 s, and each job started up to 0.6 s late and
    holding its worker up to 1.2 s longer (the hops the planner does not model), the default trace starts the
    same 9 workers as without the hops, and each job gets its worker at the same moment: its wait differs only by
    its own late start."""
    import random

    from lib.planner.fidelity import INACTIVITY_TIMEOUT, MAX_SESSIONS
    from lib.planner.model import Plan, simulate
    from lib.planner.trace import Job
    from lib.standin.scaling import EndpointParams, LocalPolicy

    jobs = load_trace(DEFAULT_TRACE)
    rng = random.Random(5)
    for _ in range(100):
        each = tuple(rng.uniform(1.0, 3.0) for _ in range(40))
        # The stand-in's settings in the demo the real run is (workers/null/demo.py).
        plan = Plan(
            params=EndpointParams(max_workers=MAX_SESSIONS, inactivity_timeout=INACTIVITY_TIMEOUT),
            policy=LocalPolicy(scale_down_delay=0.5),
            route_hold=4.0,
            max_sessions=MAX_SESSIONS,
            max_poll=1.0,
            cold_start=(2.0, 2.0),
            cold_start_each=each,
            stop_seconds=0.2,
        )
        late = [rng.uniform(0.0, 0.6) for _ in jobs]
        held = [start + rng.uniform(0.0, 0.6) for start in late]  # its late start, then a slow end
        slow = [Job(job.arrival, job.duration + extra) for job, extra in zip(jobs, held, strict=True)]
        planned, real = simulate(jobs, plan), simulate(slow, plan)
        assert planned.cold_starts == real.cold_starts == 9, each
        for number, (p, r) in enumerate(zip(planned.waits, real.waits, strict=True), start=1):
            assert r == pytest.approx(p, abs=1e-6), (number, p, r, each)
