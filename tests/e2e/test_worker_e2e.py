"""The real worker process against the recording autoscaler: sessions, the control server, reports, stop.

Timing targets (ready time, open/close -> report latency) are measured by the
benchmark, not asserted here; these tests print what they measured, so
``pytest -s`` shows it.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from lib.standin.grants import GrantSigner
from lib.standin.process import free_port
from lib.standin.recorder import RecordingAutoscaler, serving
from tests.helpers import (
    Body,
    Encoded,
    FakeConsumer,
    RunningWorker,
    callbacks_for,
    deleted_entries,
    open_session,
    post,
    running_worker,
    status_of,
    wait_until,
)

MAX_LIFETIME = 600.0
STOP_DEADLINE = 10.0  # the target is 5 s; this bound only catches a hang


# -- helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forger() -> GrantSigner:
    """Signs grants with a key the recording autoscaler does not serve."""
    return GrantSigner()


def output_lines(worker: RunningWorker, pattern: str) -> list[str]:
    return [line for line in worker.process.output if re.search(pattern, line)]


async def wait_output(worker: RunningWorker, pattern: str, timeout: float = 10.0) -> list[str]:
    return [match.string for match in await worker.process.wait_for_line(pattern, timeout)]


async def stop(worker: RunningWorker, signum: int = signal.SIGTERM) -> tuple[int, float]:
    """Signals the worker and waits for it to exit; returns (exit code, seconds taken)."""
    started = time.monotonic()
    worker.process.send_signal(signum)
    try:
        code = await worker.process.wait(STOP_DEADLINE)
    except asyncio.TimeoutError:
        raise AssertionError(f"still running {STOP_DEADLINE}s after signal {signum}; {worker.explain()}") from None
    return code, time.monotonic() - started


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port``, read from the kernel's tables."""
    found: set[str] = set()
    for table, _width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                address, port_hex = local.split(":")
                if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


# -- 4. the loopback control server --------------------------------------------------


@pytest.mark.asyncio(loop_scope="class")
class TestControlServer:
    """On one worker, each test leaving it as it found it: the control routes."""

    async def test_control_server_is_bound_to_loopback_only(self, free: Shared):
        """The control port listens on 127.0.0.1 alone, where the public port listens on every interface."""
        worker = free.worker
        assert listening_addresses(worker.ports.control) == {"127.0.0.1"}, worker.explain()
        assert listening_addresses(worker.ports.worker) & {"0.0.0.0", "::"}, worker.explain()

    async def test_release_ends_the_held_session_and_delivers_its_callback(self, free: Shared):
        """/release ends the session: 200 released true with its id, the
        on-close callback arrives, delete_requests says success."""
        worker, http = free.worker, free.http
        autoscaler = worker.autoscaler
        body = worker.create_body()
        session_id = await open_session(http, worker, body)
        status, answer = await post(http, worker.control + "/release")
        assert (status, answer) == (200, {"released": True, "session_ids": [session_id]}), worker.explain()
        callback = await autoscaler.wait_for(
            lambda: callbacks_for(autoscaler, session_id), message="the on-close callback"
        )
        assert callback[0].body == {"job": "job-1", "session_id": session_id}
        request_idx = body["auth_data"]["request_idx"]
        entries = await autoscaler.wait_for(
            lambda: deleted_entries(autoscaler, request_idx),
            message=f"delete_requests for {request_idx}; {worker.explain()}",
        )
        assert [entry["success"] for entry in entries] == [True], entries
        assert (await status_of(http, worker))["session"] is None

    async def test_release_with_nothing_held_answers_released_false(self, free: Shared):
        """/release with no session held is a 200 no-op saying there was no active session."""
        worker, http = free.worker, free.http
        for _ in range(2):
            status, answer = await post(http, worker.control + "/release")
            assert (status, answer) == (200, {"released": False, "reason": "no active session"}), worker.explain()

    async def test_status_shows_readiness_and_the_held_session(self, free: Shared):
        """/status says ready and null when free, and the held session's id, cost, created_at, expires_in and
        payload."""
        worker, http = free.worker, free.http
        unheld = await status_of(http, worker)
        assert unheld["ready"] is True and unheld["session"] is None, unheld
        before = time.time()
        session_id = await open_session(http, worker, worker.create_body(lifetime=60))
        after = time.time()
        held = (await status_of(http, worker))["session"]
        assert held is not None, worker.explain()
        assert held["session_id"] == session_id
        assert held["cost"] == 100.0
        assert before - 1 <= held["created_at"] <= after + 1
        assert 50 < held["expires_in"] <= 60
        assert held["on_close_payload"] == {"job": "job-1"}
        await post(http, worker.control + "/release")
        assert (await status_of(http, worker))["session"] is None

    async def test_extend_with_nothing_held_is_409(self, free: Shared):
        """/extend with no session held answers 409 with an error."""
        worker, http = free.worker, free.http
        status, answer = await post(http, worker.control + "/extend", {"seconds": 5})
        assert status == 409 and isinstance(answer.get("error"), str), (status, answer, worker.explain())


