"""The local demo, ``python -m lib.demo``, as a user runs it: the whole loop, its summary, chaos and Ctrl-C."""

from __future__ import annotations

import json
import signal

import pytest

from lib.standin.process import ChildProcess
from tests.helpers import children_of, summary_of
from tests.standin import process_gone


def demo(*args: str) -> ChildProcess:
    """``python -m lib.demo *args``, every output line kept."""
    return ChildProcess.python("-m", "lib.demo", *args, tail_lines=None)


@pytest.mark.slow
async def test_the_demo_with_chaos_runs_every_job_once_to_done_and_prints_the_summary(tmp_path):
    """--chaos 1: a worker SIGKILLed mid-job; its job is redelivered, done again and acked once; exit 0."""
    job_log = tmp_path / "jobs.jsonl"
    argv = ["--jobs", "3", "--job-seconds", "2", "--chaos", "1", "--max-sessions", "3"]
    argv += ["--cold-start", "0.2", "--inactivity-timeout", "1", "--plain", "--job-log", str(job_log)]
    run = await demo(*argv).start()
    try:
        code = await run.wait(150)
        done, total, failed, lost, twice = summary_of(run)
        assert (code, done, total, failed, lost) == (0, 3, 3, 0, 0), run.tail()
        assert twice <= 1
        assert run.matches(r"chaos: 1 of 1 workers killed"), run.tail()
        assert run.matches(r"back to 0 after \d"), run.tail()
        rows = [json.loads(line) for line in job_log.read_text().splitlines()]
        by_job: dict[str, list[str]] = {}
        for row in rows:
            by_job.setdefault(row["job_id"], []).append(row["outcome"])
        assert all(outcomes.count("done") == 1 for outcomes in by_job.values()), rows
        assert any("lost" in outcomes or "abandoned" in outcomes for outcomes in by_job.values()), rows
    finally:
        await run.stop(10.0)


@pytest.mark.slow
async def test_a_job_unfinished_by_the_deadline_is_lost_and_the_demo_exits_1():
    """A job still running at --deadline counts as lost: the summary says so and the exit code is 1."""
    argv = ["--jobs", "1", "--job-seconds", "60", "--deadline", "2", "--plain"]
    run = await demo(*argv, "--cold-start", "0").start()
    try:
        assert await run.wait(60) == 1, run.tail()
        assert summary_of(run) == (0, 1, 0, 1, 0)
    finally:
        await run.stop(10.0)


@pytest.mark.slow
async def test_ctrl_c_in_the_demo_leaves_no_worker_consumer_or_nats_server_running():
    """Ctrl-C while jobs run stops every worker, consumer, job and the nats-server, and exits 130."""
    argv = ["--jobs", "2", "--job-seconds", "60", "--plain", "--cold-start", "0"]
    run = await demo(*argv).start()
    try:
        await run.wait_for_line(r"job \S+ attempt 1 started", 90, count=2)
        assert run.proc is not None
        started = children_of(run.proc.pid)
        assert len(started) >= 5, started  # nats-server, 2 workers, 2 consumers (and their jobs)
        run.send_signal(signal.SIGINT)
        assert await run.wait(40) == 130, run.tail()
        left = [pid for pid in started if not process_gone(pid)]
        assert not left, f"still running: {left}\n{run.tail()}"
    finally:
        await run.stop(10.0)
