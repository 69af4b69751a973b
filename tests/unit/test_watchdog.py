"""The job watchdog, as the consumer runs it: a separate process that kills the job's group when its claim runs out."""

from __future__ import annotations

import subprocess
import sys
import time

from workers.null.consumer.runs import WATCHDOG


def _job() -> subprocess.Popen:
    """A job in its own process group, as CommandRun starts one."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def _watchdog(pgid: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-S", str(WATCHDOG), str(pgid)], stdin=subprocess.PIPE)


def test_a_deadline_left_to_pass_kills_the_jobs_group_though_nothing_else_is_written():
    """What a frozen consumer leaves behind: its last deadline passes, and the job is SIGKILLed soon after."""
    job = _job()
    dog = _watchdog(job.pid)
    try:
        written = time.monotonic()
        dog.stdin.write(f"{written + 0.5}\n".encode())
        dog.stdin.flush()
        assert job.wait(10) == -9
        assert time.monotonic() - written >= 0.5
        assert dog.wait(10) == 0
    finally:
        job.kill()
        dog.kill()


def test_later_deadlines_keep_the_job_and_end_of_input_ends_the_watchdog_without_a_kill():
    job = _job()
    dog = _watchdog(job.pid)
    try:
        for _ in range(5):
            dog.stdin.write(f"{time.monotonic() + 0.6}\n".encode())
            dog.stdin.flush()
            time.sleep(0.2)
        dog.stdin.close()
        assert dog.wait(10) == 0
        assert job.poll() is None
    finally:
        job.kill()
        job.wait(10)
        dog.kill()
