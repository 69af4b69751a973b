"""The desk's reports and rules as the autoscaler sees them: unused grants, costs, the callback's id."""

from __future__ import annotations

import pytest

from tests.helpers import DESK_URL, create_body
from workers.null.instance.desk import REFUSED, UNUSED, Ending


def finished(desk) -> list[tuple[int, bool, str]]:
    """What the next /delete_requests/ report will carry: (request_idx, success, status)."""
    return [(r.request_idx, r.success, r.status) for r in desk.metrics.model_metrics.requests_deleting]


async def test_bare_ping_reports_its_grant_served_at_once(public, signer, desk):
    """A signed /ping that names no session is reported finished as a success, so its grant stops counting."""
    grant = signer.grant(DESK_URL, request_idx=41)
    desk.metrics.update_pending = False
    response = await public.post("/ping", json={"auth_data": grant, "payload": {}})
    assert response.status == 200
    assert finished(desk) == [(41, True, UNUSED)]
    assert desk.metrics.update_pending, "the report was not asked for at once"
    assert desk.metrics.model_metrics.cur_load == 0.0


async def test_ping_naming_the_session_is_never_reported_finished(public, signer, desk):
    """A /ping that keeps a session alive reports nothing: the session goes on."""
    grant = signer.grant(DESK_URL, request_idx=7)
    opened = await (await public.post("/session/create", json=create_body(grant))).json()
    response = await public.post("/ping", json={"auth_data": grant, "payload": {}, "session_id": opened["session_id"]})
    assert response.status == 200
    assert finished(desk) == []
    assert desk.metrics.model_metrics.cur_load == 100.0


@pytest.mark.parametrize(
    "payload",
    [{"lifetime": -1}, {"lifetime": "soon"}, {"on_close_route": "file:///etc/passwd"}],
    ids=["negative-lifetime", "text-lifetime", "bad-callback"],
)
async def test_create_refused_for_its_body_is_reported_not_rejected(public, signer, desk, payload):
    """A signed create refused with 422 is reported finished, not successful, and never as "Rejected" (busy)."""
    grant = signer.grant(DESK_URL, request_idx=99)
    response = await public.post("/session/create", json=create_body(grant, **payload))
    assert response.status == 422
    assert finished(desk) == [(99, False, REFUSED)]
    assert not desk.backend.sessions


async def test_forged_grant_with_a_bad_body_is_401_and_reports_nothing(public, desk):
    """The signature is checked before the body, so a forged request id is never reported."""
    forged = {"url": DESK_URL, "signature": "AAAA", "cost": 100, "request_idx": 5}
    response = await public.post("/session/create", json=create_body(forged, lifetime=-1))
    assert response.status == 401
    assert finished(desk) == []


@pytest.mark.parametrize("cost", [50, 100, 250])
async def test_a_held_session_fills_its_worker_whatever_its_cost(public, signer, desk, cost):
    """A session of any positive cost reports a full worker's load, so it is never routed to again."""
    response = await public.post("/session/create", json=create_body(signer.grant(DESK_URL, cost=cost)))
    assert response.status == 201
    assert desk.metrics.model_metrics.cur_load == 100.0
    second = await public.post("/session/create", json=create_body(signer.grant(DESK_URL, cost=cost)))
    assert second.status == 429


@pytest.mark.parametrize("cost", [0, -5])
async def test_cost_of_zero_or_less_is_refused(public, signer, desk, cost):
    """A cost <= 0 would be no demand while waiting: the create is a 422 naming the rule."""
    response = await public.post("/session/create", json=create_body(signer.grant(DESK_URL, cost=cost)))
    assert response.status == 422
    assert "cost" in (await response.json())["error"]
    assert not desk.backend.sessions


async def test_callback_carries_the_sessions_own_id_whatever_the_payload_says(public, signer, desk, autoscaler):
    """An on_close_payload with its own session_id key still reaches the callback with the session's id."""
    body = create_body(
        signer.grant(DESK_URL),
        on_close_route=autoscaler.on_close_url,
        on_close_payload={"session_id": "not-this-one", "job": 3},
    )
    opened = await (await public.post("/session/create", json=body)).json()
    await desk.release(Ending.DISPATCHER)
    await autoscaler.wait_for(lambda: autoscaler.callbacks, 5, "the on-close callback")
    assert autoscaler.callbacks[0].body == {"session_id": opened["session_id"], "job": 3}
    assert desk.status()["session"] is None