async def test_two_concurrent_releases_release_the_session_once(start_worker, http, autoscaler):
    """Two /release calls at once: exactly one says released true, and the callback is delivered once."""
    worker = await start_worker()
    session_id = await open_session(http, worker)
    answers = await asyncio.gather(post(http, worker.control + "/release"), post(http, worker.control + "/release"))
    assert sorted(answers, key=lambda a: not a[1]["released"]) == [
        (200, {"released": True, "session_ids": [session_id]}),
        (200, {"released": False, "reason": "no active session"}),
    ], worker.explain()
    # A stopped worker has delivered every callback it was going to send.
    code, _ = await stop(worker)
    assert code == 0, worker.explain()
    assert len(callbacks_for(autoscaler, session_id)) == 1, autoscaler.callbacks


async def test_health_stub_answers_200_and_warns_without_backend_health_url(start_worker, http):
    """Without BACKEND_HEALTH_URL the control /health is a 200 stub and a WARNING says it cannot see a dead consumer."""
    worker = await start_worker()
    async with http.get(worker.control + "/health") as resp:
        assert resp.status == 200, worker.explain()
    assert output_lines(worker, r"WARNING.*BACKEND_HEALTH_URL is unset"), worker.explain()


async def test_health_stub_is_absent_with_backend_health_url(start_worker, http):
    """With BACKEND_HEALTH_URL set the control /health is a 404 and the framework checks the consumer instead."""
    consumer = FakeConsumer()
    async with serving(consumer.app()) as consumer_url:
        worker = await start_worker({"BACKEND_HEALTH_URL": consumer_url + "/health"})
        async with http.get(worker.control + "/health") as resp:
            assert resp.status == 404, worker.explain()
        assert consumer.checks >= 1, worker.explain()
        assert not output_lines(worker, r"BACKEND_HEALTH_URL is unset"), worker.explain()


async def test_extend_renews_the_lease_to_now_plus_seconds_capped(start_worker, http, autoscaler):
    """/extend sets the lease to now + seconds (default the lifetime,
    capped at NULL_MAX_LIFETIME); a short one lapses."""
    worker = await start_worker({"NULL_MAX_LIFETIME": "120"})
    session_id = await open_session(http, worker, worker.create_body(lifetime=60))

    async def extend(body: Body | None) -> float:
        status, answer = await post(http, worker.control + "/extend", body)
        assert status == 200, f"{answer}; {worker.explain()}"
        assert answer["extended"] is True and answer["session_id"] == session_id, answer
        return answer["expires_in"]

    async def expires_in() -> float:
        return (await status_of(http, worker))["session"]["expires_in"]

    assert await extend({"seconds": 5}) == 5
    assert 2 < await expires_in() <= 5
    assert await extend(None) == 60
    assert 50 < await expires_in() <= 60
    assert await extend({"seconds": None}) == 60
    assert await extend({"seconds": 10**6}) == 120
    assert 110 < await expires_in() <= 120
    # A consumer that stops extending lets the lease lapse.
    since = time.time()
    assert await extend({"seconds": 0.5}) == 0.5
    await autoscaler.wait_for(
        lambda: callbacks_for(autoscaler, session_id), message=f"the lapse callback; {worker.explain()}"
    )
    await worker.wait_report(lambda report: report["cur_load"] == 0.0, since=since, message="the lapse")


