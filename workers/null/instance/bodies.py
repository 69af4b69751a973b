"""What clients send, read once into typed values: bounded bodies, strict JSON, one parser per route.

Each parser takes the decoded JSON and returns a frozen dataclass, or raises
the 422 ``Refusal`` naming the field; a handler then verifies and acts on that
value and never looks at the raw body again.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions, web

from workers.null.instance.settings import http_url

log = logging.getLogger(__name__)

# Grants, session bodies and control calls are a few hundred bytes; the
# framework's app accepts bodies of any size, so the limit is ours.
MAX_BODY_BYTES = 1 << 20
DEFAULT_LIFETIME = 60.0  # the SDK's and the framework's default
DEFAULT_CLAIM_WAIT = 30.0
MAX_CLAIM_WAIT = 300.0


class Refusal(Exception):
    """A request the worker turns down; becomes ``{"error": reason}`` with ``status``."""

    def __init__(self, status: int, reason: str, detail: str = "", *, close: bool = False):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        # The body was not read to its end: the connection cannot carry another request.
        self.close = close
        # For the log only: what a client should not be told but an operator needs.
        self.detail = detail


Handler = Callable[..., Awaitable[web.StreamResponse]]


def refusals(route: str) -> Callable[[Handler], Handler]:
    """Turns a Refusal into its JSON answer and logs why."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(*args: Any) -> web.StreamResponse:
            # (request) for a function, (self, request) for a method.
            request: web.Request = args[-1]
            try:
                response = await handler(*args)
            except Refusal as refusal:
                level = logging.DEBUG if refusal.status in (409, 410, 429) else logging.INFO
                log.log(level, "refused %s (%d): %s", route, refusal.status, refusal.detail or refusal.reason)
                response = web.json_response({"error": refusal.reason}, status=refusal.status)
                if refusal.close:
                    response.force_close()
            if request.body_exists and not request.content.is_eof() and not response.prepared:
                # A body left unread (a GET with one, say) would be drained, and
                # maybe fail to decode, on a connection the client reuses.
                response.force_close()
            return response

        return guarded

    return wrap


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


