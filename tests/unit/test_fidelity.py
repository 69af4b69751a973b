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