# -- 5. signed creation --------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="class")
class TestSignedCreation:
    """On one worker, each test leaving it as it found it: grants, session auth, contention, /ping."""

    async def test_forged_signature_is_refused_and_holds_no_slot(self, free: Shared, forger):
        """A grant signed with another key gets 401 {"error"}, holds no slot, and a valid create right after gets
        201."""
        worker, http = free.worker, free.http
        body = worker.create_body()
        body["auth_data"] = forger.grant(worker.url)
        status, answer = await post(http, worker.url + "/session/create", body)
        assert status == 401 and isinstance(answer.get("error"), str), (status, answer, worker.explain())
        assert (await status_of(http, worker))["session"] is None
        await open_session(http, worker)

    async def test_grant_for_another_worker_is_refused_and_logged_with_both_urls(self, free: Shared):
        """A validly signed grant for another worker's URL gets 401, and the log names both URLs."""
        worker, http = free.worker, free.http
        other_url = f"http://127.0.0.1:{free_port()}"
        body = worker.create_body()
        body["auth_data"] = worker.autoscaler.grant(other_url)
        status, answer = await post(http, worker.url + "/session/create", body)
        assert status == 401 and isinstance(answer.get("error"), str), (status, answer, worker.explain())
        line = (await wait_output(worker, re.escape(other_url)))[0]
        assert worker.url in line, worker.explain()
        assert (await status_of(http, worker))["session"] is None
        await open_session(http, worker)

    async def test_session_end_with_wrong_auth_is_refused_and_the_session_stays_held(self, free: Shared):
        """/session/end with another grant as session_auth is 401 and keeps the session; with its own grant it ends
        it."""
        worker, http = free.worker, free.http
        autoscaler = worker.autoscaler
        body = worker.create_body()
        session_id = await open_session(http, worker, body)
        wrong = {"session_id": session_id, "session_auth": worker.grant()}
        for url in (worker.url, f"http://127.0.0.1:{worker.ports.http}"):
            status, answer = await post(http, url + "/session/end", wrong)
            assert status == 401 and isinstance(answer.get("error"), str), (url, status, answer, worker.explain())
            assert (await status_of(http, worker))["session"]["session_id"] == session_id
        for route in ("/session/get", "/session/health"):
            status, answer = await post(http, worker.url + route, wrong)
            assert status == 401 and isinstance(answer.get("error"), str), (route, status, answer, worker.explain())
        right = {"session_id": session_id, "session_auth": body["auth_data"]}
        status, answer = await post(http, worker.url + "/session/get", right)
        assert status == 200 and answer["session_id"] == session_id and answer["auth_data"] == body["auth_data"], (
            status,
            answer,
        )
        assert await post(http, worker.url + "/session/health", right) == (200, {"ok": True})
        since = time.time()
        status, answer = await post(http, worker.url + "/session/end", right)
        assert (status, answer) == (200, {"ended": True, "removed_session": session_id}), worker.explain()
        report = await worker.wait_report(lambda r: r["cur_load"] == 0.0, since=since, message="the end of the session")
        print(f"/session/end -> cur_load 0 report in {(report.at - since) * 1000:.1f} ms")
        await autoscaler.wait_for(lambda: callbacks_for(autoscaler, session_id), message="the on-close callback")
        assert await post(http, worker.url + "/session/health", right) == (200, {"ok": False})
        status, answer = await post(http, worker.url + "/session/end", right)
        assert status == 410 and isinstance(answer.get("error"), str), (status, answer, worker.explain())

    async def test_two_hundred_concurrent_creates_give_exactly_one_session(self, free: Shared):
        """200 creates with valid grants at once: exactly one 201, every other one 429, no 5xx."""
        worker = free.worker
        bodies = [worker.create_body(on_close=False) for _ in range(200)]
        connector = aiohttp.TCPConnector(limit=400)
        since = time.time()
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            started = time.monotonic()
            answers = await asyncio.gather(*(post(http, worker.url + "/session/create", body) for body in bodies))
            took = time.monotonic() - started
        statuses = [status for status, _ in answers]
        counts = {status: statuses.count(status) for status in sorted(set(statuses))}
        print(f"200 concurrent creates in {took:.2f}s: {counts}")
        assert counts == {201: 1, 429: 199}, f"{counts}; {worker.explain()}"
        refused = [answer for status, answer in answers if status == 429]
        assert all(isinstance(answer, dict) and "error" in answer for answer in refused), refused[:3]
        await worker.wait_report(lambda r: r["cur_load"] == 100.0, since=since, message="the one open session")
        assert max(r["cur_load"] for r in worker.reports(since=since)) == 100.0, worker.explain()

    async def test_ping_with_session_id_renews_the_lease_to_now_plus_lifetime(self, free: Shared):
        """POST /ping with the session's grant and id renews its lease to now + lifetime (not added on top)."""
        worker, http = free.worker, free.http
        body = worker.create_body(lifetime=30)
        session_id = await open_session(http, worker, body)
        status, _ = await post(http, worker.control + "/extend", {"seconds": 2})
        assert status == 200
        for _ in range(3):
            status, answer = await post(
                http, worker.url + "/ping", {"auth_data": body["auth_data"], "payload": {}, "session_id": session_id}
            )
            assert status == 200, f"{answer}; {worker.explain()}"
            assert answer["session_id"] == session_id and answer["expires_in"] == 30, answer
        assert 25 < (await status_of(http, worker))["session"]["expires_in"] <= 30
        status, answer = await post(
            http, worker.url + "/ping", {"auth_data": worker.grant(), "payload": {}, "session_id": session_id}
        )
        assert status == 401, (status, answer, worker.explain())
        status, answer = await post(
            http, worker.url + "/ping", {"auth_data": body["auth_data"], "payload": {}, "session_id": "gone"}
        )
        assert status == 410, (status, answer, worker.explain())
        status, answer = await post(http, worker.url + "/ping", {"auth_data": worker.grant(), "payload": {}})
        assert (status, answer.get("ok")) == (200, True), (status, answer, worker.explain())

    async def test_ping_keeps_a_session_alive_past_its_lifetime(self, free: Shared):
        """A session renewed by /ping every quarter second stays held well past its 1-second lifetime."""
        worker, http = free.worker, free.http
        body = worker.create_body(lifetime=1)
        created = time.time()
        session_id = await open_session(http, worker, body)
        ping = {"auth_data": body["auth_data"], "payload": {}, "session_id": session_id}
        while time.time() < created + 1.75:
            status, answer = await post(http, worker.url + "/ping", ping)
            assert status == 200, f"session lost at {time.time() - created:.1f}s: {answer}; {worker.explain()}"
            await asyncio.sleep(0.25)  # pacing the keep-alive, not waiting for an event
        assert (await status_of(http, worker))["session"]["session_id"] == session_id, worker.explain()
        assert all(r["cur_load"] == 100.0 for r in worker.reports(since=created + 0.5)), worker.explain()
        assert not callbacks_for(worker.autoscaler, session_id), worker.explain()


