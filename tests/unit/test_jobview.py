"""What the dispatcher shows: the live line on a terminal and its Prometheus metrics."""

from __future__ import annotations

import io
import logging
import time
import urllib.request

from workers.null.dispatch.ledger import Ledger
from workers.null.dispatch.metrics import Metrics
from workers.null.dispatch.view import LiveLine, view_line
from workers.null.protocol import CLAIMED, DONE, FINISHED, STARTED, JobEvent


def busy_ledger() -> Ledger:
    """Three jobs published; one of them claimed, run and done on a reserved session."""
    ledger = Ledger(ack_wait=3.0)
    now = time.time()
    for job_id in ("job-a", "job-b", "job-c"):
        ledger.job_published(job_id, now)
    record = ledger.session_asked()
    ledger.session_reserved(record, "s1", "http://127.0.0.1:9")
    for kind, outcome in ((CLAIMED, None), (STARTED, None), (FINISHED, DONE)):
        ledger.event(JobEvent(kind=kind, job_id="job-a", attempt=1, session_id="s1", at=time.time(), outcome=outcome))
    return ledger


def test_the_view_line_counts_each_state():
    """The one-line view names queued, waiting, running, done, failed and workers, with their counts."""
    line = view_line(busy_ledger(), workers=1)
    assert line.startswith("queued ") and "done 1" in line and "failed 0" in line and line.endswith("workers 1")


def test_log_lines_print_above_the_live_line_which_stays_last():
    """On a terminal each log record is printed above the status line, which is redrawn after it."""
    stream = io.StringIO()
    inner = logging.StreamHandler(stream)
    live = LiveLine(stream, inner)
    live.show("queued 1 · running 0")
    live.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "a log line", None, None))
    live.finish()
    text = stream.getvalue()
    assert text.index("a log line") < text.rindex("queued 1 · running 0")
    assert text.endswith("queued 1 · running 0\n")


def test_metrics_are_served_on_loopback_with_no_job_ids_as_labels():
    """--metrics-port serves the queue, session and outcome metrics on 127.0.0.1; no label carries a job id."""
    metrics = Metrics.start(0)
    try:
        ledger = busy_ledger()
        metrics.update(ledger)
        for row in ledger.jobs["job-a"].attempts.values():
            metrics.attempt(row)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        metrics.stop()
    for name in (
        "null_dispatcher_queue_pending",
        "null_dispatcher_jobs_running",
        'null_dispatcher_sessions{state="running"}',
        "null_dispatcher_sessions_asked_total 1.0",
        'null_dispatcher_attempts_total{outcome="done"} 1.0',
        "null_dispatcher_queue_wait_seconds_count 1.0",
        "null_dispatcher_run_seconds_count 1.0",
    ):
        assert name in text, name
    assert "job-a" not in text and "job_id" not in text and "session_id" not in text
