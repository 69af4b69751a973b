"""Replays that touch every rule of the replay's core, printed as JSON: run before and after a change to it.

    python -m tests.e2e.replays > after.txt   # a change that means to keep every figure gives the same lines

Each line is one replay: every figure of its result, the waits, the timeline
and the seconds by phase, and the plan pickled and read back (as a sweep's
processes do).
"""

from __future__ import annotations

import json
import pickle
import random
import sys

from lib.planner.model import Plan, simulate
from lib.planner.trace import JobSeconds, bursts, diurnal, poisson
from lib.standin.scaling import EndpointParams, LocalPolicy


def plans() -> list[Plan]:
    return [
        Plan(),
        Plan(
            params=EndpointParams(cold_workers=3, max_workers=30),
            cold_start=(20.0, 80.0),
            resume=(5.0, 9.0),
            cold_start_each=(30.0, 45.0),
        ),
        Plan(params=EndpointParams(min_load=500.0, target_util=0.7, max_workers=25), route_hold=0.0),
        Plan(params=EndpointParams(inactivity_timeout=0.0, max_workers=10), max_sessions=15, stop_seconds=3.0),
        Plan(
            params=EndpointParams(max_workers=60, target_queue_time=0.0, inactivity_timeout=None),
            cold_start=(5.0, 5.0),
        ),
        Plan(params=EndpointParams(max_workers=8, max_queue_time=3.0), policy=LocalPolicy(scale_down_delay=0.0)),
    ]


def main() -> int:
    traces = {
        "diurnal": diurnal(1.5, 3, JobSeconds(mean=10.0), random.Random(3)),
        "poisson": poisson(0.8, 1800, JobSeconds(mean=None, low=1.0, high=30.0), random.Random(5)),
        "bursts": bursts(6, 40, 300.0, JobSeconds(mean=8.0), random.Random(6)),
    }
    for name, jobs in traces.items():
        for number, plan in enumerate(plans()):
            for exact in (False, True) if number < 2 and name == "diurnal" else (False,):
                result = simulate(jobs, pickle.loads(pickle.dumps(plan)), seed=11, record=True, exact=exact)
                line = {
                    "trace": name,
                    "plan": number,
                    "exact": exact,
                    "result": result.as_dict(),
                    "waits": result.waits,
                    "timeline": result.timeline,
                    "phase_s": result.phase_s,
                    "back": pickle.loads(pickle.dumps(result)).as_dict(),
                }
                print(json.dumps(line, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