async def test_unsecured_worker_accepts_an_unsigned_grant(start_worker, http):
    """With UNSECURED=true a grant without url or signature opens a session."""
    worker = await start_worker({"UNSECURED": "true"})
    body = worker.create_body()
    body["auth_data"] = {"cost": 100.0, "request_idx": 1, "reqnum": 1}
    await open_session(http, worker, body)


# -- 6. prompt occupancy signal ------------------------------------------------------


@pytest.mark.asyncio(loop_scope="class")
class TestOccupancySignal:
    """On one worker, each test leaving it as it found it: what the reports say."""

    async def test_session_open_and_release_are_reported(self, free: Shared):
        """After a 201 a report with cur_load 100.0 arrives, and after /release one with cur_load 0.0."""
        worker, http = free.worker, free.http
        opened_at = time.time()
        await open_session(http, worker)
        opened = await worker.wait_report(lambda r: r["cur_load"] == 100.0, since=opened_at, message="the open session")
        released_at = time.time()
        status, answer = await post(http, worker.control + "/release")
        assert answer["released"] is True, worker.explain()
        released = await worker.wait_report(lambda r: r["cur_load"] == 0.0, since=released_at, message="the release")
        print(
            f"create -> cur_load 100 report: {(opened.at - opened_at) * 1000:.1f} ms; "
            f"/release -> cur_load 0 report: {(released.at - released_at) * 1000:.1f} ms"
        )
        assert opened.body["max_perf"] == released.body["max_perf"] == 100.0

    async def test_lapsed_lease_frees_the_worker(self, free: Shared):
        """A session created with lifetime 1 and never renewed ends: cur_load
        0 report, callback, then a new create succeeds."""
        worker, http = free.worker, free.http
        autoscaler = worker.autoscaler
        opened_at = time.time()
        session_id = await open_session(http, worker, worker.create_body(lifetime=1))
        await worker.wait_report(lambda r: r["cur_load"] == 100.0, since=opened_at, message="the open session")
        callback = (
            await autoscaler.wait_for(
                lambda: callbacks_for(autoscaler, session_id), 10, f"the expiry callback; {worker.explain()}"
            )
        )[0]
        report = await worker.wait_report(lambda r: r["cur_load"] == 0.0, since=opened_at, message="the expiry")
        print(
            f"lifetime 1 s: callback after {callback.at - opened_at:.2f}s, "
            f"cur_load 0 report after {report.at - opened_at:.2f}s"
        )
        assert output_lines(worker, rf"INFO.*session {session_id} expired"), worker.explain()
        await open_session(http, worker)


