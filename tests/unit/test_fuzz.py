"""Property-based fuzzing of every route: no 5xx, no slot held by garbage, the process stays up.

The bulk runs in-process (the ``desk`` fixture: the session desk on a real
framework Backend, served by aiohttp's test server); a smaller budget runs
against a real worker process. Hypothesis runs in a thread and hands each
request to the test's event loop, so the servers keep running between
examples and each test can check the worker after the last example.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib.standin.process import free_port
from tests.helpers import DESK_URL, create_body, public_app
from workers.null.instance.bodies import MAX_BODY_BYTES
from workers.null.instance.control import make_control_app
from workers.null.instance.settings import http_url

# Reproducible in CI: the same examples every run, nothing read from or
# written to a local example database.
IN_PROCESS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
AGAINST_PROCESS = settings(IN_PROCESS, max_examples=150)

PUBLIC_ROUTES = [
    ("POST", "/session/create"),
    ("POST", "/session/end"),
    ("POST", "/session/get"),
    ("POST", "/session/health"),
    ("POST", "/ping"),
    ("POST", "/pyworker/update"),
]
CONTROL_ROUTES = [("POST", "/release"), ("GET", "/status"), ("POST", "/extend"), ("GET", "/health")]
# (server, method, path): "public" is WORKER_PORT, "http" WORKER_HTTP_PORT, "control" the loopback server.
Route = tuple[str, str, str]
ROUTES: list[Route] = [("public", m, p) for m, p in PUBLIC_ROUTES] + [("control", m, p) for m, p in CONTROL_ROUTES]
PROCESS_ROUTES: list[Route] = ROUTES + [("http", "POST", "/session/end")]
RELEASE: Route = ("control", "POST", "/release")

# No callback may leave this machine: a loopback port that was free when this module loaded.
CLOSED_PORT = free_port()
LOOPBACK_CALLBACK = f"http://127.0.0.1:{CLOSED_PORT}/done"

# -- strategies ---------------------------------------------------------------

HUGE_NUMBERS = st.sampled_from(
    [10**100, -(10**100), 2**63, 2**64 + 1, 10**4000, 1e308, -1e308, 5e-324, -0.0, 0, 1.7976931348623157e308]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE_NUMBERS
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
GRANTISH = st.fixed_dictionaries(
    {},
    optional={key: JSON_VALUES for key in ("cost", "endpoint", "reqnum", "request_idx", "signature", "url")},
)
PAYLOADISH = st.fixed_dictionaries(
    {}, optional={"lifetime": JSON_VALUES, "on_close_route": JSON_VALUES, "on_close_payload": JSON_VALUES}
)
# Bodies shaped like the routes' own, so the fuzz gets past "not an object".
BODYISH = st.fixed_dictionaries(
    {},
    optional={
        "auth_data": GRANTISH | JSON_VALUES,
        "payload": PAYLOADISH | JSON_VALUES,
        "session_id": st.text(max_size=24) | JSON_VALUES,
        "session_auth": GRANTISH | JSON_VALUES,
        "seconds": JSON_VALUES,
    },
)
JSON_BODIES = (BODYISH | JSON_VALUES).map(lambda value: json.dumps(value).encode())

# Tokens Python's json would accept but JSON does not, bytes that are not
# UTF-8, and bytes that break the structure.
SPLICES = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\x00",
    b'"',
    b"{",
    b"]",
    b"1e999",
]


@st.composite
def spliced(draw: st.DrawFn) -> bytes:
    text = draw(JSON_BODIES)
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.sampled_from(SPLICES)) + text[at:]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Named hostile bodies, also run one by one in test_hostile_bodies_on_every_route.
HOSTILE: dict[str, bytes] = {
    "nan": b"NaN",
    "infinity": b"-Infinity",
    "nan-seconds": b'{"seconds": NaN}',
    "infinite-cost": b'{"auth_data": {"cost": Infinity, "url": "x", "signature": "x"}, "payload": {}}',
    "nan-lifetime": b'{"auth_data": {"cost": 100}, "payload": {"lifetime": NaN}}',
    "overflowing-cost": b'{"auth_data": {"cost": 1e999}, "payload": {}}',
    "too-many-digits": b'{"seconds": ' + b"9" * 5000 + b"}",
    "invalid-utf8": b'{"session_id": "\xff\xfe", "session_auth": {}}',
    "lone-surrogate": b'{"session_id": "\\ud800", "session_auth": {"url": "\\udfff"}}',
    "utf16": '{"session_id": "x", "session_auth": {}}'.encode("utf-16"),
    "bom": b'\xef\xbb\xbf{"seconds": 5}',
    "empty": b"",
    "nul": b"\x00",
    "deep-array": nested(100_000),
    "deep-object": b'{"a":' * 50_000,
    "deep-valid": nested(990),
    "one-megabyte": b'{"pad": "' + b"x" * (MAX_BODY_BYTES - 11) + b'"}',
    "over-one-megabyte": b'{"pad": "' + b"x" * (MAX_BODY_BYTES - 10) + b'"}',
}
assert len(HOSTILE["one-megabyte"]) == MAX_BODY_BYTES

RAW_BODIES = st.binary(max_size=512) | spliced() | st.sampled_from(sorted(HOSTILE.values()))
BODIES = JSON_BODIES | RAW_BODIES
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", None])
ENCODING_NAMES = ["gzip", "deflate", "br", "x-gzip", "identity", "compress", "gzip, deflate", "x-unknown"]
ENCODINGS = st.sampled_from(ENCODING_NAMES)
# Mostly no Content-Encoding; sometimes one the bytes do not match.
MAYBE_ENCODED = st.sampled_from([None] * 8 + ENCODING_NAMES)


def other_methods(route: Route) -> st.SearchStrategy[str]:
    """Mostly the route's own method, sometimes another (a 405 is fine, a 5xx is not)."""
    return st.sampled_from([route[1]] * 12 + ["GET", "POST", "PUT", "DELETE", "PATCH"])


