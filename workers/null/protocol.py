"""What the worker, the consumer and the dispatcher agree on; docs/protocol.md is the same contract in prose.

Every program of the loop reads its shared facts from here: the session's
cost, the control server's address, and the job events a consumer publishes
for the dispatcher.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("workers.null.events")

# One session is one worker: a session asks for this cost, a held session
# reports this load whatever its cost, and the worker reports this max_perf.
SESSION_COST = 100.0

# The worker's loopback control server, which the consumer calls.
CONTROL_HOST = "127.0.0.1"
DEFAULT_CONTROL_PORT = 18999

# The worker's 410 for a session it no longer holds; the SDK side reads it as "already ended".
SESSION_GONE = "no such session: it ended or expired"

# A job's attempts (docs/protocol.md, "Attempts"). The consumer owns both budgets:
# a job that fails (itself, e.g. COMMAND exits non-zero) this many times is dead-lettered;
MAX_ATTEMPTS = 3
# a delivery past this number is dead-lettered unrun, whatever ended the earlier ones
# (crashes, lost leases, hand-backs): a job that keeps killing its worker stops there.
MAX_DELIVERIES = 10
# A failed job comes back after RETRY_DELAY * RETRY_BACKOFF ** (failures - 1) seconds, at most
# RETRY_MAX, less up to half of it at random (so retries of many jobs spread out).
RETRY_DELAY = 10.0
RETRY_BACKOFF = 2.0
RETRY_MAX = 300.0


def retry_delay(failures: int, base: float, backoff: float, cap: float, draw: float) -> float:
    """Seconds before a job that has failed ``failures`` times runs again; ``draw`` is uniform in [0, 1)."""
    full = min(cap, base * backoff ** max(0, failures - 1))
    return full / 2 + full / 2 * draw


# Job events the consumer publishes on the queue server and the dispatcher
# subscribes to; each carries the job id, its attempt and the session id.
CLAIMED = "claimed"  # the consumer holds the job for this session
STARTED = "started"  # the handler was started
FINISHED = "finished"  # the handler ended; ``outcome`` says how
RELEASED = "released"  # the session was released
EVENT_KINDS = (CLAIMED, STARTED, FINISHED, RELEASED)
# Outcomes of a finished job.
DONE = "done"  # acked
RETRY = "retry"  # handed back for another attempt
DEAD = "dead"  # dead-lettered after max attempts
ABANDONED = "abandoned"  # lease lost or consumer stopping: left to the queue's redelivery
OUTCOMES = (DONE, RETRY, DEAD, ABANDONED)


# The job events' wire form: one JSON object, keys as JobEvent's fields (docs/protocol.md, "Job events").
EVENT_VERSION = 1


class BadEvent(ValueError):
    """An event that does not follow the wire form; the message names the key."""


@dataclass(frozen=True)
class JobEvent:
    kind: str  # one of EVENT_KINDS
    job_id: str  # "" for a session released without a job
    attempt: int  # the delivery's number; 0 without a job
    session_id: str
    at: float = field(default_factory=time.time)  # wall-clock seconds
    outcome: str | None = None  # FINISHED only: one of OUTCOMES
    detail: str = ""
    failures: int = 0  # the job's own failures before this delivery
    retry_in: float | None = None  # FINISHED with outcome retry: seconds until it is delivered again
    v: int = EVENT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> JobEvent:
        """Reads an event; unknown keys are ignored, a missing or mistyped one is a BadEvent naming it."""
        if not isinstance(data, dict):
            raise BadEvent(f"an event is a JSON object, not {type(data).__name__}")
        version = data.get("v", EVENT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BadEvent(f"v {version!r} is not a version number")
        kind = _key(data, "kind", str)
        if kind not in EVENT_KINDS:
            raise BadEvent(f"kind {kind!r} is not one of {', '.join(EVENT_KINDS)}")
        outcome = _key(data, "outcome", str, None) if kind == FINISHED else None
        if kind == FINISHED and outcome not in OUTCOMES:
            raise BadEvent(f"outcome {outcome!r} of a finished event is not one of {', '.join(OUTCOMES)}")
        retry_in = _key(data, "retry_in", (int, float), None)
        return cls(
            kind=kind,
            job_id=_key(data, "job_id", str, ""),
            attempt=_key(data, "attempt", int, 0),
            session_id=_key(data, "session_id", str),
            at=float(_key(data, "at", (int, float), None) or time.time()),
            outcome=outcome,
            detail=_key(data, "detail", str, ""),
            failures=_key(data, "failures", int, 0),
            retry_in=None if retry_in is None else float(retry_in),
            v=version,
        )


_REQUIRED = object()


def _key(data: dict[str, Any], name: str, kind: Any, default: Any = _REQUIRED) -> Any:
    value = data.get(name)
    if value is None:
        if default is _REQUIRED:
            raise BadEvent(f"no {name!r} key")
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadEvent(f"{name} {value!r} is not a {kind.__name__ if isinstance(kind, type) else 'number'}")
    return value


def parse_event(data: bytes | str, where: str, warned: set[str]) -> JobEvent | None:
    """An event read off the wire, or None when it does not follow the form.

    Each kind of problem is logged once per ``warned`` (the feed's own set), then at debug level.
    """
    try:
        return JobEvent.from_dict(json.loads(data))
    except (ValueError, UnicodeDecodeError) as exc:
        problem = str(exc) if isinstance(exc, BadEvent) else "not JSON"
        if problem in warned:
            log.debug("ignored an event on %s: %s", where, exc)
        else:
            warned.add(problem)
            log.warning("ignored an event on %s that is not in the documented form (docs/protocol.md): %s", where, exc)
        return None