# -- 7. graceful stop ----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_ends_the_held_session_and_exits_0(start_worker, http, autoscaler, signum):
    """SIGTERM or SIGINT with a session held: the callback is delivered, a
    final cur_load 0 report arrives, exit code 0."""
    worker = await start_worker()
    body = worker.create_body()
    session_id = await open_session(http, worker, body)
    await worker.wait_report(lambda r: r["cur_load"] == 100.0, message="the open session")
    since = time.time()
    code, took = await stop(worker, signum)
    print(f"{signal.Signals(signum).name} -> exit {code} in {took:.2f}s")
    assert code == 0, worker.explain()
    assert callbacks_for(autoscaler, session_id), f"no on-close callback; {worker.explain()}"
    assert [r for r in worker.reports(since=since) if r["cur_load"] == 0.0], (
        f"no final cur_load 0 report; {worker.explain()}"
    )
    assert [e["success"] for e in deleted_entries(autoscaler, body["auth_data"]["request_idx"])] == [True], (
        worker.explain()
    )


@pytest.mark.slow
async def test_stop_signal_exits_0_in_time_when_the_callback_target_hangs(start_worker, http, autoscaler):
    """SIGTERM with a session whose on-close target does not answer still
    exits 0 promptly and warns what was not delivered."""
    worker = await start_worker()
    autoscaler.callback_delay = 4.0  # longer than the worker's 3.5 s stop grace, short enough for the fake's teardown
    await open_session(http, worker)
    code, took = await stop(worker)
    print(f"SIGTERM with a hanging callback target -> exit {code} in {took:.2f}s")
    assert code == 0, worker.explain()
    assert output_lines(worker, r"WARNING .*on-close callback was delivered"), worker.explain()


# -- 9. logs -------------------------------------------------------------------------


async def test_each_state_change_logs_one_info_line_and_no_status_dump(start_worker, http, autoscaler, forger):
    """Ready, opened, released, expired and refused each log one INFO line;
    the framework's status dump stays out at INFO."""
    worker = await start_worker()
    released_id = await open_session(http, worker, worker.create_body(lifetime=60))
    await post(http, worker.control + "/release")
    expired_id = await open_session(http, worker, worker.create_body(lifetime=0.5))
    await autoscaler.wait_for(lambda: callbacks_for(autoscaler, expired_id), message=f"the expiry; {worker.explain()}")
    forged = worker.create_body()
    forged["auth_data"] = forger.grant(worker.url)
    await post(http, worker.url + "/session/create", forged)
    code, _ = await stop(worker)  # all output is read once the process has exited
    assert code == 0, worker.explain()

    def one(pattern: str) -> None:
        found = output_lines(worker, pattern)
        assert len(found) == 1, f"{len(found)} lines match {pattern!r}; {worker.explain()}"

    one(r"INFO .*ready in")
    one(rf"INFO .*session {released_id} opened: cost 100, lifetime 60s")
    one(rf"INFO .*session {released_id} released by consumer \(/release\) after \d")
    one(rf"INFO .*session {expired_id} opened: cost 100, lifetime 0.5s")
    one(rf"INFO .*session {expired_id} expired after \d")
    one(r"INFO .*refused /session/create \(401\): signature")
    assert not output_lines(worker, r"Worker Status"), worker.explain()
    assert not output_lines(worker, r"\bDEBUG\b"), worker.explain()


# -- a dying consumer, an unreachable public key (slow: the framework's own timers) --


@pytest.mark.slow
async def test_dying_consumer_behind_backend_health_url_makes_the_worker_report_an_error(start_worker, http):
    """The worker gets ready only once the consumer's health answers 200,
    and reports an error once it stops answering."""
    consumer = FakeConsumer(healthy=False)
    async with serving(consumer.app()) as consumer_url:
        worker = await start_worker({"BACKEND_HEALTH_URL": consumer_url + "/health"}, ready=False)
        await wait_until(lambda: consumer.checks >= 1, 15, "the first health check", worker.explain)
        assert (await status_of(http, worker))["ready"] is False
        assert not [r for r in worker.reports() if r["max_perf"] == 100.0], (
            f"ready before a healthy check; {worker.explain()}"
        )
        status, answer = await post(http, worker.url + "/session/create", worker.create_body())
        assert status == 429 and isinstance(answer.get("error"), str), (status, answer, worker.explain())
        assert (await status_of(http, worker))["session"] is None
        consumer.healthy = True
        ready = await worker.wait_ready(timeout=25)
        print(f"ready {ready.at - worker.started_at:.1f}s after start, after {consumer.checks} health checks")
        died_at = time.time()
        consumer.healthy = False
        errored = await worker.wait_report(
            lambda r: bool(r["error_msg"]), since=died_at, timeout=25, message="the error report"
        )
        print(f"dead consumer reported after {errored.at - died_at:.1f}s: {errored.body['error_msg']!r}")
        assert errored.body["error_msg"].startswith(f"consumer health check {consumer_url}/health failed"), errored.body
        assert (await status_of(http, worker))["ready"] is False


