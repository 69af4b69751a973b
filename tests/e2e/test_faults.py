"""Faults around the worker, each with the outcome users rely on.

Covered in tests/e2e/test_worker_e2e.py and not repeated here: an unreachable
public key at start (test_unreachable_public_key_is_reported_as_an_error), a
consumer whose health check starts failing
(test_dying_consumer_behind_backend_health_url_makes_the_worker_report_an_error)
and a plain lease lapse (test_lapsed_lease_frees_the_worker).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lib.standin.process import free_port
from lib.standin.recorder import Received, RecordingAutoscaler, serving
from tests.helpers import FakeConsumer, callbacks_for, deleted_entries, open_session, post

HEALTHCHECK_PERIOD = 10.0  # the framework checks BACKEND_HEALTH_URL this often
REPORT_ATTEMPTS = 3  # the framework's tries per report, 2 s apart


@dataclass
class FlakyAutoscaler(RecordingAutoscaler):
    """The recording autoscaler, also noting each report it turned away."""

    refused: list[Received] = field(default_factory=list)

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def note_refusals(request: web.Request, handler: Any) -> web.StreamResponse:
            response = await handler(request)
            if request.path == "/worker_status/" and response.status != 200:
                await self._note(self.refused, {"status": response.status})
            return response

        app.middlewares.append(note_refusals)
        return app


@pytest.fixture
async def autoscaler(signer) -> AsyncIterator[FlakyAutoscaler]:
    recorder = FlakyAutoscaler(signer)
    async with serving(recorder.app()) as url:
        recorder.url = url
        yield recorder


async def release(http: aiohttp.ClientSession, worker) -> dict[str, Any]:
    status, answer = await post(http, worker.control + "/release")
    assert status == 200, (status, answer, worker.explain())
    return answer


# -- the autoscaler's report endpoint down, then back ------------------------------------


@pytest.mark.slow
async def test_worker_keeps_serving_while_reports_fail_and_reports_the_true_state_once_they_succeed(
    start_worker, http, autoscaler
):
    """With /worker_status/ answering 503 the worker still opens and releases sessions; once it
    answers again the reports carry the session actually held, then its release.

    The issue's outage is 30 s; this one lasts until the worker has given up a
    whole report (3 attempts, 2 s apart, about 6 s). A longer outage repeats
    that same give-up-and-retry cycle, so it shows nothing more.
    """
    worker = await start_worker()
    autoscaler.report_status = 503
    down_at = time.time()

    first = worker.create_body()
    await open_session(http, worker, first)
    assert (await release(http, worker))["released"] is True
    held_body = worker.create_body()
    held = await open_session(http, worker, held_body)
    held_at = time.time()
    status = await (await http.get(worker.control + "/status")).json()
    assert status["session"]["session_id"] == held, status

    await autoscaler.wait_for(
        lambda: len([r for r in autoscaler.refused if r.at >= held_at]) >= REPORT_ATTEMPTS,
        timeout=30,
        message=f"{REPORT_ATTEMPTS} refused report attempts after the session opened\n{worker.explain()}",
    )
    assert not worker.reports(since=held_at), "a report got through while /worker_status/ answered 503"
    autoscaler.report_status = 200
    back_at = time.time()
    print(f"/worker_status/ down for {back_at - down_at:.1f}s, {len(autoscaler.refused)} report attempts refused")

    resumed = await worker.wait_report(
        lambda r: r["cur_load"] == 100.0, since=back_at, timeout=15, message="a report of the held session"
    )
    print(
        f"reports resumed {resumed.at - back_at:.1f}s after the endpoint came back: cur_load {resumed.body['cur_load']}"
    )
    latest = worker.reports(since=back_at)[-1]
    assert latest["cur_load"] == 100.0 and latest["working_request_idxs"] == [held_body["auth_data"]["request_idx"]], (
        latest
    )

    released_at = time.time()
    assert (await release(http, worker))["session_ids"] == [held]
    await worker.wait_report(
        lambda r: r["cur_load"] == 0.0, since=released_at, timeout=10, message="the release report"
    )
    for body in (first, held_body):
        idx = body["auth_data"]["request_idx"]
        await autoscaler.wait_for(
            lambda idx=idx: deleted_entries(autoscaler, idx), timeout=10, message=f"request {idx} in /delete_requests/"
        )
        assert [e["success"] for e in deleted_entries(autoscaler, idx)] == [True]
    assert not [r for r in worker.reports() if r["error_msg"]], worker.explain()


# -- the consumer's health endpoint dies ---------------------------------------------------


@pytest.mark.slow
async def test_consumer_gone_is_reported_as_an_error_within_one_healthcheck_period(start_worker, http):
    """When the consumer behind BACKEND_HEALTH_URL disappears (its port closed), the
    worker reports an error within one 10 s health-check period."""
    consumer = FakeConsumer()
    async with serving(consumer.app()) as consumer_url:
        worker = await start_worker({"BACKEND_HEALTH_URL": consumer_url + "/health"})
        checks = consumer.checks
    gone_at = time.time()  # the consumer's server is closed: connections are refused
    errored = await worker.wait_report(
        lambda r: bool(r["error_msg"]),
        since=gone_at,
        timeout=HEALTHCHECK_PERIOD + 5,
        message="the error report after the consumer went away",
    )
    took = errored.at - gone_at
    print(
        f"consumer gone after {checks} health check(s); error reported {took:.1f}s later: {errored.body['error_msg']!r}"
    )
    assert took <= HEALTHCHECK_PERIOD + 5, worker.explain()
    status = await (await http.get(worker.control + "/status")).json()
    assert status["ready"] is False and status["error"], status
    assert worker.process.running, worker.explain()


# -- the dispatcher dies holding a session -------------------------------------------------


async def test_dispatcher_dying_mid_create_never_leaks_the_worker(start_worker, http, autoscaler):
    """A dispatcher that sends a create and dies before reading the answer never learns the session id; whatever it
    opened lapses at its lifetime, is reported finished once, and the worker takes the next session."""
    worker = await start_worker()
    lifetime = 1.0
    body = worker.create_body(lifetime=lifetime)
    idx = body["auth_data"]["request_idx"]
    data = json.dumps(body).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", worker.ports.worker)
    writer.write(
        b"POST /session/create HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    sent_at = time.time()
    writer.close()  # the dispatcher dies: no answer is ever read
    await writer.wait_closed()

    # The worker may have opened the orphan or dropped it with the connection
    # (aiohttp cancels the handler); another dispatcher's create settles which.
    status, answer = await post(http, worker.url + "/session/create", worker.create_body())
    if status == 201:
        print("the orphaned create was dropped with its connection; the next dispatcher got the worker")
        assert (await release(http, worker))["session_ids"] == [answer["session_id"]]
        return
    assert status == 429, (status, answer, worker.explain())
    held = await (await http.get(worker.control + "/status")).json()
    assert held["session"] is not None and held["session"]["lifetime"] == lifetime, held
    free = await worker.wait_report(
        lambda r: r["cur_load"] == 0.0, since=time.time(), timeout=lifetime + 5, message="the orphan's lapse"
    )
    print(f"the orphaned session lapsed {free.at - sent_at:.2f}s after its create (lifetime {lifetime}s)")
    assert free.at - sent_at >= lifetime - 0.05, "the lease lapsed before its lifetime"
    await autoscaler.wait_for(
        lambda: [e for e in deleted_entries(autoscaler, idx) if e["success"]],
        timeout=10,
        message=f"request {idx} in /delete_requests/",
    )
    assert [e["success"] for e in deleted_entries(autoscaler, idx)] == [True]
    callbacks = await autoscaler.wait_for(
        lambda: callbacks_for(autoscaler, held["session"]["session_id"]), timeout=10, message="the orphan's callback"
    )
    assert len(callbacks) == 1
    await open_session(http, worker)


# -- the on-close callback target down or slow -----------------------------------------------


SLOW_CALLBACK = 3.0  # seconds the slow target takes to answer: well inside the framework's 10 s timeout


@pytest.mark.parametrize(
    "target",
    ["closed-port", pytest.param("slow", marks=pytest.mark.slow)],
)
async def test_release_is_prompt_when_the_callback_target_is_down_or_slow(start_worker, http, autoscaler, target):
    """/release returns at once and cur_load 0 is reported while the on-close callback target refuses
    connections or takes seconds to answer; a slow target still gets its callback once."""
    worker = await start_worker()
    body = worker.create_body()
    if target == "closed-port":
        body["payload"]["on_close_route"] = f"http://127.0.0.1:{free_port()}/on_close"
    else:
        autoscaler.callback_delay = SLOW_CALLBACK
    session_id = await open_session(http, worker, body)

    started = time.monotonic()
    released_at = time.time()
    answer = await release(http, worker)
    took = time.monotonic() - started
    returned_at = time.time()
    print(f"/release with a {target} callback target returned in {took * 1000:.1f} ms")
    assert answer == {"released": True, "session_ids": [session_id]}
    report = await worker.wait_report(
        lambda r: r["cur_load"] == 0.0, since=released_at, timeout=5, message="the release report"
    )
    print(f"cur_load 0 reported {(report.at - released_at) * 1000:.1f} ms after /release")
    # The worker is free while the callback is still in flight.
    await open_session(http, worker, worker.create_body(on_close=False))
    reopened_at = time.time()
    await release(http, worker)
    if target == "slow":
        callbacks = await autoscaler.wait_for(
            lambda: callbacks_for(autoscaler, session_id), timeout=SLOW_CALLBACK + 10, message="the slow callback"
        )
        assert len(callbacks) == 1, callbacks
        callback = callbacks[0]
        # The target records the callback only once it has slept: all of this came before it answered.
        assert max(returned_at, report.at, reopened_at) < callback.at, (
            f"/release returned, cur_load 0 was reported and the worker reopened {returned_at - released_at:.2f}, "
            f"{report.at - released_at:.2f} and {reopened_at - released_at:.2f} s after /release, the callback "
            f"arrived {callback.at - released_at:.2f} s after it"
        )
    assert worker.process.running, worker.explain()


# -- the worker's instance lost (SIGKILL) while it holds a session ------------------------


async def route_session(http: aiohttp.ClientSession, standin, avoid: str = "") -> dict[str, Any]:
    """Asks the stand-in's /route/ for a grant as the SDK does, polling with the request index it hands back."""
    # The stand-in is imported only where it is used: the other faults do not depend on it.
    from lib.standin.scaling import Phase
    from tests.standin import wait_fleet

    request_idx = 0
    deadline = time.monotonic() + 60
    while True:
        body = {
            "endpoint": standin.config.endpoint_name,
            "api_key": standin.config.api_key,
            "cost": 100,
            "request_idx": request_idx,
            "replay_timeout": 60,
        }
        async with http.post(standin.url + "/route/", json=body) as response:
            answer = await response.json()
            assert response.status == 200, (response.status, answer)
        if answer.get("url"):
            return answer
        request_idx = answer["request_idx"]
        # Poll again once a worker other than ``avoid`` is ready and free.
        await wait_fleet(
            standin.fleet,
            lambda f: any(i.phase is Phase.READY and i.cur_load == 0 and i.url != avoid for i in f.instances.values()),
            max(0.1, deadline - time.monotonic()),
            f"a ready worker for request {request_idx}",
        )


