"""The endpoint's parameters, and the rules beside them that the planner sweeps: one row each.

A row says once what a value is: its name (the field that holds it, the key
in a plan's JSON, the flag's stem), how a flag's value is read, its default,
what it does, the planner's column title and, for an endpoint parameter,
Vast's name for it. From this table come the stand-in's flags
(``lib.standin.autoscaler``), the planner's flags and columns
(``lib.planner.cli``), a plan's JSON (``lib.planner.model``) and the
defaults of ``EndpointParams``, ``LocalPolicy.scale_down_delay``,
``BookSettings.route_hold`` and ``Plan``.

The rows are in the planner's order: its sweep varies the first slowest,
and its columns and JSON follow it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Kind(enum.Enum):
    """How a flag's value is read; its value names a comma list of them, as an error says it."""

    NUMBER = "numbers"
    WHOLE = "whole numbers"
    SECONDS_OR_OFF = "seconds or 'off'"
    SPAN = "seconds or MIN:MAX"  # a (low, high) pair, drawn uniformly
    WHOLE_OR_NONE = "whole numbers or 'none'"


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    default: Any
    help: str
    column: str  # the planner's column title
    vast: str | None = None  # Vast's name for it; None: not an endpoint parameter
    unit: str = ""  # after a value in the stand-in's log line
    flag_name: str | None = None  # the flag, when it is not --name-with-dashes

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")


PARAMS = (
    Param(
        "target_util",
        Kind.NUMBER,
        1.0,
        "share of capacity to fill: workers = load / (target_util * max_perf), rounded up",
        "util",
        vast="target_util",
    ),
    Param(
        "min_load",
        Kind.NUMBER,
        0.0,
        "load floor kept as capacity (100 = one worker)",
        "min_load",
        vast="min_load",
    ),
    Param("max_workers", Kind.WHOLE, 20, "cap on workers", "max_w", vast="max_workers"),
    Param(
        "cold_workers",
        Kind.WHOLE,
        0,
        "stopped-but-loaded workers kept after scale-down for fast restarts",
        "cold_w",
        vast="cold_workers",
    ),
    Param(
        "max_queue_time",
        Kind.NUMBER,
        1.0,
        "seconds: a worker whose queue (load / max_perf) is longer gets no route",
        "mqt",
        vast="max_queue_time",
        unit="s",
    ),
    Param(
        "target_queue_time",
        Kind.NUMBER,
        0.5,
        "seconds a request may wait before it counts as load for scaling up",
        "tqt",
        vast="target_queue_time",
        unit="s",
    ),
    Param(
        "inactivity_timeout",
        Kind.SECONDS_OR_OFF,
        10.0,
        "seconds without activity before the last worker stops ('off': never)",
        "inact",
        vast="inactivity_timeout",
        unit="s",
    ),
    Param(
        "cold_start",
        Kind.SPAN,
        (60.0, 60.0),
        "seconds from starting a worker to its ready report (uniform in MIN:MAX); measure yours",
        "cold_start",
    ),
    Param(
        "resume",
        Kind.SPAN,
        None,
        "seconds to resume a cold (stopped) worker (default: the cold start)",
        "resume",
    ),
    Param("stop_seconds", Kind.NUMBER, 1.0, "seconds a worker takes to stop", "stop_s"),
    Param(
        "scale_down_delay",
        Kind.NUMBER,
        5.0,
        "seconds a surplus worker stays idle before it is stopped",
        "sdd",
    ),
    Param(
        "route_hold",
        Kind.NUMBER,
        6.0,
        "seconds a /route/ with no free worker is held open for one to free up before the waiting answer "
        "(0: answer at once)",
        "hold",
    ),
    Param(
        "max_poll",
        Kind.NUMBER,
        5.0,
        "the SDK client's max_poll_interval: longest pause between a waiting session's /route/ calls",
        "poll",
        flag_name="--sdk-max-poll",
    ),
    Param(
        "max_sessions",
        Kind.WHOLE_OR_NONE,
        None,
        "the dispatcher's cap on sessions at once (default: none)",
        "max_sess",
    ),
    Param("price_running", Kind.NUMBER, 0.40, "per hour, for a running worker", "$/h run"),
    Param("price_stopped", Kind.NUMBER, 0.01, "per hour, for a stopped (cold) one", "$/h cold"),
)

BY_NAME = {param.name: param for param in PARAMS}
# Vast's endpoint parameters, in the planner's order.
ENDPOINT = tuple(param for param in PARAMS if param.vast is not None)


def default(name: str) -> Any:
    """The default of the value ``name``, for the field that holds it."""
    return BY_NAME[name].default


def flag_value(value: Any) -> str:
    """A value as its flag takes it: 0.5, 20, off, and a [low, high] span as LOW:HIGH."""
    if value is None:
        return "off"
    if isinstance(value, list):
        return ":".join(f"{v:g}" for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
