"""The local demo's command line, its trace jobs and its fleet log."""

from __future__ import annotations

import pytest

from lib.demo import cli
from lib.demo.run import trace_jobs
from tests.helpers import usage_refused
from workers.null.cli import StartupError


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--jobs", "0"], "--jobs 0"),
        (["--jobs", "2", "--trace", "t.csv"], "not both"),
        (["--queue", "nats://h/x"], "unrecognized arguments: --queue"),
        (["--max-sessions", "0"], "--max-sessions 0"),
        (["--chaos", "-1"], "--chaos -1"),
        (["--sessions", "2", "--jobs", "3"], "--sessions opens sessions with no queue"),
        (["--sessions", "0"], "--sessions 0"),
        (["--hold", "-1"], "--hold -1"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, needle, capsys):
    """Each bad flag of the demo gets one line naming it and exit 2."""
    line = usage_refused(capsys, cli.main, argv)
    assert needle in line, line


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("arrival,length\n0,1\n", "the header has no duration column"),
        ("arrival,duration\n0,-1\n", "t.csv:2:"),
        ("arrival,duration\n5,1\n1,1\n", "sort the trace"),
        ('{"arrival": 0, "duration": "x"}\n', "t.csv:1:"),
    ],
)
def test_bad_traces_name_the_row_and_the_fix(tmp_path, text, needle):
    """A trace the demo cannot replay is refused in one line naming the row, as the planner reads it."""
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(StartupError, match=needle.replace("(", r"\(")) as refused:
        trace_jobs(path)
    assert str(refused.value).startswith("--trace ") and "\n" not in str(refused.value)


def test_a_trace_replays_arrivals_from_its_first_row_in_seconds_or_iso_times(tmp_path):
    """CSV seconds and JSON-lines ISO times both become arrivals relative to the first job."""
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("arrival,duration\n10,1\n12.5,2\n")
    assert [(j.arrival, j.seconds) for j in trace_jobs(csv_path)] == [(0.0, 1.0), (2.5, 2.0)]
    jl = tmp_path / "t.jsonl"
    jl.write_text(
        '{"arrival": "2026-01-01T00:00:00Z", "duration": 1}\n{"arrival": "2026-01-01T00:00:03Z", "duration": 0}\n'
    )
    assert [j.arrival for j in trace_jobs(jl)] == [0.0, 3.0]


def test_fleet_timeline_gives_each_workers_phases_and_url():
    """The demo's fleet log: a worker's phases from the book's commands and events, and its URL where known."""
    from lib.demo.fleet import fleet_timeline
    from lib.standin.book import Provision, Report, Stop

    issued = [(10.0, Provision(1)), (10.0, Provision(2)), (15.0, Stop(1, False, "surplus")), (11.0, Stop(2, False, ""))]
    events = [
        (11.0, "started", (1,)),
        (12.5, "report", (Report(1, max_perf=100.0),)),
        (15.2, "stopped", (1,)),
        (11.0, "stopped", (2,)),
    ]
    timeline = fleet_timeline(events, issued, {1: "http://127.0.0.1:4000"})
    first, second = timeline["workers"]
    assert first == {
        "id": 1,
        "url": "http://127.0.0.1:4000",
        "phases": [[10.0, "provisioning"], [11.0, "loading"], [12.5, "ready"], [15.0, "stopping"], [15.2, "gone"]],
    }
    assert second == {"id": 2, "phases": [[10.0, "provisioning"], [11.0, "stopping"], [11.0, "gone"]]}