@pytest.mark.slow
async def test_unreachable_public_key_is_reported_as_an_error(start_worker, http, autoscaler):
    """When /pubkey/ keeps failing the worker reports an error_msg naming the
    public key, never goes ready, and takes no session."""
    autoscaler.pubkey_status = 500
    worker = await start_worker(ready=False)
    # The framework gives up after five attempts (about 15 s); the worker then names where it looked.
    where = f"{autoscaler.url}/pubkey/"
    errored = await worker.wait_report(
        lambda r: "public key" in r["error_msg"] and where in r["error_msg"], timeout=60, message="the public key error"
    )
    print(f"public key error reported {errored.at - worker.started_at:.1f}s after start: {errored.body['error_msg']!r}")
    status, answer = await post(http, worker.url + "/session/create", worker.create_body())
    assert 400 <= status < 500, (status, answer, worker.explain())
    assert not [r for r in worker.reports() if r["max_perf"] == 100.0], f"went ready without a key; {worker.explain()}"
    # The control server stays up so the consumer can see why.
    shown = await status_of(http, worker)
    assert shown["ready"] is False and where in (shown["error"] or ""), (shown, worker.explain())


# -- 5. malformed bodies, one shared worker for the whole corpus ----------------------

PAYLOAD = {"lifetime": 60, "on_close_route": None, "on_close_payload": None}
PLACEHOLDER = '"@@raw@@"'
OVERSIZED = b'{"pad": "' + b"x" * (2 << 20) + b'"}'
DEEPLY_NESTED = b"[" * 100_000 + b"]" * 100_000

UNDECODABLE = (400, 415, 422)

Builder = Callable[[dict[str, Any]], Body]


def auth_with(**changes: Any) -> Builder:
    return lambda grant: {"auth_data": {**grant, **changes}, "payload": dict(PAYLOAD)}


def auth_without(name: str) -> Builder:
    return lambda grant: {"auth_data": {k: v for k, v in grant.items() if k != name}, "payload": dict(PAYLOAD)}


def payload_with(**changes: Any) -> Builder:
    return lambda grant: {"auth_data": grant, "payload": {**PAYLOAD, **changes}}


def fields(**values: Any) -> Builder:
    return lambda grant: {"auth_data": grant, **values}


def raw(where: str, text: str) -> Builder:
    """A body whose ``where`` (cost or lifetime) is JSON text json.dumps cannot write (NaN, 1e999)."""

    def build(grant: dict[str, Any]) -> bytes:
        value = {"auth_data": dict(grant), "payload": dict(PAYLOAD)}
        (value["auth_data"] if where == "cost" else value["payload"])[where] = "@@raw@@"
        return json.dumps(value).replace(PLACEHOLDER, text).encode()

    return build


def constant(value: Body) -> Builder:
    return lambda grant: value


# Bodies no route may answer with a 5xx; the expected status is for /session/create.
ANY_ROUTE = [
    ("body-not-json", constant(b"{not json"), 422),
    ("body-empty", constant(b""), 422),
    ("body-invalid-utf8", constant(b'{"auth_data": "\xff\xfe"}'), 422),
    ("body-utf16-object", constant(b"\xff\xfe{\x00}\x00"), 422),
    ("body-json-array", constant(b"[]"), 422),
    ("body-json-null", constant(b"null"), 422),
    ("body-json-number", constant(b"42"), 422),
    ("body-json-string", constant(b'"session"'), 422),
    ("body-NaN", constant(b"NaN"), 422),
    ("body-deeply-nested", constant(DEEPLY_NESTED), 422),
    ("body-oversized", constant(OVERSIZED), 413),
    ("body-gzip-oversized", constant(Encoded(gzip.compress(OVERSIZED), "gzip")), 413),
    # A body that does not decode as its Content-Encoding says is the client's mistake: some 4xx.
    ("body-gzip-garbage", constant(Encoded(b"not gzip at all", "gzip")), UNDECODABLE),
    ("body-deflate-garbage", constant(Encoded(b"not deflate at all", "deflate")), UNDECODABLE),
]

