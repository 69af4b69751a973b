"""The planner's traces and command line: files read, bad input refused in one line, and each output."""

from __future__ import annotations

import json

import pytest

from lib.planner.cli import main
from lib.planner.trace import Job, TraceError, load_trace


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_with_header_reads_seconds(tmp_path):
    """A CSV with a header gives one job per row, in seconds from the start."""
    path = write(tmp_path, "t.csv", "arrival,duration,note\n0,2.5,a\n1.5,3,b\n\n4,0,c\n")
    assert load_trace(path) == [Job(0.0, 2.5), Job(1.5, 3.0), Job(4.0, 0.0)]


def test_json_lines_read_iso_times_from_the_earliest(tmp_path):
    """JSON lines with ISO 8601 arrivals count seconds from the first one; a trailing Z is UTC."""
    lines = [
        {"arrival": "2026-03-01T10:00:00Z", "duration": 4},
        {"arrival": "2026-03-01T10:00:02.5+00:00", "duration": 1.5},
    ]
    path = write(tmp_path, "t.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    assert load_trace(path) == [Job(0.0, 4.0), Job(2.5, 1.5)]


def test_dispatcher_job_log_replays_each_jobs_final_attempt(tmp_path):
    """A job log gives one job per id: its final attempt's enqueued time and finished minus started."""
    entries = [
        {"job_id": "b", "attempt": 1, "enqueued": 105.0, "session_asked": 105.0, "reserved": 108.0,
         "started": 108.5, "finished": 109.0, "outcome": "failed"},
        {"job_id": "a", "attempt": 1, "enqueued": 100.0, "session_asked": 100.1, "reserved": 103.0,
         "started": 103.2, "finished": 110.2, "outcome": "ok"},
        {"job_id": "b", "attempt": 2, "enqueued": 112.0, "session_asked": 112.0, "reserved": 112.1,
         "started": 112.2, "finished": 115.2, "outcome": "ok"},
        {"job_id": "c", "attempt": 1, "enqueued": 101.0, "session_asked": 101.0, "reserved": None,
         "started": None, "finished": None, "outcome": "lost"},
    ]  # fmt: skip
    path = write(tmp_path, "jobs.log", "\n".join(json.dumps(e) for e in entries) + "\n")
    jobs = load_trace(path)
    assert [j.arrival for j in jobs] == [0.0, 12.0]  # from the first job replayed
    assert [j.duration for j in jobs] == pytest.approx([7.0, 3.0])


def test_job_log_as_the_dispatcher_writes_it(tmp_path):
    """The dispatcher's own job log lines (epoch seconds, a retried job) replay from the first job's arrival."""
    from workers.null.dispatch.ledger import Attempt

    rows = []
    for job_id, attempt, enqueued, started, finished, outcome in (
        ("j1", 1, 1_767_000_000.0, 1_767_000_004.0, 1_767_000_010.0, "retry"),
        ("j2", 1, 1_767_000_002.0, 1_767_000_003.0, 1_767_000_005.5, "done"),
        ("j1", 2, 1_767_000_011.0, 1_767_000_012.0, 1_767_000_020.0, "done"),
    ):
        row = Attempt(job_id, attempt, enqueued, f"s-{job_id}-{attempt}")
        row.started, row.finished, row.outcome = started, finished, outcome
        rows.append(json.dumps(row.to_dict()))
    path = write(tmp_path, "jobs.log", "\n".join(rows) + "\n")
    assert load_trace(path) == [Job(0.0, 2.5), Job(9.0, 8.0)]


def test_job_log_with_iso_times(tmp_path):
    """A job log written with ISO times is read the same way."""
    entry = {
        "job_id": 1,
        "attempt": 1,
        "enqueued": "2026-03-01T10:00:00+00:00",
        "started": "2026-03-01T10:00:30+00:00",
        "finished": "2026-03-01T10:01:00+00:00",
    }
    path = write(tmp_path, "jobs.log", json.dumps(entry) + "\n")
    assert load_trace(path) == [Job(0.0, 30.0)]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("missing.csv", "arrival,seconds\n0,1\n", ":1: the header has no duration column"),
        ("negative.csv", "arrival,duration\n0,1\n-3,1\n", ":3: arrival -3 is negative"),
        ("negdur.csv", "arrival,duration\n0,-1\n", ":2: duration -1 is negative"),
        ("unsorted.csv", "arrival,duration\n5,1\n2,1\n", ":3: arrival 2s is before the previous row's 5s; sort"),
        ("empty.csv", "", "the trace is empty"),
        ("header.csv", "arrival,duration\n", "the trace has no jobs"),
        ("word.csv", "arrival,duration\n0,soon\n", ":2: duration 'soon' is not a number"),
        ("blank.csv", "arrival,duration\n0,\n", ":2: no duration"),
        ("bad.jsonl", '{"arrival": 0, "duration": 1}\n{"arrival": 1,\n', ":2: not valid JSON"),
        ("list.jsonl", '{"arrival": 0, "duration": 1}\n[1, 2]\n', ":2: a JSON list, not an object"),
        ("time.jsonl", '{"arrival": "noon", "duration": 1}\n', "neither seconds nor an ISO 8601 time"),
    ],
)
def test_bad_trace_names_the_row_and_the_fix(tmp_path, name, text, expected):
    """Each kind of bad trace raises one line naming the file, the row and what to do."""
    path = write(tmp_path, name, text)
    with pytest.raises(TraceError) as caught:
        load_trace(path)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith(str(path))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--trace", "{missing}"],
        ["--trace", "{bad}"],
        [],
        ["--poisson", "fast:10"],
        ["--poisson", "0:10"],
        ["--diurnal", "1"],
        ["--bursts", "2:1.5:10"],
        ["--poisson", "1:10", "--job-seconds", "9:3"],
        ["--poisson", "1:10", "--max-workers", "5,,6"],
        ["--poisson", "1:10", "--target-util", "0.5,2"],
        ["--poisson", "1:10", "--cold-start", "9:3"],
        ["--poisson", "1:10", "--cold-workers", "30"],
        ["--poisson", "1:10", "--plot", "out.pdf"],
        ["--poisson", "1:10", "--trace", "{bad}"],
        ["--poisson", "1:10", "--price-running", "-1"],
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv):
    """Bad flags and bad traces end with exit 2 and one line on stderr, never a traceback."""
    bad = write(tmp_path, "bad.csv", "arrival,duration\n3,1\n1,1\n")
    argv = [a.format(missing=tmp_path / "nope.csv", bad=bad) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert out == ""


def test_json_has_the_issues_shape(tmp_path, capsys):
    """--json writes a result per set with the params, waits, cold starts, worker-seconds and cost."""
    out_file = tmp_path / "r.json"
    code, out, _ = run(
        capsys,
        "--bursts", "3:4:120", "--job-seconds", "2:6", "--cold-start", "3",
        "--max-workers", "2,8", "--json", str(out_file), "--processes", "1",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out_file.read_text())
    assert len(data["results"]) == 2
    for result in data["results"]:
        params = result["params"]
        for key in (
            "target_util",
            "min_load",
            "max_workers",
            "cold_workers",
            "max_queue_time",
            "target_queue_time",
            "inactivity_timeout",
            "cold_start",
        ):
            assert key in params
        assert params["cold_start"] == 3.0
        assert result["jobs"] == 12
        assert isinstance(result["cold_starts"], int)
        assert isinstance(result["peak_workers"], int)
        assert set(result["wait_s"]) >= {"p50", "p95", "p99", "max"}
        assert result["billed_worker_s"] >= result["busy_worker_s"] > 0
        assert result["cost"] > 0
    assert [r["params"]["max_workers"] for r in data["results"]] == [2, 8]
    assert "set" in out and "pareto" in out


def test_sdk_max_poll_reaches_the_plan_and_a_bad_one_is_one_line(tmp_path, capsys):
    """--sdk-max-poll is swept like the other flags and written with the params; 0 is refused in one line."""
    out_file = tmp_path / "r.json"
    code, _, _ = run(
        capsys, "--bursts", "1:3:0", "--cold-start", "2", "--sdk-max-poll", "1,5", "--json", str(out_file),
        "--processes", "1",
    )  # fmt: skip
    assert code == 0
    assert [r["params"]["max_poll"] for r in json.loads(out_file.read_text())["results"]] == [1.0, 5.0]
    code, out, err = run(capsys, "--bursts", "1:3:0", "--sdk-max-poll", "0")
    assert code == 2
    assert "max_poll" in err and len(err.strip().splitlines()) == 1, err


def test_max_p95_wait_picks_the_cheapest_set_that_meets_it(tmp_path, capsys):
    """--max-p95-wait prints the cheapest set whose p95 wait is within the limit and the values to set."""
    out_file = tmp_path / "r.json"
    argv = ["--bursts", "2:6:200", "--job-seconds", "5", "--cold-start", "10", "--max-workers", "1,3,6"]
    code, _, _ = run(capsys, *argv, "--json", str(out_file), "--processes", "1")
    results = json.loads(out_file.read_text())["results"]
    p95 = [r["wait_s"]["p95"] for r in results]
    limit = sorted(p95)[1] + 1e-5  # the file rounds to the microsecond
    meeting = [i for i in range(3) if p95[i] <= limit]
    assert len(meeting) < 3
    cheapest = min(meeting, key=lambda i: results[i]["cost"])
    code, out, _ = run(capsys, *argv, "--max-p95-wait", str(limit), "--processes", "1")
    assert code == 0
    assert f"max_workers = {results[cheapest]['params']['max_workers']}" in out
    assert "set on the endpoint" in out
    peak_sessions = results[cheapest]["peak_sessions"]
    assert peak_sessions >= results[cheapest]["peak_workers"]
    assert f"run the dispatcher with --max-sessions {peak_sessions} or more" in out
    code, out, _ = run(capsys, *argv, "--max-p95-wait", "0", "--processes", "1")
    assert code == 1
    assert "no set keeps p95 wait <= 0s" in out


def test_plot_writes_a_png(tmp_path, capsys):
    """--plot draws the Pareto front and a timeline into a PNG file."""
    png = tmp_path / "plan.png"
    code, out, _ = run(
        capsys,
        "--poisson", "0.1:600", "--cold-start", "5:15", "--max-workers", "2,4", "--plot", str(png),
        "--max-p95-wait", "1000", "--processes", "1",
    )  # fmt: skip
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in out


def test_same_flags_and_seed_print_the_same(capsys):
    """Two runs with the same flags and seed print the same table."""
    argv = ["--poisson", "0.2:600", "--cold-start", "2:20", "--seed", "5", "--processes", "1"]
    # stdout only: the progress lines on stderr carry the elapsed time.
    first = run(capsys, *argv)
    second = run(capsys, *argv)
    assert first[0] == second[0] == 0
    assert first[1] == second[1]
    assert run(capsys, *argv[:-3], "--seed", "6", "--processes", "1")[1] != first[1]


def test_sweep_over_processes_matches_one_process(tmp_path, capsys):
    """A sweep spread over processes gives the same results, in the same order, as one process."""
    argv = ["--poisson", "0.2:600", "--cold-start", "2:20", "--max-workers", "1,2,4", "--target-util", "0.5,1"]
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    assert run(capsys, *argv, "--processes", "1", "--json", str(one))[0] == 0
    assert run(capsys, *argv, "--processes", "2", "--json", str(many))[0] == 0
    assert json.loads(one.read_text())["results"] == json.loads(many.read_text())["results"]


def test_help_shows_each_default_as_it_would_be_typed(capsys):
    """`--help` gives defaults in the flags' own syntax (60, 0.5, 20), never a Python list or object."""
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("measure yours (default: 60)", "(default: 0.5)", "cap on workers (default: 20)", "(default: 0)"):
        assert shown in text, shown
    for python_repr in ("[", "JobSeconds(", "None)", "(default: mean 10) (default"):
        assert python_repr not in text.replace("[-", ""), python_repr  # usage brackets aside


@pytest.mark.parametrize("flag", ["--json", "--plot", "--jobs-out"])
def test_an_output_file_that_cannot_be_written_is_one_line_and_exit_2_before_any_replay(flag, tmp_path, capsys):
    """An output file in a directory that does not exist, or that is a directory, is refused before the sweep runs."""
    for target in (tmp_path / "missing" / "out.png", tmp_path):
        if flag == "--plot" and target == tmp_path:
            continue  # a directory has no .png suffix: refused for that first
        with pytest.raises(SystemExit) as stopped:
            main(["--poisson", "0.1:100", flag, str(target)])
        assert stopped.value.code == 2
        out, err = capsys.readouterr()
        assert out == "", out  # not even the trace line: nothing ran
        assert f"{flag} {target}: " in err and len(err.strip().splitlines()) == 1, err


def test_cold_starts_file_gives_the_first_workers_their_cold_starts_in_order(tmp_path, capsys):
    """Two jobs at once, each on a new worker: with --cold-starts 3 then 7 they wait 3 s and 7 s; a third worker
    started later draws from --cold-start."""
    colds = write(tmp_path, "colds.txt", "# measured\n3\n\n7.0\n")
    trace = write(tmp_path, "t.csv", "arrival,duration\n0,10\n0,10\n100,1\n")
    out_file, jobs_out = tmp_path / "r.json", tmp_path / "jobs.csv"
    code, _, _ = run(
        capsys, "--trace", str(trace), "--cold-starts", str(colds), "--cold-start", "4", "--target-queue-time", "0",
        "--route-hold", "30", "--inactivity-timeout", "1", "--scale-down-delay", "0", "--json", str(out_file),
        "--jobs-out", str(jobs_out), "--processes", "1",
    )  # fmt: skip
    assert code == 0
    waits = [float(line.split(",")[-1]) for line in jobs_out.read_text().splitlines()[1:]]
    assert waits == pytest.approx([3.0, 7.0, 4.0])
    (result,) = json.loads(out_file.read_text())["results"]
    assert result["cold_starts"] == 3
    assert result["params"]["cold_start_each"] == [3.0, 7.0]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("3\nsoon\n", "colds.txt line 2: 'soon' is not seconds >= 0; one number per line"),
        ("-1\n", "colds.txt line 1: '-1' is not seconds >= 0"),
        ("# none yet\n\n", "colds.txt: no cold starts in it"),
        (None, "colds.txt: no such file"),
    ],
)
def test_a_bad_cold_starts_file_is_one_line_and_exit_2(text, named, tmp_path, capsys):
    path = tmp_path / "colds.txt"
    if text is not None:
        path.write_text(text)
    code, out, err = run(capsys, "--bursts", "1:2:0", "--cold-starts", str(path))
    assert code == 2 and out == ""
    assert named in err and len(err.strip().splitlines()) == 1, err
