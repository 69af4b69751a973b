"""The consumer's client of the worker's loopback control server: /claim, /extend, /release, /status."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

from workers.null.protocol import CONTROL_HOST, DEFAULT_CONTROL_PORT

# Above a /claim's own wait: the worker answers it when the wait ends.
CLAIM_SLACK = 10.0
CALL_TIMEOUT = 10.0


class ControlUnavailable(Exception):
    """The control server did not answer (the worker is starting, gone, or on another port)."""


class WorkerStopping(Exception):
    """The worker is stopping (503): it will hold no more sessions."""


class LeaseGone(Exception):
    """The worker no longer holds the session (409): its lease lapsed or it was released."""


@dataclass(frozen=True)
class HeldSession:
    """A session the worker holds, as /claim describes it."""

    session_id: str
    expires_in: float
    lifetime: float
    on_close_payload: Any = None

    @classmethod
    def from_answer(cls, data: dict[str, Any]) -> HeldSession:
        session_id = data.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            raise ControlUnavailable(f"/claim answered a session without a session_id: {data!r}")
        return cls(
            session_id=session_id,
            expires_in=float(data.get("expires_in") or 0.0),
            lifetime=float(data.get("lifetime") or 0.0),
            on_close_payload=data.get("on_close_payload"),
        )


class ControlClient:
    """Calls the worker's control server on 127.0.0.1:``port``; one HTTP connection pool, reused."""

    def __init__(self, port: int = DEFAULT_CONTROL_PORT, *, host: str = CONTROL_HOST):
        self.base_url = f"http://{host}:{port}"
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            # No proxy from the environment: this is loopback, always.
            self._http = aiohttp.ClientSession(trust_env=False)
        return self._http

    async def _post(self, route: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
        url = self.base_url + route
        try:
            async with self._session().post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                try:
                    answer = await resp.json(content_type=None)
                except ValueError:
                    answer = None
                return resp.status, answer
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ControlUnavailable(f"{url}: {type(exc).__name__} {exc}".rstrip()) from None

    async def claim(self, timeout: float) -> HeldSession | None:
        """Waits up to ``timeout`` seconds for the worker to hold a session; None when it held none."""
        status, answer = await self._post("/claim", {"timeout": timeout}, timeout + CLAIM_SLACK)
        if status == 503:
            raise WorkerStopping(_reason(answer, "worker is stopping"))
        if status != 200 or not isinstance(answer, dict) or "session" not in answer:
            raise ControlUnavailable(f"{self.base_url}/claim answered {status} {answer!r}")
        session = answer["session"]
        if session is None:
            return None
        if not isinstance(session, dict):
            raise ControlUnavailable(f"{self.base_url}/claim answered a session that is not an object: {session!r}")
        return HeldSession.from_answer(session)

    async def extend(self, session_id: str, seconds: float) -> float:
        """Sets the session's lease to now + ``seconds``; returns the seconds it has left."""
        status, answer = await self._post("/extend", {"session_id": session_id, "seconds": seconds}, CALL_TIMEOUT)
        if status == 409:
            raise LeaseGone(_reason(answer, f"session {session_id} is not held"))
        if status != 200 or not isinstance(answer, dict):
            raise ControlUnavailable(f"{self.base_url}/extend answered {status} {answer!r}")
        return float(answer.get("expires_in") or 0.0)

    async def release(self, session_id: str) -> bool:
        """Releases the session if the worker still holds it; True when this call released it."""
        status, answer = await self._post("/release", {"session_id": session_id}, CALL_TIMEOUT)
        if status != 200 or not isinstance(answer, dict):
            raise ControlUnavailable(f"{self.base_url}/release answered {status} {answer!r}")
        return bool(answer.get("released"))

    async def status(self) -> dict[str, Any]:
        url = self.base_url + "/status"
        try:
            async with self._session().get(url, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)) as resp:
                if resp.status != 200:
                    raise ControlUnavailable(f"{url} answered {resp.status}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise ControlUnavailable(f"{url}: {type(exc).__name__} {exc}".rstrip()) from None


def _reason(answer: Any, default: str) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"]
    return default
