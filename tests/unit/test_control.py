"""The control app and the session desk in-process, on a real framework Backend."""

import asyncio
import dataclasses
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.helpers import DESK_URL, open_desk_session
from workers.null.instance.control import make_control_app

WORKER_URL = DESK_URL


@pytest.fixture
async def control(desk):
    async with TestClient(TestServer(make_control_app(desk, health_stub=True))) as client:
        yield client


async def test_release_with_nothing_held_says_so(control):
    """/release on a free worker is a 200 that says nothing was released."""
    response = await control.post("/release")
    assert response.status == 200
    assert await response.json() == {"released": False, "reason": "no active session"}


async def test_release_ends_the_held_session_and_frees_the_worker(control, public, signer, desk):
    """/release names the session it ended; the load drops and a new session fits."""
    session_id, _ = await open_desk_session(public, signer)
    assert desk.metrics.model_metrics.cur_load == 100.0

    response = await control.post("/release")
    assert await response.json() == {"released": True, "session_ids": [session_id]}
    assert desk.metrics.model_metrics.cur_load == 0.0
    finished = desk.metrics.model_metrics.requests_deleting
    assert [(r.success, r.status) for r in finished] == [(True, "Success")]
    await open_desk_session(public, signer)


async def test_concurrent_releases_end_the_session_once(control, public, signer):
    """Two /release calls at once: one releases, the other finds nothing held."""
    await open_desk_session(public, signer)
    answers = await asyncio.gather(*(control.post("/release") for _ in range(2)))
    bodies = [await a.json() for a in answers]
    assert sorted(b["released"] for b in bodies) == [False, True]


async def test_status_shows_the_held_session(control, public, signer):
    """/status gives the consumer the session id, cost, age, expiry and its payload."""
    free = await (await control.get("/status")).json()
    assert free["ready"] is True and free["session"] is None

    session_id, _ = await open_desk_session(
        public, signer, lifetime=30, on_close_route="http://127.0.0.1:9/cb", on_close_payload={"job": 42}
    )
    session = (await (await control.get("/status")).json())["session"]
    assert session["session_id"] == session_id
    assert session["cost"] == 100.0
    assert session["on_close_payload"] == {"job": 42}
    assert 29 <= session["expires_in"] <= 30
    assert abs(session["created_at"] - time.time()) < 5


async def test_extend_renews_the_lease_from_now(control, public, signer):
    """/extend sets the lease to now + seconds, defaulting to the lifetime, capped at the maximum."""
    await open_desk_session(public, signer, lifetime=20)

    by_default = await (await control.post("/extend")).json()
    assert by_default["extended"] is True and by_default["expires_in"] == 20

    asked = await (await control.post("/extend", json={"seconds": 300})).json()
    assert asked["expires_in"] == 300
    status = await (await control.get("/status")).json()
    assert 299 <= status["session"]["expires_in"] <= 300

    capped = await (await control.post("/extend", json={"seconds": 10**6})).json()
    assert capped["expires_in"] == 600


async def test_extend_with_nothing_held_is_a_conflict(control):
    """/extend on a free worker is a 409 with an error."""
    response = await control.post("/extend", json={"seconds": 5})
    assert response.status == 409
    assert "error" in await response.json()


