"""The planner's progress: jobs started within a replay, sets done in a sweep, and the line it draws."""

from __future__ import annotations

import io
import random

from lib.planner import sweep
from lib.planner.model import PROGRESS_EVERY, Plan, simulate
from lib.planner.sweep import Progress, run_sweep
from lib.planner.trace import JobSeconds, poisson
from lib.standin.scaling import EndpointParams


def day_part(jobs: int) -> list:
    # About ``jobs`` jobs of 5 s at 2 a second: a few workers, no backlog.
    return poisson(2.0, jobs / 2.0, JobSeconds(mean=5.0), random.Random(3))


def small_plan(max_workers: int = 20) -> Plan:
    return Plan(params=EndpointParams(max_workers=max_workers), cold_start=(5.0, 5.0))


def test_a_replay_tells_the_jobs_started_every_so_many_and_gives_the_same_figures():
    jobs = day_part(3 * PROGRESS_EVERY + 500)
    told: list[int] = []
    result = simulate(jobs, small_plan(), seed=2, progress=told.append)
    whole = len(jobs) // PROGRESS_EVERY
    assert told == [PROGRESS_EVERY * n for n in range(1, whole + 1)]
    quiet = simulate(jobs, small_plan(), seed=2)
    assert result.as_dict() == quiet.as_dict() and result.waits == quiet.waits


def test_a_sweep_in_one_process_counts_the_set_under_way_by_its_jobs_started():
    jobs = day_part(2 * PROGRESS_EVERY + 100)
    calls: list[tuple[int, int, float]] = []
    run_sweep(jobs, [small_plan(20), small_plan(30)], processes=1, progress=lambda *a: calls.append(a))
    assert all(total == 2 for _, total, _ in calls)
    assert calls == sorted(calls) and calls[-1] == (2, 2, 1.0)
    assert (1, 2, 0.5) in calls  # the first set, once it is back
    shares = {done: [share for d, _, share in calls if d == done] for done in (0, 1)}
    assert any(0 < share < 0.5 for share in shares[0]) and any(0.5 < share < 1 for share in shares[1])


def test_a_sweep_over_processes_reads_the_sets_under_way_while_none_has_finished(monkeypatch):
    monkeypatch.setattr(sweep, "_PROGRESS_POLL", 0.005)
    jobs = day_part(4 * PROGRESS_EVERY)
    calls: list[tuple[int, int, float]] = []
    run_sweep(jobs, [small_plan(20), small_plan(30)], processes=2, progress=lambda *a: calls.append(a))
    assert calls == sorted(calls) and calls[-1] == (2, 2, 1.0)
    # Read from the processes' shared counts before the first set came back.
    assert any(done == 0 and 0 < share < 1 for done, _, share in calls)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_line_tells_sets_done_jobs_started_and_time_left_only_from_whole_sets():
    out = io.StringIO()
    progress = Progress(stream=out, after=0.0)
    progress(0, 2, 0.28)
    progress(1, 2, 0.5)
    progress(2, 2, 1.0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("replayed 0/2 parameter sets, 28% of all jobs started, ")
    assert "left" not in lines[0]
    assert lines[1].startswith("replayed 1/2 parameter sets, 50% of all jobs started, ") and lines[1].endswith("s left")
    assert lines[2].startswith("replayed 2/2 parameter sets, ") and "started" not in lines[2] and "left" not in lines[2]


def test_off_a_terminal_a_line_is_written_once_per_tenth_and_once_done():
    out = io.StringIO()
    progress = Progress(stream=out, after=0.0)
    for step in range(100):
        progress(0, 1, step / 100)
    progress(1, 1, 1.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("replayed 1/1 parameter set, ")


def test_on_a_terminal_the_line_is_redrawn_in_place_and_ended_once_done():
    out = Terminal()
    progress = Progress(stream=out, after=0.0, every=0.0)
    progress(0, 1, 0.5)
    progress(0, 1, 0.9)
    progress(1, 1, 1.0)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    # The shorter last line covers the longer one before it.
    drawn = text.split("\r")
    assert len(drawn[-1].rstrip("\n")) >= len(drawn[-2])


def test_nothing_is_drawn_before_the_first_second():
    out = io.StringIO()
    progress = Progress(stream=out)
    progress(0, 1, 0.5)
    progress(1, 1, 1.0)
    assert out.getvalue() == ""