async def read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    """The body as JSON, refusing oversized bodies, bad encodings and NaN/Infinity."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise Refusal(413, f"body larger than {MAX_BODY_BYTES} bytes", close=True)
    chunks = []
    size = 0
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise Refusal(413, f"body larger than {MAX_BODY_BYTES} bytes", close=True)
            chunks.append(chunk)
    except (web.RequestPayloadError, http_exceptions.HttpProcessingError):
        # A body that does not decode as its Content-Encoding says.
        raise Refusal(400, "body could not be read as its Content-Encoding declares", close=True) from None
    raw = b"".join(chunks)
    if allow_empty and not raw.strip():
        return None
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise Refusal(422, "body is not valid JSON") from None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a finite number."""
    if not is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def require_object(body: Any, name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise Refusal(422, f"{name} must be a JSON object")
    return body


def _integer_or_absent(auth_data: dict[str, Any], name: str) -> int | None:
    value = auth_data.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise Refusal(422, f"auth_data.{name} must be an integer")
    return value


def _session_id(body: dict[str, Any], *, required: bool) -> str | None:
    session_id = body.get("session_id")
    if session_id is None and not required:
        return None
    if not isinstance(session_id, str) or not session_id:
        raise Refusal(422, "session_id must be a non-empty string" + ("" if required else " or null"))
    return session_id


# -- the public routes ------------------------------------------------------------------


def parse_grant(body: Any) -> dict[str, Any]:
    """The grant (``auth_data``) of a create or ping, checked for shape only: verify it next."""
    return require_object(require_object(body, "body").get("auth_data"), "auth_data")


def grant_request_idx(auth_data: dict[str, Any]) -> int | None:
    """The grant's request index when it is a well-formed one, else None (for reports only)."""
    value = auth_data.get("request_idx")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class CreateRequest:
    auth_data: dict[str, Any]
    cost: float
    request_idx: int | None
    reqnum: int | None
    lifetime: float
    on_close_route: str | None
    on_close_payload: Any


def parse_create(body: Any, *, max_lifetime: float) -> CreateRequest:
    """A ``/session/create`` body: ``{"auth_data": grant, "payload": {lifetime, on_close_route, on_close_payload}}``."""
    auth_data = parse_grant(body)
    cost = finite(auth_data.get("cost"))
    if cost is None or cost <= 0:
        raise Refusal(
            422,
            "auth_data.cost must be a finite number > 0: a session fills its worker whatever its cost "
            "(100 is one worker)",
        )
    payload = require_object(body.get("payload"), "payload")
    on_close_route = payload.get("on_close_route")
    if on_close_route is not None and not http_url(on_close_route):
        raise Refusal(422, "payload.on_close_route must be an absolute http(s) URL or null")
    return CreateRequest(
        auth_data=auth_data,
        cost=cost,
        request_idx=_integer_or_absent(auth_data, "request_idx"),
        reqnum=_integer_or_absent(auth_data, "reqnum"),
        lifetime=_lifetime(payload, max_lifetime),
        on_close_route=on_close_route,
        # Kept even without a callback: /status and /claim hand it to the consumer.
        on_close_payload=payload.get("on_close_payload"),
    )


def _lifetime(payload: dict[str, Any], max_lifetime: float) -> float:
    if "lifetime" not in payload:
        return DEFAULT_LIFETIME
    lifetime = finite(payload["lifetime"])
    if lifetime is None or lifetime <= 0:
        raise Refusal(422, "payload.lifetime must be a finite number of seconds > 0")
    if lifetime > max_lifetime:
        raise Refusal(
            422,
            f"payload.lifetime {lifetime:g}s is above this worker's cap of {max_lifetime:g}s "
            "(NULL_MAX_LIFETIME); keep the session alive by renewing it instead",
        )
    return lifetime


@dataclass(frozen=True)
class PingRequest:
    auth_data: dict[str, Any]
    session_id: str | None


def parse_ping(body: Any) -> PingRequest:
    """A ``/ping`` body: a grant, a payload object, and the session it keeps alive, if any."""
    auth_data = parse_grant(body)
    require_object(body.get("payload"), "payload")
    return PingRequest(auth_data=auth_data, session_id=_session_id(body, required=False))


@dataclass(frozen=True)
class NamedSession:
    session_id: str
    session_auth: dict[str, Any]


def parse_named(body: Any) -> NamedSession:
    """A ``/session/end|get|health`` body: ``{"session_id", "session_auth": the session's grant}``."""
    body = require_object(body, "body")
    session_id = _session_id(body, required=True)
    session_auth = body.get("session_auth")
    if not isinstance(session_auth, dict):
        raise Refusal(422, "session_auth must be the session's grant (a JSON object)")
    return NamedSession(session_id=session_id, session_auth=session_auth)


# -- the control server -----------------------------------------------------------------


@dataclass(frozen=True)
class ControlRequest:
    session_id: str | None = None  # act on this session only
    seconds: float | None = None  # /extend: the new lease; /claim: how long to wait


def parse_release(body: Any) -> ControlRequest:
    """A ``/release`` body: empty, or ``{"session_id": id}``."""
    if body is None:
        return ControlRequest()
    return ControlRequest(session_id=_session_id(require_object(body, "body"), required=False))


def parse_extend(body: Any) -> ControlRequest:
    """An ``/extend`` body: empty, or ``{"session_id": id, "seconds": s}``."""
    if body is None:
        return ControlRequest()
    body = require_object(body, "body")
    seconds = None
    if body.get("seconds") is not None:
        seconds = finite(body["seconds"])
        if seconds is None or seconds <= 0:
            raise Refusal(422, "seconds must be a finite number > 0")
    return ControlRequest(session_id=_session_id(body, required=False), seconds=seconds)


def parse_claim(body: Any) -> ControlRequest:
    """A ``/claim`` body: empty, or ``{"timeout": seconds to wait for a session}``."""
    if body is None:
        return ControlRequest(seconds=DEFAULT_CLAIM_WAIT)
    body = require_object(body, "body")
    if body.get("timeout") is None:
        return ControlRequest(seconds=DEFAULT_CLAIM_WAIT)
    timeout = finite(body["timeout"])
    if timeout is None or not 0 < timeout <= MAX_CLAIM_WAIT:
        raise Refusal(422, f"timeout must be a number of seconds > 0 and <= {MAX_CLAIM_WAIT:g}")
    return ControlRequest(seconds=timeout)