CREATE = ANY_ROUTE + [
    ("auth_data-missing", lambda grant: {"payload": dict(PAYLOAD)}, 422),
    ("auth_data-null", fields(auth_data=None, payload=dict(PAYLOAD)), 422),
    ("auth_data-string", fields(auth_data="grant", payload=dict(PAYLOAD)), 422),
    ("auth_data-list", lambda grant: {"auth_data": [grant], "payload": dict(PAYLOAD)}, 422),
    ("cost-missing", auth_without("cost"), 422),
    ("cost-null", auth_with(cost=None), 422),
    ("cost-string", auth_with(cost="100"), 422),
    ("cost-true", auth_with(cost=True), 422),
    ("cost-negative", auth_with(cost=-1), 422),
    ("cost-NaN", raw("cost", "NaN"), 422),
    ("cost-Infinity", raw("cost", "Infinity"), 422),
    ("cost-1e999", raw("cost", "1e999"), 422),
    ("cost-huge-int", auth_with(cost=10**400), 422),
    ("cost-object", auth_with(cost={"value": 100}), 422),
    ("request_idx-string", auth_with(request_idx="7"), 422),
    ("reqnum-float", auth_with(reqnum=1.5), 422),
    ("payload-missing", lambda grant: {"auth_data": grant}, 422),
    ("payload-null", fields(payload=None), 422),
    ("payload-list", fields(payload=[PAYLOAD]), 422),
    ("payload-string", fields(payload="lifetime=60"), 422),
    ("lifetime-zero", payload_with(lifetime=0), 422),
    ("lifetime-negative", payload_with(lifetime=-5), 422),
    ("lifetime-string", payload_with(lifetime="60"), 422),
    ("lifetime-true", payload_with(lifetime=True), 422),
    ("lifetime-null", payload_with(lifetime=None), 422),
    ("lifetime-above-cap", payload_with(lifetime=MAX_LIFETIME + 1), 422),
    ("lifetime-Infinity", raw("lifetime", "Infinity"), 422),
    ("lifetime-NaN", raw("lifetime", "NaN"), 422),
    ("lifetime-1e999", raw("lifetime", "1e999"), 422),
    ("on_close_route-ftp", payload_with(on_close_route="ftp://x"), 422),
    ("on_close_route-not-a-url", payload_with(on_close_route="not a url"), 422),
    ("on_close_route-number", payload_with(on_close_route=5), 422),
    ("on_close_route-no-host", payload_with(on_close_route="http://"), 422),
    ("on_close_route-bad-port", payload_with(on_close_route="http://127.0.0.1:99999/x"), 422),
    ("on_close_route-object", payload_with(on_close_route={"url": "http://x"}), 422),
]

SESSION_NAMED = ANY_ROUTE + [
    ("session_id-missing", lambda grant: {"session_auth": grant}, 422),
    ("session_id-null", lambda grant: {"session_id": None, "session_auth": grant}, 422),
    ("session_id-number", lambda grant: {"session_id": 5, "session_auth": grant}, 422),
    ("session_id-empty", lambda grant: {"session_id": "", "session_auth": grant}, 422),
    ("session_id-list", lambda grant: {"session_id": ["a"], "session_auth": grant}, 422),
    ("session_auth-missing", constant({"session_id": "abc"}), 422),
    ("session_auth-string", constant({"session_id": "abc", "session_auth": "grant"}), 422),
    ("session_auth-list", lambda grant: {"session_id": "abc", "session_auth": [grant]}, 422),
]

PING = ANY_ROUTE + [
    ("auth_data-missing", constant({"payload": {}}), 422),
    ("auth_data-string", constant({"auth_data": "grant", "payload": {}}), 422),
    ("payload-missing", lambda grant: {"auth_data": grant}, 422),
    ("payload-list", lambda grant: {"auth_data": grant, "payload": []}, 422),
    ("session_id-number", lambda grant: {"auth_data": grant, "payload": {}, "session_id": 5}, 422),
    ("session_id-empty", lambda grant: {"auth_data": grant, "payload": {}, "session_id": ""}, 422),
    ("unsigned", constant({"auth_data": {"cost": 1}, "payload": {}}), 401),
    ("unknown-session", lambda grant: {"auth_data": grant, "payload": {}, "session_id": "nope"}, 410),
]

