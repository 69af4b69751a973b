"""The consumer's options and their checks, and the backoff its loops share."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from workers.null.protocol import (
    DEFAULT_CONTROL_PORT,
    MAX_ATTEMPTS,
    MAX_DELIVERIES,
    RETRY_BACKOFF,
    RETRY_DELAY,
    RETRY_MAX,
)

DEFAULT_HEALTH_PORT = 18998
SESSION_WAIT = 30.0  # each /claim's timeout; the loop asks again at once
STOP_TIMEOUT = 5.0  # after SIGTERM to a stopped job's process group, before SIGKILL
BACKOFF_FIRST = 0.2
BACKOFF_CAP = 5.0


class ConsumerError(Exception):
    """Bad input found at start; the message is one line naming the problem and the fix."""


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ConsumerOptions:
    claim_timeout: float = 5.0  # seconds to wait for a job once a session is held
    retry_delay: float = RETRY_DELAY  # seconds before a job that failed once is delivered again
    retry_backoff: float = RETRY_BACKOFF  # each further failure multiplies the delay by this
    retry_max: float = RETRY_MAX  # the longest delay
    max_attempts: int = MAX_ATTEMPTS  # a job failing this many times is dead-lettered
    max_deliveries: int = MAX_DELIVERIES  # a delivery past this number is dead-lettered unrun
    ack_wait: float | None = None  # the queue's renewal window; None: the queue's own
    grace: float = 8.0  # seconds a running job gets after SIGTERM (docker stop kills at 10)
    control_port: int = DEFAULT_CONTROL_PORT
    health_port: int | None = DEFAULT_HEALTH_PORT  # None: no health endpoint; 0: a free port
    name: str = field(default_factory=default_name)  # this consumer's name on the queue
    session_wait: float = SESSION_WAIT
    stop_timeout: float = STOP_TIMEOUT
    events: bool = True  # publish job events; the loop is correct without them, only slower to see a job end

    def problems(self) -> list[str]:
        """One line per bad value, naming the flag and the fix."""
        checks = (
            (_positive(self.claim_timeout), f"--claim-timeout {self.claim_timeout:g}: give seconds > 0"),
            (
                _finite(self.retry_delay) and self.retry_delay >= 0,
                f"--retry-delay {self.retry_delay:g}: give seconds >= 0",
            ),
            (
                _finite(self.retry_backoff) and self.retry_backoff >= 1,
                f"--retry-backoff {self.retry_backoff:g}: give a factor >= 1",
            ),
            (
                _finite(self.retry_max) and self.retry_max >= self.retry_delay,
                f"--retry-max {self.retry_max:g}: give seconds >= --retry-delay",
            ),
            (self.max_attempts >= 1, f"--max-attempts {self.max_attempts}: give 1 or more"),
            (
                self.max_deliveries >= self.max_attempts,
                f"--max-deliveries {self.max_deliveries}: give at least --max-attempts ({self.max_attempts})",
            ),
            (self.ack_wait is None or _positive(self.ack_wait), f"--ack-wait {self.ack_wait}: give seconds > 0"),
            (_finite(self.grace) and self.grace >= 0, f"--grace {self.grace:g}: give seconds >= 0"),
            (1 <= self.control_port <= 65535, f"--control-port {self.control_port}: give a port 1-65535"),
            (
                self.health_port is None or 0 <= self.health_port <= 65535,
                f"--health-port {self.health_port}: give a port 0-65535 (0: a free one)",
            ),
            (bool(self.name.strip()), "--name is empty: give this consumer a name, or leave the default"),
            (_positive(self.session_wait) and self.session_wait <= 300, "session wait: give seconds in (0, 300]"),
        )
        return [message for ok, message in checks if not ok]


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive(x: float) -> bool:
    return _finite(x) and x > 0


class Backoff:
    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP):
        self.first, self.cap, self.tries = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2**self.tries))
        self.tries += 1
        return delay

    def reset(self) -> None:
        self.tries = 0


def control_port_from_env(env: Mapping[str, str]) -> int:
    raw = (env.get("NULL_CONTROL_PORT") or "").strip()
    if not raw:
        return DEFAULT_CONTROL_PORT
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConsumerError(
            f"NULL_CONTROL_PORT={raw!r} is not a port number (1-65535): set it to the worker's control port or unset it"
        )
    return port