@pytest.mark.slow
async def test_killed_worker_is_seen_gone_and_the_next_session_is_routed_elsewhere(http):
    """SIGKILL of a worker holding a session (the instance lost): the local stand-in marks it gone,
    stops counting its session, and routes the next session to another worker."""
    from lib.standin.autoscaler import serve
    from lib.standin.scaling import Phase
    from tests.standin import explain, fast_config, wait_fleet

    async with serve(fast_config()) as standin:
        fleet = standin.fleet
        grant = await route_session(http, standin)
        status, answer = await post(
            http, grant["url"] + "/session/create", {"auth_data": grant, "payload": {"lifetime": 300}}
        )
        assert status == 201, (status, answer, explain(fleet))
        lost = next(i for i in fleet.instances.values() if i.url == grant["url"])
        await wait_fleet(fleet, lambda f: grant["request_idx"] in f.sessions, 10, "the session in the fleet's view")

        killed_at = time.monotonic()
        assert lost.pid is not None
        os.kill(lost.pid, signal.SIGKILL)
        await wait_fleet(
            fleet,
            lambda f: lost.phase is not Phase.READY and grant["request_idx"] not in f.sessions,
            15,
            f"the stand-in to see worker {lost.id} gone",
        )
        print(
            f"stand-in saw worker {lost.id} gone {time.monotonic() - killed_at:.2f}s after SIGKILL "
            f"(phase {lost.phase.value})"
        )

        rerouted = await route_session(http, standin, avoid=lost.url)
        assert rerouted["url"] != lost.url, explain(fleet)
        status, answer = await post(
            http, rerouted["url"] + "/session/create", {"auth_data": rerouted, "payload": {"lifetime": 60}}
        )
        assert status == 201, (status, answer, explain(fleet))
        print(
            f"next session routed to {rerouted['url']} {time.monotonic() - killed_at:.2f}s after the kill; "
            f"fleet: {fleet.summary()}"
        )