EXTEND = [
    ("seconds-zero", constant({"seconds": 0}), 422),
    ("seconds-negative", constant({"seconds": -1}), 422),
    ("seconds-string", constant({"seconds": "10"}), 422),
    ("seconds-true", constant({"seconds": True}), 422),
    ("seconds-list", constant({"seconds": [10]}), 422),
    ("seconds-NaN", constant(b'{"seconds": NaN}'), 422),
    ("seconds-Infinity", constant(b'{"seconds": Infinity}'), 422),
    ("seconds-1e999", constant(b'{"seconds": 1e999}'), 422),
    ("body-json-array", constant(b"[10]"), 422),
    ("body-json-number", constant(b"10"), 422),
    ("body-not-json", constant(b"seconds=10"), 422),
    ("body-invalid-utf8", constant(b'{"seconds": "\xff"}'), 422),
    ("body-gzip-garbage", constant(Encoded(b"not gzip at all", "gzip")), UNDECODABLE),
]


def statuses(expected: int | tuple[int, ...]) -> tuple[int, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def cases(routes: list[str], corpus) -> list[Any]:
    return [pytest.param(route, build, id=f"{route}:{case_id}") for route in routes for case_id, build, *_ in corpus]


@dataclass
class Shared:
    worker: RunningWorker
    http: aiohttp.ClientSession


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared(signer, tmp_path_factory) -> AsyncIterator[Shared]:
    """One worker with its own recording autoscaler and client, for a whole test class.

    The classes of tests that leave the worker as they found it use it, and
    the malformed-body corpus; ``free`` releases whatever a failed test held.
    """
    autoscaler = RecordingAutoscaler(signer)
    async with serving(autoscaler.app()) as url:
        autoscaler.url = url
        extra = {"NULL_MAX_LIFETIME": str(MAX_LIFETIME)}
        root = tmp_path_factory.mktemp("shared-worker")
        async with running_worker(autoscaler, root, extra, container_id=9001) as worker:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                yield Shared(worker, http)


@pytest_asyncio.fixture(loop_scope="class")
async def free(shared: Shared) -> Shared:
    """The shared worker with nothing held, whatever an earlier case did."""
    assert shared.worker.process.running, shared.worker.explain()
    await post(shared.http, shared.worker.control + "/release")
    return shared


@pytest.mark.asyncio(loop_scope="class")
class TestMalformedBodies:
    """One worker answers the whole corpus: each case starts with nothing held and must leave nothing held."""

    @pytest.mark.parametrize("build, expected", [pytest.param(b, statuses(e), id=i) for i, b, e in CREATE])
    async def test_malformed_create_is_refused_and_holds_no_slot(
        self, free: Shared, build: Builder, expected: tuple[int, ...]
    ):
        """A malformed /session/create gets its 4xx with {"error"}, no slot is
        held, and a valid create right after gets 201."""
        worker, http = free.worker, free.http
        status, answer = await post(http, worker.url + "/session/create", build(worker.grant()))
        assert status in expected, f"answered {status} {str(answer)[:300]}, expected {expected}; {worker.explain()}"
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), str(answer)[:300]
        assert (await status_of(http, worker))["session"] is None, worker.explain()
        await open_session(http, worker, worker.create_body(on_close=False))

    @pytest.mark.parametrize(
        "route, build",
        cases(["/session/end", "/session/get", "/session/health"], SESSION_NAMED) + cases(["/ping"], PING),
    )
    async def test_malformed_body_on_a_framework_route_is_a_4xx(self, free: Shared, route: str, build: Builder):
        """Bad input to /session/end, /session/get, /session/health and /ping is a 4xx with {"error"}, never a 5xx."""
        worker, http = free.worker, free.http
        status, answer = await post(http, worker.url + route, build(worker.grant()))
        assert 400 <= status < 500, f"{route} answered {status} {str(answer)[:300]}; {worker.explain()}"
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), str(answer)[:300]
        assert (await status_of(http, worker))["session"] is None, worker.explain()

    @pytest.mark.parametrize("build, expected", [pytest.param(b, statuses(e), id=i) for i, b, e in EXTEND])
    async def test_extend_with_bad_seconds_or_body_is_refused(
        self, free: Shared, build: Builder, expected: tuple[int, ...]
    ):
        """/extend with seconds that are not a finite number > 0, or a body
        that is not a JSON object, is a 422 with {"error"}."""
        worker, http = free.worker, free.http
        status, answer = await post(http, worker.control + "/extend", build(worker.grant()))
        assert status in expected, f"answered {status} {str(answer)[:300]}, expected {expected}; {worker.explain()}"
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), str(answer)[:300]

    async def test_pyworker_update_without_master_token_is_403(self, free: Shared):
        """With no MASTER_TOKEN set, /pyworker/update is refused (403) even with an empty token."""
        worker, http = free.worker, free.http
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": ""}):
            async with http.post(worker.url + "/pyworker/update", headers=headers) as resp:
                assert resp.status == 403, (headers, resp.status, await resp.text(), worker.explain())
