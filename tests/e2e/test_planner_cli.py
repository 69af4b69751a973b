"""``python -m lib.planner`` as a user runs it: a real process, its output and its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def planner(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lib.planner", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sweep_from_a_trace_file_prints_the_table_and_the_choice(tmp_path):
    """A CSV trace swept over two parameters prints a row per set and the values to set on the endpoint."""
    trace = tmp_path / "jobs.csv"
    rows = ["arrival,duration"] + [f"{i * 7.5:.1f},{3 + i % 4}" for i in range(40)]
    trace.write_text("\n".join(rows) + "\n")
    out_file = tmp_path / "out.json"
    done = planner(
        "--trace", str(trace), "--cold-start", "5:10", "--max-workers", "1,3", "--min-load", "0,100",
        "--max-p95-wait", "60", "--json", str(out_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count("\n") >= 6
    assert "set on the endpoint" in done.stdout
    data = json.loads(out_file.read_text())
    assert len(data["results"]) == 4
    assert data["chosen"] in range(4)


def test_bad_trace_exits_2_with_one_line(tmp_path):
    """An unsorted trace ends the process with exit 2 and one line naming the row, and no traceback."""
    trace = tmp_path / "jobs.csv"
    trace.write_text("arrival,duration\n10,1\n2,1\n")
    done = planner("--trace", str(trace))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert f"{trace}:3:" in done.stderr and "sort the trace by arrival" in done.stderr
