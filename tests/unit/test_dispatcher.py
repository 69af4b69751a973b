"""The dispatcher's arithmetic and bookkeeping, and its command line's answers to bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from tests.helpers import usage_refused
from workers.null import dispatcher
from workers.null.dispatch.ledger import LAPSING, PENDING, RUNNING, Ledger, to_open
from workers.null.protocol import CLAIMED, FINISHED, RELEASED, STARTED, JobEvent
from workers.null.queues.base import GAP, Depth, QueueError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ev(kind: str, job: str, sid: str, attempt: int = 1, outcome: str | None = None, at: float = 0.0) -> JobEvent:
    return JobEvent(kind=kind, job_id=job, attempt=attempt, session_id=sid, outcome=outcome, at=at)


def make_ledger(**kw) -> tuple[Ledger, Clock]:
    clock = Clock()
    return Ledger(ack_wait=kw.pop("ack_wait", 3.0), clock=clock, **kw), clock


def run_job(ledger: Ledger, job: str, sid: str, outcome: str = "done", attempt: int = 1) -> None:
    for kind in (CLAIMED, STARTED):
        ledger.event(ev(kind, job, sid, attempt))
    ledger.event(ev(FINISHED, job, sid, attempt, outcome))
    ledger.event(ev(RELEASED, job, sid, attempt))


def test_to_open_covers_pending_jobs_minus_unclaimed_sessions_within_the_cap():
    """open = clamp(pending - unclaimed, 0, max - alive)."""
    assert to_open(pending=5, unclaimed=0, alive=0, max_sessions=10) == 5
    assert to_open(pending=5, unclaimed=2, alive=2, max_sessions=10) == 3
    assert to_open(pending=5, unclaimed=0, alive=8, max_sessions=10) == 2
    assert to_open(pending=1, unclaimed=3, alive=3, max_sessions=10) == 0
    assert to_open(pending=0, unclaimed=0, alive=12, max_sessions=10) == 0


def test_sessions_still_waiting_for_a_worker_count_so_ten_jobs_ask_for_ten_sessions():
    """Ten jobs ask for ten sessions once; while their workers start, nothing more is asked (KEDA's bug)."""
    ledger, _ = make_ledger()
    for n in range(10):
        ledger.job_published(f"j{n}")
    assert ledger.to_open(20) == 10
    for _ in range(10):
        ledger.session_asked()
    assert ledger.to_open(20) == 0
    ledger.job_published("j0")  # a repeated publish adds nothing
    assert ledger.to_open(20) == 0


def test_a_claimed_job_leaves_pending_and_its_session_is_no_longer_unclaimed():
    """A claim takes one job out of pending and one session out of unclaimed, so nothing new is asked."""
    ledger, _ = make_ledger()
    ledger.job_published("a")
    ledger.job_published("b")
    s1, s2 = ledger.session_asked(), ledger.session_asked()
    ledger.session_reserved(s1, "sid1", "http://w1")
    ledger.event(ev(CLAIMED, "a", "sid1"))
    assert (ledger.pending, ledger.unclaimed, ledger.alive) == (1, 1, 2)
    assert ledger.to_open(10) == 0
    assert ledger.jobs["a"].state == RUNNING
    assert s2.alive


def test_a_claim_that_arrives_before_the_sdk_returns_the_session_is_matched_to_it():
    """The consumer's claim can beat the SDK's answer: it is kept and joined to the session on reservation."""
    ledger, _ = make_ledger()
    ledger.job_published("a")
    rec = ledger.session_asked()
    ledger.event(ev(CLAIMED, "a", "sid1"))
    assert ledger.unclaimed == 1  # not yet known to be that session
    ledger.session_reserved(rec, "sid1", "http://w1")
    assert rec.job_id == "a" and ledger.unclaimed == 0
    assert ledger.to_open(10) == 0


def test_after_a_restart_jobs_in_flight_get_no_session_and_only_pending_ones_do():
    """A fresh ledger learns the queue's counts: in-flight jobs never count, pending ones do."""
    ledger, _ = make_ledger()
    ledger.depth_seen(Depth(pending=2, in_flight=5))
    assert ledger.to_open(10) == 2
    ledger.session_asked(), ledger.session_asked()
    assert ledger.to_open(10) == 0
    # A claim by a job only the counts showed consumes one of them.
    ledger.event(ev(CLAIMED, "old", "sidX", attempt=1))
    assert ledger.pending == 1


def test_a_lost_worker_s_job_counts_again_only_when_the_queue_hands_it_back():
    """A worker gone mid-job: its job is not pending until the queue's counts show it again (AckWait)."""
    ledger, clock = make_ledger(ack_wait=3.0)
    ledger.job_published("a")
    rec = ledger.session_asked()
    ledger.session_reserved(rec, "sid1", "http://w1")
    ledger.event(ev(CLAIMED, "a", "sid1"))
    ledger.event(ev(STARTED, "a", "sid1"))
    ledger.session_gone(rec)
    assert rec.end == "lost" and ledger.jobs["a"].state == LAPSING
    assert ledger.to_open(10) == 0
    assert ledger.next_due() == pytest.approx(clock.now + 3.0)
    clock.now += 2.0
    assert not ledger.tick() and ledger.to_open(10) == 0
    clock.now += 1.5
    # Redelivered: neither queue counts it as pending before a fetch, so it is counted by id.
    ledger.depth_seen(Depth(pending=0, in_flight=1))
    assert ledger.jobs["a"].state == PENDING
    assert ledger.to_open(10) == 1
    s2 = ledger.session_asked()
    ledger.session_reserved(s2, "sid2", "http://w2")
    run_job(ledger, "a", "sid2", attempt=2)
    assert ledger.pending == 0 and ledger.jobs["a"].state == "done"
    assert ledger.twice == 1
    assert [r.outcome for r in ledger.jobs["a"].attempts.values()] == ["lost", "done"]


def test_queue_counts_below_ours_drop_old_pending_ids_but_not_fresh_ones():
    """A pending id the queue no longer counts is dropped once it is old, so no session loop finds nothing."""
    ledger, clock = make_ledger()
    ledger.job_published("old")
    clock.now += 5.0
    ledger.job_published("fresh")
    ledger.depth_seen(Depth(pending=0, in_flight=0))
    assert ledger.jobs["old"].state != PENDING
    assert ledger.jobs["fresh"].state == PENDING
    assert ledger.pending == 1


def test_a_handed_back_job_the_queue_no_longer_holds_stops_counting():
    """A job we count as handed back, while the queue holds nothing at all, was acked unseen: dropped."""
    ledger, clock = make_ledger()
    ledger.job_published("a")
    rec = ledger.session_asked()
    ledger.session_reserved(rec, "s1", "u")
    run_job(ledger, "a", "s1", outcome="retry")
    assert ledger.pending == 1
    clock.now += 5.0
    ledger.depth_seen(Depth(pending=0, in_flight=0))
    assert ledger.pending == 0


def test_a_retried_job_is_pending_again_and_a_dead_one_is_not():
    """retry hands the job back (pending); dead ends it."""
    ledger, _ = make_ledger()
    ledger.job_published("a")
    rec = ledger.session_asked()
    ledger.session_reserved(rec, "s1", "u")
    run_job(ledger, "a", "s1", outcome="retry")
    assert ledger.jobs["a"].state == PENDING and not rec.alive
    rec2 = ledger.session_asked()
    ledger.session_reserved(rec2, "s2", "u")
    run_job(ledger, "a", "s2", attempt=2, outcome="dead")
    assert ledger.jobs["a"].state == "dead" and ledger.pending == 0


def test_a_session_released_without_a_job_ends():
    """A release event with no job id ends the session it names."""
    ledger, _ = make_ledger()
    rec = ledger.session_asked()
    ledger.session_reserved(rec, "s1", "u")
    ledger.event(JobEvent(kind=RELEASED, job_id="", attempt=0, session_id="s1"))
    assert not rec.alive and rec.end == "released"


def test_each_attempt_becomes_one_job_log_line_with_every_step():
    """The job log line names the job, attempt, enqueued, session asked, reserved, started, finished, outcome."""
    rows = []
    ledger, clock = make_ledger(on_attempt=rows.append)
    ledger.job_published("a")
    clock.now += 1
    rec = ledger.session_asked()
    clock.now += 2
    ledger.session_reserved(rec, "s1", "http://w1")
    ledger.event(ev(CLAIMED, "a", "s1", at=1003.1))
    ledger.event(ev(STARTED, "a", "s1", at=1003.2))
    ledger.event(ev(FINISHED, "a", "s1", outcome="done", at=1005.0))
    (row,) = rows
    line = json.loads(json.dumps(row.to_dict()))
    assert line["job_id"] == "a" and line["attempt"] == 1 and line["outcome"] == "done"
    assert (line["enqueued"], line["session_asked"], line["reserved"]) == (1000.0, 1001.0, 1003.0)
    assert (line["started"], line["finished"]) == (1003.2, 1005.0)


# -- the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--endpoint", "x"], "no --queue"),
        (["--jobs", "3"], "--jobs is a flag of the local demo: run python -m lib.demo"),
        (["--queue", "nats://h/x", "--max-sessions", "0"], "--max-sessions 0"),
        (["--queue", "nats://h/x", "--lifetime", "-1"], "--lifetime -1"),
        (["--queue", "nats://h/x", "--connect-timeout", "0"], "--connect-timeout 0"),
        (["--queue", "nats://h/x", "--chaos", "2"], "--chaos is a flag of the local demo"),
        (["--queue", "nats://h/x", "--instance", "moon"], "invalid choice"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, needle, capsys):
    """Each bad flag gets one line naming it and exit 2."""
    line = usage_refused(capsys, dispatcher.main, argv, env={"VAST_API_KEY": "k"})
    assert needle in line, line


def test_no_api_key_for_vast_is_one_line_and_exit_2(capsys):
    """Without VAST_API_KEY, a Vast instance is refused in one line naming the fix."""
    assert dispatcher.main(["--queue", "nats://127.0.0.1:1/jobs"], env={}) == 2
    err = capsys.readouterr().err
    assert "VAST_API_KEY" in err and len(err.strip().splitlines()) == 1


def test_a_bad_queue_url_is_one_line_and_exit_2(capsys):
    """A queue URL of an unknown scheme gets one line and exit 2."""
    assert dispatcher.main(["--queue", "kafka://h/x", "setup"], env={}) == 2
    err = capsys.readouterr().err
    assert "kafka" in err and len(err.strip().splitlines()) == 1, err


class ScriptedFeed:
    """A push feed that yields its items, then fails with ``error`` (or waits for good)."""

    def __init__(self, items: list, error: Exception | None = None) -> None:
        self.items, self.error, self.closed = list(items), error, False

    async def start(self) -> None:
        pass

    def __aiter__(self) -> ScriptedFeed:
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


async def test_a_gap_reads_the_counts_and_a_broken_feed_is_reopened_not_fatal(monkeypatch):
    """GAP asks for a reconcile; a feed that raises is closed and reopened after a pause, and its jobs still count."""
    from workers.null.dispatch import dispatcher as dispatching

    monkeypatch.setattr(dispatching, "FEED_RETRY_FIRST", 0.01)
    first = ScriptedFeed(["a", GAP], error=QueueError("Timeout reading from 127.0.0.1"))
    second = ScriptedFeed(["b"])
    reopened = []

    def reopen() -> ScriptedFeed:
        reopened.append(second)
        return second

    ledger, _ = make_ledger()
    d = dispatching.Dispatcher(object(), object(), dispatching.DispatchOptions(), ledger, routing_stop=asyncio.Event())
    seen: list[str] = []
    pump = asyncio.ensure_future(d._pump(first, reopen, seen.append))
    try:
        await asyncio.wait_for(d.reconcile_now.wait(), 5)
        for _ in range(500):
            if seen == ["a", "b"]:
                break
            await asyncio.sleep(0.01)
        assert seen == ["a", "b"] and reopened == [second] and first.closed
        assert not pump.done()
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


def test_jobs_in_flight_that_no_worker_holds_for_a_whole_ack_wait_get_sessions_without_events():
    """Two jobs stay in flight with no worker holding a session (their workers died, no event came): after one
    AckWait of that, both count as pending, and a job that really runs on a held worker never does."""
    ledger, clock = make_ledger(ack_wait=30.0)
    ledger.workers_seen(1)  # one worker runs a third job
    ledger.depth_seen(Depth(pending=0, in_flight=3))
    assert ledger.pending == 0
    clock.now += 20
    ledger.depth_seen(Depth(pending=0, in_flight=3))
    assert ledger.pending == 0  # not yet a whole AckWait
    clock.now += 10
    ledger.depth_seen(Depth(pending=0, in_flight=3))
    assert ledger.pending == 2 and ledger.to_open(10) == 2
    # Sessions for them are held: the surplus is gone at once.
    ledger.workers_seen(3)
    ledger.depth_seen(Depth(pending=0, in_flight=3))
    assert ledger.pending == 0


def test_a_surplus_broken_by_one_reading_starts_its_ack_wait_again():
    """A moment where every in-flight job is held resets the count, so a race between two reads asks for nothing."""
    ledger, clock = make_ledger(ack_wait=30.0)
    ledger.workers_seen(0)
    ledger.depth_seen(Depth(pending=0, in_flight=1))
    clock.now += 15
    ledger.workers_seen(1)
    ledger.depth_seen(Depth(pending=0, in_flight=1))
    clock.now += 20
    ledger.workers_seen(0)
    ledger.depth_seen(Depth(pending=0, in_flight=1))
    assert ledger.pending == 0
    ledger.workers_seen(None)  # the endpoint cannot say: nothing is counted on a guess
    clock.now += 60
    ledger.depth_seen(Depth(pending=0, in_flight=1))
    assert ledger.pending == 0
