"""Route grants signed the way Vast's autoscaler signs them.

The autoscaler signs only the worker URL: RSA PKCS#1 v1.5 over SHA-256 of
``json.dumps({"url": url}, indent=4, sort_keys=True)``, base64-encoded. The
worker fetches the matching public key (PEM) from ``$REPORT_ADDR/pubkey/``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15

from workers.null.instance.grants import signed_message
from workers.null.protocol import SESSION_COST


@dataclass
class GrantSigner:
    """Holds an RSA key and issues grants (``auth_data``) for worker URLs."""

    key: RSA.RsaKey = field(default_factory=lambda: RSA.generate(2048))
    _reqnums: count[int] = field(default_factory=lambda: count(1), repr=False)

    @property
    def public_pem(self) -> str:
        return self.key.publickey().export_key().decode()

    def sign(self, url: str) -> str:
        digest = SHA256.new(signed_message(url))
        return base64.b64encode(pkcs1_15.new(self.key).sign(digest)).decode()

    def grant(
        self,
        url: str,
        *,
        endpoint: str = "null-test",
        cost: float = SESSION_COST,
        request_idx: int | None = None,
    ) -> dict[str, Any]:
        """A route answer as the SDK receives it; the whole object is ``auth_data``."""
        reqnum = next(self._reqnums)
        return {
            "cost": cost,
            "endpoint": endpoint,
            "reqnum": reqnum,
            "request_idx": reqnum if request_idx is None else request_idx,
            "signature": self.sign(url),
            "url": url,
        }
