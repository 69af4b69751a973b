"""What the worker, the consumer and the dispatcher agree on; docs/protocol.md is the same contract in prose.

Every program of the loop reads its shared facts from here: the session's
cost, the control server's address, and the job events a consumer publishes
for the dispatcher.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

# One session is one worker: a session asks for this cost, a held session
# reports this load whatever its cost, and the worker reports this max_perf.
SESSION_COST = 100.0

# The worker's loopback control server, which the consumer calls.
CONTROL_HOST = "127.0.0.1"
DEFAULT_CONTROL_PORT = 18999

# The worker's 410 for a session it no longer holds; the SDK side reads it as "already ended".
SESSION_GONE = "no such session: it ended or expired"

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


@dataclass(frozen=True)
class JobEvent:
    kind: str
    job_id: str
    attempt: int
    session_id: str
    at: float = field(default_factory=time.time)
    outcome: str | None = None  # FINISHED only
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobEvent:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
