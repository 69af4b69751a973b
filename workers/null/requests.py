"""Reading and checking what clients send: bounded bodies, strict JSON, signed grants."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import http_exceptions, web
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15

# Grants, session bodies and control calls are a few hundred bytes; the
# framework's app accepts bodies of any size, so the limit is ours.
MAX_BODY_BYTES = 1 << 20


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


def host_port(url: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.hostname.lower(), port


def signed_message(url: str) -> bytes:
    # Byte for byte what the autoscaler signs: only the URL.
    return json.dumps({"url": url}, indent=4, sort_keys=True).encode()


class GrantVerifier:
    """Checks that a grant was signed by the autoscaler and issued for this worker."""

    def __init__(self, own_url: str, public_key: Callable[[], RSA.RsaKey | None], *, unsecured: bool):
        self.own_url = own_url
        self._own = host_port(own_url)
        self._public_key = public_key
        self.unsecured = unsecured
        # PKCS#1 v1.5 is deterministic and only the URL is signed, so every
        # genuine grant for this worker carries the same signature: once it has
        # verified, a string comparison replaces the RSA check (0.7 ms each).
        self._verified: tuple[RSA.RsaKey, str, str] | None = None

    def check(self, auth_data: dict[str, Any]) -> None:
        """Raises a 401 Refusal naming the failed check; returns when the grant holds."""
        if self.unsecured:
            return
        url = auth_data.get("url")
        signature = auth_data.get("signature")
        if not isinstance(url, str) or not isinstance(signature, str):
            raise Refusal(401, "grant is not signed: auth_data needs url and signature strings")
        key = self._public_key()
        if key is None:
            # Retryable: the SDK routes the request again rather than failing it.
            raise Refusal(429, "worker is not ready yet: the autoscaler's public key is not loaded")
        if self._verified is not None and self._verified[0] is key and self._verified[1:] == (url, signature):
            return
        try:
            pkcs1_15.new(key).verify(SHA256.new(signed_message(url)), base64.b64decode(signature, validate=True))
        except (ValueError, TypeError, binascii.Error):
            raise Refusal(
                401,
                "grant signature does not verify",
                f"signature check failed for grant url {url}; this worker is {self.own_url}",
            ) from None
        if host_port(url) != self._own:
            raise Refusal(
                401,
                "grant was issued for another worker",
                f"grant url {url} is not this worker's url {self.own_url}",
            )
        self._verified = (key, url, signature)