def requests_to(routes: list[Route]) -> st.SearchStrategy:
    """(route, method, body, Content-Type, Content-Encoding) tuples."""
    return st.sampled_from(routes).flatmap(
        lambda route: st.tuples(st.just(route), other_methods(route), BODIES, CONTENT_TYPES, MAYBE_ENCODED)
    )


Request = tuple[Route, str, bytes, str | None, str | None]


# -- driving requests -----------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Routes:
    """Sends raw requests to a worker's public, plain-HTTP and control servers."""

    def __init__(self, send: Callable[[str, str, str, bytes, dict[str, str]], Awaitable[Answer]]):
        self._send = send

    async def send(
        self,
        route: Route,
        body: bytes = b"",
        *,
        method: str | None = None,
        content_type: str | None = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        server, default_method, path = route
        headers = dict(headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        return await self._send(server, method or default_method, path, body, headers)

    async def post_json(self, server: str, path: str, value: Any) -> Answer:
        return await self.send((server, "POST", path), json.dumps(value).encode())

    async def status(self) -> dict[str, Any]:
        answer = await self.send(("control", "GET", "/status"))
        assert answer.status == 200, answer
        return answer.json()


async def assert_one_slot(routes: Routes, grant: dict[str, Any]) -> None:
    """A signed create gets the worker, a second one is turned away, /release frees it."""
    first = await routes.post_json("public", "/session/create", create_body(grant))
    assert first.status == 201, f"a signed create after the fuzz: {first}"
    session_id = first.json()["session_id"]
    second = await routes.post_json("public", "/session/create", create_body(grant))
    assert second.status == 429, f"a second create while one session is held: {second}"
    released = await routes.send(RELEASE)
    assert released.json() == {"released": True, "session_ids": [session_id]}, released


async def fuzz(config: settings, strategy: st.SearchStrategy, check: Callable[[Any], Awaitable[None]]) -> None:
    """Runs ``check`` on each example from a Hypothesis thread, on this test's event loop."""
    loop = asyncio.get_running_loop()

    @config
    @given(strategy)
    def run(example: Any) -> None:
        asyncio.run_coroutine_threadsafe(check(example), loop).result(timeout=60)

    await asyncio.to_thread(run)


# -- in-process -------------------------------------------------------------------


@pytest.fixture
async def routes(desk):
    async with (
        TestClient(TestServer(public_app(desk))) as public,
        TestClient(TestServer(make_control_app(desk, health_stub=True))) as control,
    ):
        clients = {"public": public, "http": public, "control": control}

        async def send(server: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> Answer:
            async with clients[server].request(method, path, data=body, headers=headers) as response:
                return Answer(response.status, await response.read())

        yield Routes(send)


def assert_free(desk) -> None:
    assert not desk.backend.sessions, f"garbage left a session held: {list(desk.backend.sessions.values())}"
    assert desk.metrics.model_metrics.cur_load == 0.0


async def test_garbage_on_any_route_is_never_a_5xx_and_holds_no_slot(routes, desk, signer):
    """Arbitrary JSON and bytes on every route answer below 500 and leave the worker free for one signed session."""
    statuses: dict[int, int] = {}

    async def check(example: Request) -> None:
        route, method, body, content_type, encoding = example
        headers = {"Content-Encoding": encoding} if encoding else {}
        answer = await routes.send(route, body, method=method, content_type=content_type, headers=headers)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        assert answer.status < 500, f"{method} {route[2]} ({encoding}) with {body[:200]!r}: {answer}"
        assert_free(desk)

    await fuzz(IN_PROCESS, requests_to(ROUTES), check)
    print("statuses:", dict(sorted(statuses.items())))
    await assert_one_slot(routes, signer.grant(DESK_URL))


async def test_garbage_never_ends_a_held_session(routes, desk, signer):
    """With a session held, garbage on any route (its real session_id included) answers below 500 and
    leaves the session held; only /release naming no session or that one ends it."""
    grant = signer.grant(DESK_URL)
    requests = st.tuples(st.sampled_from(ROUTES), BODYISH, st.booleans())

    async def check(example: tuple[Route, dict[str, Any], bool]) -> None:
        route, body, name_the_session = example
        opened = await routes.post_json("public", "/session/create", create_body(grant))
        assert opened.status == 201, opened
        session_id = opened.json()["session_id"]
        if name_the_session:
            body = {**body, "session_id": session_id}
        answer = await routes.send(route, json.dumps(body).encode())
        assert answer.status < 500, f"{route} with {body!r}: {answer}"
        # The consumer's /release is the one authless way to end a session.
        if route == RELEASE and body.get("session_id") in (None, session_id):
            assert answer.json() == {"released": True, "session_ids": [session_id]}, f"{body!r}: {answer}"
            assert desk.held() is None
            return
        held = desk.held()
        assert held is not None and held.session_id == session_id, f"{route} with {body!r} ended the session: {answer}"
        assert desk.metrics.model_metrics.cur_load == 100.0
        released = await routes.send(RELEASE)
        assert released.json()["session_ids"] == [session_id]

    # Four requests an example: a smaller budget keeps the test under 5 s.
    await fuzz(settings(IN_PROCESS, max_examples=150), requests, check)
    await assert_one_slot(routes, grant)


DEEP = "__deep__"

LIFETIMES = JSON_VALUES | st.floats(min_value=1e-3, max_value=600) | st.sampled_from([600, 600.0001, 1e-300, 0, -1])
ON_CLOSE_ROUTES = (
    st.none()
    | st.just(LOOPBACK_CALLBACK)
    | st.sampled_from(
        ["file:///etc/passwd", "ftp://127.0.0.1/x", "javascript:alert(1)", "/done", "http://", "127.0.0.1:9/x"]
    )
    # Arbitrary text is kept only when it is not a usable URL: callbacks never leave 127.0.0.1.
    | st.text(max_size=24).filter(lambda text: not http_url(text))
    | JSON_VALUES.filter(lambda value: not isinstance(value, str))
)
# Nested arrays up to and past the depth json.loads accepts here (about 940 on
# CPython 3.10/3.11): a payload that parses must still read back and be sent.
ON_CLOSE_PAYLOADS = JSON_VALUES | (st.integers(1, 998) | st.integers(900, 998)).map(lambda depth: (DEEP, depth))
SIGNED_CREATES = st.tuples(
    st.fixed_dictionaries(
        {},
        optional={
            "cost": JSON_VALUES | st.floats(min_value=0, max_value=1e6),
            "request_idx": JSON_VALUES,
            "reqnum": JSON_VALUES,
            "endpoint": JSON_VALUES,
        },
    ),
    st.fixed_dictionaries(
        {}, optional={"lifetime": LIFETIMES, "on_close_route": ON_CLOSE_ROUTES, "on_close_payload": ON_CLOSE_PAYLOADS}
    ),
)


def encode_create(grant: dict[str, Any], payload: dict[str, Any]) -> bytes:
    """JSON text of a create body; a ``(DEEP, n)`` payload becomes n nested arrays (too deep for json.dumps)."""
    deep = payload.get("on_close_payload")
    if isinstance(deep, tuple):
        payload = {**payload, "on_close_payload": DEEP}
    text = json.dumps({"auth_data": grant, "payload": payload}).encode()
    if isinstance(deep, tuple):
        text = text.replace(json.dumps(DEEP).encode(), nested(deep[1]))
    return text


def acceptable_cost(value: Any) -> bool:
    if "cost" not in value:
        return False
    cost = value["cost"]
    if isinstance(cost, bool) or not isinstance(cost, (int, float)):
        return False
    try:
        return math.isfinite(float(cost)) and cost >= 0
    except OverflowError:
        return False


async def test_a_signed_create_opens_one_session_or_none(routes, desk, signer):
    """A correctly signed create with any grant fields and payload either opens exactly one
    session that reads back and releases cleanly, or is a 4xx holding nothing."""
    genuine = signer.grant(DESK_URL)
    outcomes: dict[int, int] = {}

    async def check(example: tuple[dict[str, Any], dict[str, Any]]) -> None:
        grant_fields, payload = example
        grant = {**genuine, **grant_fields}
        body = encode_create(grant, payload)
        answer = await routes.send(("public", "POST", "/session/create"), body)
        outcomes[answer.status] = outcomes.get(answer.status, 0) + 1
        shown = body[:300]
        assert answer.status in (201, 422), f"create {shown!r}: {answer}"
        if answer.status == 422:
            assert_free(desk)
            return
        assert acceptable_cost(grant), f"create {shown!r} accepted a bad cost: {answer}"
        session_id = answer.json()["session_id"]
        assert [s.session_id for s in desk.backend.sessions.values()] == [session_id]
        again = await routes.post_json("public", "/session/create", create_body(genuine))
        assert again.status == 429, again
        named = {"session_id": session_id, "session_auth": grant}
        for path in ("/session/get", "/session/health"):
            read = await routes.post_json("public", path, named)
            assert read.status == 200, f"{path} of the session opened by {shown!r}: {read}"
        status = await routes.send(("control", "GET", "/status"))
        assert status.status == 200, f"/status with the session opened by {shown!r}: {status}"
        for route in (("control", "POST", "/extend"), ("public", "POST", "/ping")):
            renewed = await routes.send(
                route, json.dumps({"auth_data": grant, "payload": {}, "session_id": session_id}).encode()
            )
            assert renewed.status == 200, f"{route} on the session opened by {shown!r}: {renewed}"
        released = await routes.send(RELEASE)
        assert released.json() == {"released": True, "session_ids": [session_id]}, released
        assert_free(desk)

    await fuzz(IN_PROCESS, SIGNED_CREATES, check)
    print("outcomes:", dict(sorted(outcomes.items())))
    assert outcomes.get(201) and outcomes.get(422), "the fuzz should reach both outcomes"
    await assert_one_slot(routes, genuine)


async def test_update_route_refuses_any_token(routes, desk):
    """With MASTER_TOKEN set, /pyworker/update refuses every other Authorization header with a 4xx, never a 5xx."""
    desk.backend.mtoken = "t0ken-" + "k" * 40  # long enough that no example can guess it

    async def check(example: tuple[str, bytes]) -> None:
        header, body = example
        answer = await routes.send(("public", "POST", "/pyworker/update"), body, headers={"Authorization": header})
        assert 400 <= answer.status < 500, f"Authorization {header!r}: {answer}"

    headers = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
    await fuzz(
        settings(IN_PROCESS, max_examples=80), st.tuples(headers | headers.map("Bearer ".__add__), RAW_BODIES), check
    )


async def test_body_with_any_content_encoding_is_never_a_5xx(routes, desk, signer):
    """A body declared gzip, deflate, br or an unknown Content-Encoding, whatever its
    bytes, gets a 4xx or 2xx on every route and holds no slot."""
    seen: dict[tuple[str, int], int] = {}

    async def check(example: tuple[Route, str, bytes]) -> None:
        route, encoding, body = example
        answer = await routes.send(route, body, headers={"Content-Encoding": encoding})
        seen[(encoding, answer.status)] = seen.get((encoding, answer.status), 0) + 1
        assert answer.status < 500, (
            f"{route[1]} {route[2]} with Content-Encoding {encoding} and {body[:100]!r}: {answer}"
        )
        assert_free(desk)

    compressed = st.sampled_from([zlib.compress(b'{"seconds": 5}'), gzip.compress(b"{}"), gzip.compress(b"\xff")])
    try:
        await fuzz(
            settings(IN_PROCESS, max_examples=100),
            st.tuples(st.sampled_from(ROUTES), ENCODINGS, RAW_BODIES | compressed),
            check,
        )
    finally:
        print("(encoding, status):", dict(sorted(seen.items())))
    await assert_one_slot(routes, signer.grant(DESK_URL))


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_bodies_on_every_route(routes, desk, signer, name):
    """Each named hostile body (NaN tokens, invalid UTF-8, deep nesting, 1 MB and
    over) gets a 4xx or 2xx on every route, never a 5xx."""
    body = HOSTILE[name]
    for route in ROUTES:
        answer = await routes.send(route, body)
        assert answer.status < 500, f"{route} with {name}: {answer}"
        if name == "over-one-megabyte" and route[0] == "public" and route[2] != "/pyworker/update":
            assert answer.status == 413, f"{route} with {name}: {answer}"
        assert_free(desk)
    await assert_one_slot(routes, signer.grant(DESK_URL))


# -- against a real worker process ------------------------------------------------------


async def test_real_worker_survives_the_fuzz_and_still_gives_one_session(start_worker):
    """A real worker process answers fuzzed requests on all three servers below
    500, stays up, and afterwards gives exactly one session."""
    worker = await start_worker()
    bases = {
        "public": worker.url,
        "http": f"http://127.0.0.1:{worker.ports.http}",
        "control": worker.control,
    }

    # A connection per request: after a body it cannot read, aiohttp's server
    # may close the connection, and a pooled one would fail the next request.
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=30)
    )

    async def send(server: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        async with http.request(method, bases[server] + path, data=body, headers=headers) as response:
            return Answer(response.status, await response.read())

    routes = Routes(send)
    sent = 0

    async def check(example: Request) -> None:
        nonlocal sent
        route, method, body, content_type, encoding = example
        headers = {"Content-Encoding": encoding} if encoding else {}
        try:
            answer = await routes.send(route, body, method=method, content_type=content_type, headers=headers)
        except aiohttp.ClientError as exc:
            raise AssertionError(
                f"{method} {route} ({encoding}) with {body[:200]!r}: {exc!r}\n{worker.explain()}"
            ) from None
        sent += 1
        assert answer.status < 500, f"{method} {route} ({encoding}) with {body[:200]!r}: {answer}\n{worker.explain()}"
        assert worker.process.running, f"the worker exited after {method} {route}\n{worker.explain()}"

    for _name, body in HOSTILE.items():
        for route in PROCESS_ROUTES:
            await check((route, route[1], body, "application/json", None))
    try:
        await fuzz(AGAINST_PROCESS, requests_to(PROCESS_ROUTES), check)
        print(f"sent {sent} requests; the worker is still running")
        assert worker.process.running, worker.explain()
        assert (await routes.status())["session"] is None, worker.explain()
        await assert_one_slot(routes, worker.grant())
        assert not [r for r in worker.reports() if r.get("error_msg")], worker.explain()
    finally:
        await http.close()
