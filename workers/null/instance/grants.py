"""Checking that a grant was signed by the autoscaler for this worker."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15

from workers.null.instance.bodies import Refusal


def signed_message(url: str) -> bytes:
    """Byte for byte what the autoscaler signs: only the worker's URL."""
    return json.dumps({"url": url}, indent=4, sort_keys=True).encode()


def host_port(url: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.hostname.lower(), port


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