@pytest.mark.parametrize(
    "body",
    [
        b'{"seconds": 0}',
        b'{"seconds": -3}',
        b'{"seconds": "10"}',
        b'{"seconds": true}',
        b"[1]",
        b"{",
        b'{"seconds": NaN}',
    ],
)
async def test_extend_refuses_bad_seconds(control, public, signer, body):
    """A malformed /extend body is a 422, never a 500."""
    await open_desk_session(public, signer)
    response = await control.post("/extend", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 422
    assert "error" in await response.json()


async def test_health_stub_answers_only_when_configured(desk):
    """The always-200 stub exists only when no consumer health URL is configured."""
    async with TestClient(TestServer(make_control_app(desk, health_stub=True))) as client:
        assert (await client.get("/health")).status == 200
    async with TestClient(TestServer(make_control_app(desk, health_stub=False))) as client:
        assert (await client.get("/health")).status == 404


async def test_lapsed_lease_ends_the_session(public, signer, desk):
    """A session whose lease is not renewed is closed at its expiry, not at the next 5 s sweep."""
    expiry = asyncio.ensure_future(desk.expiry_loop())
    try:
        await open_desk_session(public, signer, lifetime=0.2)
        deadline = time.monotonic() + 3
        while desk.backend.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not desk.backend.sessions
        assert desk.metrics.model_metrics.cur_load == 0.0
    finally:
        expiry.cancel()


async def test_ping_with_the_session_renews_its_lease(public, signer, desk):
    """A signed /ping naming the session sets its lease to now + lifetime instead of adding to it."""
    session_id, grant = await open_desk_session(public, signer, lifetime=50)
    for _ in range(3):
        response = await public.post("/ping", json={"auth_data": grant, "payload": {}, "session_id": session_id})
        assert response.status == 200, await response.text()
    session = desk.backend.sessions[session_id]
    assert session.expiration - time.time() <= 50


async def test_ping_with_another_grant_does_not_touch_the_session(public, signer, desk):
    """A valid grant that is not the session's own cannot renew it."""
    session_id, _ = await open_desk_session(public, signer)
    other = signer.grant(WORKER_URL)
    response = await public.post("/ping", json={"auth_data": other, "payload": {}, "session_id": session_id})
    assert response.status == 401


async def test_release_naming_another_session_leaves_the_held_one(control, public, signer, desk):
    """A consumer naming a session that is no longer held cannot release the next job's session."""
    session_id, _ = await open_desk_session(public, signer)
    stale = await (await control.post("/release", json={"session_id": "an-earlier-session"})).json()
    assert stale == {"released": False, "reason": "session an-earlier-session is not held"}
    assert session_id in desk.backend.sessions

    named = await (await control.post("/release", json={"session_id": session_id})).json()
    assert named == {"released": True, "session_ids": [session_id]}


async def test_extend_naming_another_session_is_a_conflict(control, public, signer):
    """/extend for a session that is not held is a 409 and renews nothing."""
    session_id, _ = await open_desk_session(public, signer)
    response = await control.post("/extend", json={"seconds": 30, "session_id": "an-earlier-session"})
    assert response.status == 409
    assert (await (await control.post("/extend", json={"seconds": 30, "session_id": session_id})).json())[
        "expires_in"
    ] == 30


@pytest.mark.parametrize("body", [b'{"session_id": 5}', b'{"session_id": ""}', b"[]", b"nope"])
async def test_release_refuses_a_malformed_body(control, public, signer, desk, body):
    """A malformed /release body is a 422 and releases nothing."""
    await open_desk_session(public, signer)
    response = await control.post("/release", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 422
    assert desk.backend.sessions


async def test_claim_returns_the_held_session_at_once_and_marks_it_claimed(control, public, signer):
    """/claim with a session held answers at once with that session, now counted as claimed."""
    session_id, _ = await open_desk_session(public, signer, on_close_payload={"job": 7})
    started = time.monotonic()
    answer = await (await control.post("/claim", json={"timeout": 5})).json()
    assert time.monotonic() - started < 1
    assert answer["session"]["session_id"] == session_id
    assert answer["session"]["claimed"] is True
    assert answer["session"]["on_close_payload"] == {"job": 7}
    status = await (await control.get("/status")).json()
    assert status["session"]["claimed"] is True


async def test_claim_waits_for_the_next_session_to_open(control, public, signer):
    """/claim on a free worker answers the moment a session opens, not at its timeout."""
    waiting = asyncio.ensure_future(control.post("/claim", json={"timeout": 10}))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    started = time.monotonic()
    session_id, _ = await open_desk_session(public, signer)
    answer = await (await waiting).json()
    assert time.monotonic() - started < 1
    assert answer["session"]["session_id"] == session_id


async def test_claim_with_no_session_within_its_timeout_answers_none(control):
    """/claim on a free worker answers {"session": null} once its timeout passes."""
    started = time.monotonic()
    response = await control.post("/claim", json={"timeout": 0.2})
    assert response.status == 200
    assert await response.json() == {"session": None}
    assert 0.15 <= time.monotonic() - started < 2


async def test_claim_while_stopping_is_503(control, desk):
    """A stopping worker answers /claim with 503, waking a claim that was waiting."""
    waiting = asyncio.ensure_future(control.post("/claim", json={"timeout": 10}))
    await asyncio.sleep(0.1)
    await desk.shutdown(time.monotonic() + 1)
    response = await waiting
    assert response.status == 503
    assert (await control.post("/claim")).status == 503


@pytest.mark.parametrize(
    "body", [b'{"timeout": 0}', b'{"timeout": -1}', b'{"timeout": 301}', b'{"timeout": "5"}', b"[]"]
)
async def test_claim_refuses_a_bad_timeout(control, body):
    """A /claim timeout that is not a number of seconds in (0, 300] is a 422."""
    response = await control.post("/claim", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 422
    assert (await response.json())["error"]


async def test_claim_deadline_releases_an_unclaimed_session(control, public, signer, desk):
    """With a claim deadline, a session no consumer claims is released at the deadline and shown in /status."""
    desk.settings = dataclasses.replace(desk.settings, claim_deadline=0.3)
    expiry = asyncio.ensure_future(desk.expiry_loop())
    try:
        session_id, _ = await open_desk_session(public, signer, lifetime=60)
        status = await (await control.get("/status")).json()
        assert status["session"]["claimed"] is False
        assert 0 < status["session"]["claim_deadline_in"] <= 0.3
        deadline = time.monotonic() + 3
        while desk.backend.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not desk.backend.sessions, "the unclaimed session was not released"
        status = await (await control.get("/status")).json()
        assert status["released_unclaimed"] == 1 and status["claim_deadline"] == 0.3
        assert desk.unclaimed_releases == [session_id]
    finally:
        expiry.cancel()


@pytest.mark.parametrize("how", ["claim", "extend"])
async def test_claimed_session_outlives_the_claim_deadline(control, public, signer, desk, how):
    """A session claimed by /claim, or by an /extend naming it, is not released by the claim deadline."""
    desk.settings = dataclasses.replace(desk.settings, claim_deadline=0.2)
    expiry = asyncio.ensure_future(desk.expiry_loop())
    try:
        session_id, _ = await open_desk_session(public, signer, lifetime=60)
        if how == "claim":
            await control.post("/claim", json={"timeout": 1})
        else:
            await control.post("/extend", json={"session_id": session_id, "seconds": 60})
        await asyncio.sleep(0.5)
        assert session_id in desk.backend.sessions
    finally:
        expiry.cancel()


async def test_without_a_claim_deadline_an_unclaimed_session_is_kept(control, public, signer, desk):
    """Unset, the claim deadline changes nothing: an unclaimed session is held until its lease lapses."""
    assert desk.settings.claim_deadline is None
    expiry = asyncio.ensure_future(desk.expiry_loop())
    try:
        session_id, _ = await open_desk_session(public, signer, lifetime=60)
        await asyncio.sleep(0.3)
        assert session_id in desk.backend.sessions
        status = await (await control.get("/status")).json()
        assert status["session"]["claim_deadline_in"] is None
    finally:
        expiry.cancel()


async def test_a_worker_whose_consumer_stopped_claiming_refuses_sessions_and_fails_health(
    control, public, signer, desk, monkeypatch
):
    """A consumer claimed once, then went quiet past CONSUMER_GRACE: /health 503, a create 429 naming why; the
    next /claim makes the worker take sessions again. A client that only ever releases is never judged."""
    from tests.helpers import create_body
    from workers.null.instance import desk as desks

    await control.post("/release")  # release-only: not judged
    monkeypatch.setattr(desks, "CONSUMER_GRACE", 0.2)
    await asyncio.sleep(0.3)
    assert (await control.get("/health")).status == 200
    answer = await control.post("/claim", json={"timeout": 0.05})
    assert (await answer.json()) == {"session": None}
    await asyncio.sleep(0.3)
    health = await control.get("/health")
    assert health.status == 503
    refused = await public.post("/session/create", json=create_body(signer.grant(DESK_URL)))
    assert refused.status == 429
    assert "no consumer has called the control server" in (await refused.json())["error"]
    waiting = asyncio.ensure_future(control.post("/claim", json={"timeout": 5}))
    await asyncio.sleep(0.1)
    session_id, _ = await open_desk_session(public, signer)
    claimed = await (await waiting).json()
    assert claimed["session"]["session_id"] == session_id
