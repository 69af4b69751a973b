"""No state changes without proof: grants, session_auth and on-close routes.

Covered in tests/e2e/test_worker_e2e.py and not repeated here: a grant signed
with another key against a real worker
(test_forged_signature_is_refused_and_holds_no_slot) and the control server
refusing connections on the machine's non-loopback addresses
(test_control_server_is_bound_to_loopback_only).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import pytest

from lib.standin.grants import GrantSigner
from tests.helpers import DESK_URL, post
from workers.null.instance.desk import Ending

OTHER_URL = "http://127.0.0.1:4999"


@pytest.fixture(scope="module")
def forger() -> GrantSigner:
    """Signs with a key the worker was never given."""
    return GrantSigner()


def flip_a_bit(signature: str) -> str:
    raw = bytearray(base64.b64decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


Forgery = Callable[[GrantSigner, GrantSigner], dict[str, Any]]
FORGERIES: dict[str, Forgery] = {
    "signed-with-another-key": lambda signer, forger: forger.grant(DESK_URL),
    "another-workers-signature-with-this-url": lambda signer, forger: {
        **signer.grant(DESK_URL),
        "signature": signer.sign(OTHER_URL),
    },
    "this-workers-signature-with-another-url": lambda signer, forger: {**signer.grant(DESK_URL), "url": OTHER_URL},
    "one-bit-flipped": lambda signer, forger: {
        **signer.grant(DESK_URL),
        "signature": flip_a_bit(signer.sign(DESK_URL)),
    },
    "truncated": lambda signer, forger: {**signer.grant(DESK_URL), "signature": signer.sign(DESK_URL)[:-8]},
    "not-base64": lambda signer, forger: {**signer.grant(DESK_URL), "signature": "not base64 at all!"},
    "empty-signature": lambda signer, forger: {**signer.grant(DESK_URL), "signature": ""},
    "no-signature": lambda signer, forger: {k: v for k, v in signer.grant(DESK_URL).items() if k != "signature"},
    "no-url": lambda signer, forger: {k: v for k, v in signer.grant(DESK_URL).items() if k != "url"},
    "signature-in-a-list": lambda signer, forger: {**signer.grant(DESK_URL), "signature": [signer.sign(DESK_URL)]},
}


@pytest.mark.parametrize("after_a_genuine_grant", [False, True], ids=["cold", "after-a-genuine-grant"])
@pytest.mark.parametrize("name", sorted(FORGERIES))
async def test_forged_grant_is_refused_and_changes_nothing(public, desk, signer, forger, name, after_a_genuine_grant):
    """A grant that is not the autoscaler's signature over this worker's URL gets 401 and leaves no
    session, no load and no rejected load, also once a genuine grant has been verified."""
    if after_a_genuine_grant:
        # The worker remembers a signature it verified; that must not open a door.
        genuine = await public.post("/session/create", json={"auth_data": signer.grant(DESK_URL), "payload": {}})
        assert genuine.status == 201
        await desk.release(Ending.DISPATCHER)
        desk.metrics.model_metrics.reset()
    forged = FORGERIES[name](signer, forger)
    response = await public.post("/session/create", json={"auth_data": forged, "payload": {"lifetime": 60}})
    answer = await response.json()
    assert response.status == 401 and isinstance(answer.get("error"), str), (response.status, answer)
    assert not desk.backend.sessions
    assert desk.metrics.model_metrics.cur_load == 0.0
    assert desk.metrics.model_metrics.workload_rejected == 0.0


@pytest.mark.parametrize(
    "route",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/done",
        "javascript:alert(1)",
        "data:text/plain,done",
        "gopher://127.0.0.1/done",
        "ws://127.0.0.1/done",
        "mailto:ops@example.com",
        "/done",
        "done",
        "//127.0.0.1/done",
        "http:/127.0.0.1/done",
        "http://",
        "http://[::1/done",
        "127.0.0.1:9/done",
        "",
    ],
)
async def test_on_close_route_that_is_not_an_absolute_http_url_is_refused(public, desk, signer, route):
    """on_close_route must be an absolute http(s) URL: file://, ftp://, javascript:,
    relative and host-less routes get 422 and open nothing."""
    body = {"auth_data": signer.grant(DESK_URL), "payload": {"on_close_route": route, "on_close_payload": {"job": 1}}}
    response = await public.post("/session/create", json=body)
    answer = await response.json()
    assert response.status == 422 and "on_close_route" in answer.get("error", ""), (response.status, answer)
    assert not desk.backend.sessions


@pytest.mark.parametrize("route", ["http://127.0.0.1:9/done", "https://127.0.0.1:9/done"])
async def test_on_close_route_over_http_or_https_is_accepted(public, desk, signer, route):
    """The restriction is not overbroad: an http or https on_close_route opens the session."""
    body = {"auth_data": signer.grant(DESK_URL), "payload": {"on_close_route": route}}
    response = await public.post("/session/create", json=body)
    assert response.status == 201, await response.text()
    assert desk.held().on_close_route == route


# -- real worker processes -----------------------------------------------------------


async def test_grant_for_one_worker_replayed_to_another_is_refused_and_it_stays_free(start_worker, http, autoscaler):
    """A genuine grant for worker A (it opens a session on A) sent to worker B gets 401; B
    holds nothing, reports no load, and still takes its own grant."""
    worker_a = await start_worker()
    worker_b = await start_worker()
    grant_for_a = worker_a.grant()
    body = {"auth_data": grant_for_a, "payload": {"lifetime": 60}}
    status, answer = await post(http, worker_a.url + "/session/create", body)
    assert status == 201, (status, answer, worker_a.explain())

    replayed_at = time.time()
    status, answer = await post(http, worker_b.url + "/session/create", body)
    assert status == 401 and "another worker" in answer["error"], (status, answer, worker_b.explain())
    status, answer = await post(http, worker_b.url + "/ping", {"auth_data": grant_for_a, "payload": {}})
    assert status == 401, (status, answer)

    b_status = await (await http.get(worker_b.control + "/status")).json()
    assert b_status["session"] is None, b_status
    assert not [r for r in worker_b.reports(since=replayed_at) if r["cur_load"]], worker_b.explain()
    status, answer = await post(http, worker_b.url + "/session/create", worker_b.create_body(on_close=False))
    assert status == 201, (status, answer, worker_b.explain())
    a_status = await (await http.get(worker_a.control + "/status")).json()
    assert a_status["session"]["cost"] == 100.0, "worker A's session was disturbed"


async def test_session_routes_refuse_a_wrong_session_auth_and_the_session_stays_held(
    start_worker, http, autoscaler, forger
):
    """/session/end (both ports), /session/get, /session/health and /ping with anything but the session's own grant
    are refused: the session stays held, its lease is not renewed, nothing is reported ended."""
    worker = await start_worker()
    body = worker.create_body(lifetime=300)
    own = body["auth_data"]
    status, answer = await post(http, worker.url + "/session/create", body)
    assert status == 201, (status, answer, worker.explain())
    session_id = answer["session_id"]
    opened = await worker.wait_report(lambda r: r["cur_load"] == 100.0, message="the open session")
    before = (await (await http.get(worker.control + "/status")).json())["session"]["expires_in"]

    wrong: dict[str, Any] = {
        "another-genuine-grant": worker.grant(),
        "own-grant-with-cost-changed": {**own, "cost": 0},
        "own-grant-with-request_idx-changed": {**own, "request_idx": own["request_idx"] + 1},
        "forged": forger.grant(worker.url),
        "empty": {},
    }
    refused: list[str] = []
    http_port = f"http://127.0.0.1:{worker.ports.http}"
    for name, auth in wrong.items():
        named = {"session_id": session_id, "session_auth": auth}
        for url in (
            worker.url + "/session/end",
            http_port + "/session/end",
            worker.url + "/session/get",
            worker.url + "/session/health",
        ):
            status, answer = await post(http, url, named)
            assert status == 401, (name, url, status, answer)
            refused.append(url)
        status, answer = await post(
            http, worker.url + "/ping", {"auth_data": auth, "payload": {}, "session_id": session_id}
        )
        assert status in (401, 422), (name, "/ping", status, answer)

    held = (await (await http.get(worker.control + "/status")).json())["session"]
    assert held is not None and held["session_id"] == session_id, worker.explain()
    assert held["expires_in"] <= before, f"a refused request renewed the lease: {before} -> {held['expires_in']}"
    assert not [r for r in worker.reports(since=opened.at) if r["cur_load"] == 0.0], (
        "a refused request ended the session"
    )
    assert not autoscaler.callbacks and not [e for d in autoscaler.deleted for e in d.body["requests"]], (
        "a refused request ended the session"
    )

    status, answer = await post(http, http_port + "/session/end", {"session_id": session_id, "session_auth": own})
    assert status == 200 and answer["removed_session"] == session_id, (status, answer)
    print(f"{len(refused) + len(wrong)} requests with a wrong session_auth refused; the session's own grant ended it")
