"""How fast the planner replays a day: one parameter set over a generated 24-hour trace.

    python -m lib.planner.speed [--jobs 100000] [--hours 24] [--job-seconds 10]

``bench_planner()`` returns the figure as a dict (``python -m lib.bench``
prints it); the line names the trace, the parameter set and the interpreter.
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lib.planner.model import Plan, simulate
from lib.planner.trace import DAY, JobSeconds, diurnal
from lib.standin.scaling import EndpointParams
from workers.null.cli import DefaultsShown, OneLineParser, non_negative, output_file_problem, positive, refuse_first


def bench_planner(
    jobs: int = 100_000,
    hours: float = 24.0,
    job_seconds: float = 10.0,
    cold_start: float = 60.0,
    max_workers: int = 40,
    seed: int = 1,
    min_load: float = 0.0,
) -> dict[str, Any]:
    """Seconds of one core to replay about ``jobs`` diurnal jobs over ``hours`` under one parameter set."""
    # The diurnal rate peak * (1 - cos(2 pi t / day)) / 2, summed over the hours.
    seconds = hours * 3600.0
    peak = jobs / (seconds / 2.0 - DAY / (4.0 * math.pi) * math.sin(2.0 * math.pi * seconds / DAY))
    trace = diurnal(peak, hours, JobSeconds(mean=job_seconds), random.Random(seed))
    plan = Plan(params=EndpointParams(max_workers=max_workers, min_load=min_load), cold_start=(cold_start, cold_start))
    cpu, wall = time.process_time(), time.perf_counter()
    result = simulate(trace, plan, seed=seed)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    interpreter = f"{platform.python_implementation()} {platform.python_version()}"
    trace_name = (
        f"diurnal {hours:g} h, {len(trace)} jobs (peak {peak:.3g}/s), exponential jobs of mean {job_seconds:g} s, "
        f"seed {seed}"
    )
    kept = f", min_load {min_load:g}" if min_load else ""
    params = f"stand-in defaults with max_workers {max_workers}{kept}, cold start {cold_start:g} s"
    waits = result.wait_stats()
    return {
        "trace": trace_name,
        "params": params,
        "interpreter": interpreter,
        "jobs": len(trace),
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "jobs_per_cpu_s": round(len(trace) / cpu) if cpu > 0 else None,
        "peak_workers": result.peak_workers,
        "cold_starts": result.cold_starts,
        "wait_p95_s": round(waits["p95"], 1),
        "line": (
            f"planner: one parameter set over {trace_name}: {cpu:.1f} s of CPU ({wall:.1f} s wall) on {interpreter}; "
            f"{params}; peak {result.peak_workers} workers, {result.cold_starts} cold starts"
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m lib.planner.speed",
        description="Time one parameter set over a generated day of jobs.",
        formatter_class=DefaultsShown,
    )
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the trace, about")
    parser.add_argument("--hours", type=float, default=24.0, help="trace length")
    parser.add_argument("--job-seconds", type=float, default=10.0, help="mean job length")
    parser.add_argument("--cold-start", type=float, default=60.0, help="seconds to a ready worker")
    parser.add_argument("--max-workers", type=int, default=40, help="cap on workers")
    parser.add_argument("--min-load", type=float, default=0.0, help="load kept up (100 per worker)")
    parser.add_argument("--json", metavar="FILE", help="also write the figure there")
    args = parser.parse_args(argv)
    json_problem = output_file_problem("--json", args.json)
    refuse_first(
        parser,
        [
            (args.jobs >= 1, f"--jobs {args.jobs}: give 1 or more jobs"),
            (positive(args.hours), f"--hours {args.hours:g}: give hours > 0"),
            (non_negative(args.job_seconds), f"--job-seconds {args.job_seconds:g}: give seconds >= 0"),
            (non_negative(args.cold_start), f"--cold-start {args.cold_start:g}: give seconds >= 0"),
            (args.max_workers >= 1, f"--max-workers {args.max_workers}: give 1 or more workers"),
            (non_negative(args.min_load), f"--min-load {args.min_load:g}: give a load >= 0"),
            (json_problem is None, json_problem or ""),
        ],
    )
    print("timing one parameter set...", file=sys.stderr, flush=True)
    figure = bench_planner(
        args.jobs, args.hours, args.job_seconds, args.cold_start, args.max_workers, min_load=args.min_load
    )
    print(figure["line"])
    if args.json:
        Path(args.json).write_text(json.dumps(figure, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
