"""``python -m lib.planner`` as a user runs it: a real process, its output and its exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def children_of(pid: int) -> set[int]:
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_sweep_stopped_midway_exits_130_and_leaves_no_process(how):
    """Ctrl-C (SIGINT to the process group) or SIGTERM to the planner alone, mid-sweep on two processes:
    one line, exit 130, and every pool process gone."""
    sweep = ["--poisson", "1:40000", "--max-workers", "5,10,20,40", "--processes", "2"]
    argv = [sys.executable, "-m", "lib.planner", *sweep]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stderr is not None
        assert "replaying 4 parameter sets" in proc.stderr.readline()
        deadline = time.monotonic() + 10
        while len(pool := children_of(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pool) == 2, pool
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted", err
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in pool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pool if Path(f"/proc/{pid}").exists()], "a pool process outlived the planner"
