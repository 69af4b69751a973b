"""``python -m lib.planner``: what a job trace would cost and how long its jobs would wait, per parameter set.

    python -m lib.planner --diurnal 0.5:24 --job-seconds 5:60 \\
        --max-workers 10,20 --inactivity-timeout 30,300 --cold-start 60:180 --max-p95-wait 120

Every parameter flag takes a comma list; the planner replays the trace under
each set of the cross product and prints one row per set.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from lib.planner.model import Plan, Result, simulate
from lib.planner.sweep import Progress, cheapest_within, default_processes, pareto_front, run_sweep
from lib.planner.trace import Job, JobSeconds, TraceError, bursts, describe, diurnal, load_trace, poisson
from lib.standin.params import BY_NAME, ENDPOINT, PARAMS, Kind, flag_value
from lib.standin.scaling import EndpointParams
from workers.null.cli import DefaultsShown, output_file_problem, sigterm_as_ctrl_c
from workers.null.dispatch.ledger import DEFAULT_MAX_SESSIONS

# Jobs replayed (over all sets) from which a line says what is under way before any progress.
_LONG_REPLAY = 20_000


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem, exit 2 (no usage dump to read through)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


# -- flag values ---------------------------------------------------------------------


def _listed(one: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [item.strip() for item in text.split(",")]
        if not items or any(not item for item in items):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma list of {what}; write e.g. {_example(what)}"
            ) from None
        try:
            return [one(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma list of {what}; write e.g. {_example(what)}"
            ) from None

    return parse


def _example(what: str) -> str:
    return {
        Kind.NUMBER.value: "0.5,1",
        Kind.WHOLE.value: "1,5,20",
        Kind.SECONDS_OR_OFF.value: "10,60,off",
        Kind.SPAN.value: "60 or 30:90,120",
        Kind.WHOLE_OR_NONE.value: "10,none",
    }.get(what, "1,2")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _off_or_seconds(text: str) -> float | None:
    return None if text.lower() in ("off", "none", "unset") else _finite(text)


def _whole_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "off", "unlimited") else int(text)


def _span(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    return (_finite(low), _finite(high)) if sep else (_finite(low), _finite(low))


# How one value of each kind of parameter is read from a comma list; a span's flag shows its shape.
_PARSE: dict[Kind, Callable[[str], Any]] = {
    Kind.NUMBER: _finite,
    Kind.WHOLE: int,
    Kind.SECONDS_OR_OFF: _off_or_seconds,
    Kind.SPAN: _span,
    Kind.WHOLE_OR_NONE: _whole_or_none,
}
_METAVAR = {Kind.SPAN: "S|MIN:MAX"}


def _fields(text: str, count: int, names: str, example: str) -> list[float]:
    parts = text.split(":")
    try:
        values = [_finite(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"{text!r} is not {names}; write e.g. {example}")
    return values


def _poisson(text: str) -> tuple[float, float]:
    rate, seconds = _fields(text, 2, "RATE_PER_S:SECONDS", "0.5:3600")
    if rate <= 0 or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the rate and the seconds must be > 0; write e.g. 0.5:3600")
    return rate, seconds


def _diurnal(text: str) -> tuple[float, float]:
    peak, hours = _fields(text, 2, "PEAK_RATE_PER_S:HOURS", "2:24")
    if peak <= 0 or hours <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the peak rate and the hours must be > 0; write e.g. 2:24")
    return peak, hours


def _bursts(text: str) -> tuple[int, int, float]:
    count, size, gap = _fields(text, 3, "COUNT:SIZE:GAP_S", "5:20:600")
    if count < 1 or size < 1 or gap < 0 or count != int(count) or size != int(size):
        raise argparse.ArgumentTypeError(
            f"{text!r}: COUNT and SIZE must be whole numbers >= 1 and GAP_S >= 0; write e.g. 5:20:600"
        )
    return int(count), int(size), gap


def _job_seconds(text: str) -> JobSeconds:
    low, sep, high = text.partition(":")
    try:
        if not sep:
            mean = _finite(low)
            if mean < 0:
                raise ValueError(text)
            return JobSeconds(mean=mean)
        lo, hi = _finite(low), _finite(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MEAN or MIN:MAX seconds; write e.g. 10 or 5:60") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= MIN <= MAX; write e.g. 5:60")
    return JobSeconds(mean=None, low=lo, high=hi)


# -- the parser ------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m lib.planner",
        description=(
            "Replay a job trace through the stand-in's scaling model and report, per parameter set, "
            "how long jobs wait for a worker and what the workers cost. Every parameter flag takes a "
            "comma list; the planner runs the cross product."
        ),
        formatter_class=DefaultsShown,
    )
    group = parser.add_argument_group("trace (a file, or one or more generators)")
    group.add_argument(
        "--trace", type=Path, help="CSV with a header or JSON lines with arrival and duration; or a dispatcher job log"
    )
    group.add_argument("--poisson", type=_poisson, metavar="RATE_PER_S:SECONDS", help="steady Poisson arrivals")
    group.add_argument(
        "--diurnal", type=_diurnal, metavar="PEAK_RATE_PER_S:HOURS", help="rate from 0 at midnight to PEAK at noon"
    )
    group.add_argument("--bursts", type=_bursts, metavar="COUNT:SIZE:GAP_S", help="SIZE jobs at once, COUNT times")
    group.add_argument(
        "--job-seconds",
        type=_job_seconds,
        default=JobSeconds(mean=10.0),
        metavar="MEAN|MIN:MAX",
        help="generated job length: exponential around MEAN, or uniform (default: mean 10)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for generated traces and cold-start draws")

    endpoint = parser.add_argument_group("endpoint parameters (Vast's names, as the stand-in's flags; comma lists)")
    rest = parser.add_argument_group("workers, dispatcher and prices (comma lists)")
    for param in PARAMS:
        group = endpoint if param.vast is not None else rest
        group.add_argument(
            param.flag,
            dest=param.name,
            type=_listed(_PARSE[param.kind], param.kind.value),
            default=[param.default],
            metavar=_METAVAR.get(param.kind, param.flag[2:].replace("-", "_").upper()),
            help=param.help,
        )
        if param.name == "cold_start":
            # Not swept: the measured cold starts, beside the cold start they come before.
            group.add_argument(
                "--cold-starts",
                type=Path,
                metavar="FILE",
                help="a measured run's cold starts, seconds one per line, for new workers in the order they are "
                "provisioned; later ones draw from --cold-start (a resumed worker takes --resume)",
            )

    group = parser.add_argument_group("output")
    group.add_argument("--max-p95-wait", type=float, metavar="S", help="pick the cheapest set with p95 wait <= S")
    group.add_argument("--json", type=Path, metavar="FILE", help="write every result as JSON")
    group.add_argument("--plot", type=Path, metavar="FILE.png|.svg", help="Pareto front and the chosen set's timeline")
    group.add_argument(
        "--jobs-out",
        type=Path,
        metavar="FILE",
        help="write each job's wait per set as CSV: set,job,arrival,duration,wait (set and job count from 1)",
    )
    group.add_argument(
        "--processes", type=int, default=0, help="processes for a sweep (default 0: one per core, for >1 set)"
    )
    return parser


# -- from flags to plans ----------------------------------------------------------------


def read_cold_starts(path: Path) -> tuple[float, ...]:
    """The seconds in a --cold-starts file, one per line (blank lines and # comments skipped); TraceError if bad."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TraceError(f"--cold-starts {path}: no such file; give a file of seconds, one per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"--cold-starts {path}: cannot read it ({exc}); give a text file of seconds") from None
    found = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise TraceError(f"--cold-starts {path} line {number}: {text!r} is not seconds >= 0; one number per line")
        found.append(seconds)
    if not found:
        raise TraceError(f"--cold-starts {path}: no cold starts in it; give seconds, one per line")
    return tuple(found)


def plans_from(args: argparse.Namespace, cold_start_each: tuple[float, ...] = ()) -> list[Plan]:
    """One plan per combination of the flags' comma lists, the first flag varying slowest."""
    names = [param.name for param in PARAMS]
    return [
        Plan.of(dict(zip(names, values, strict=True)), cold_start_each=cold_start_each)
        for values in itertools.product(*(getattr(args, name) for name in names))
    ]


def jobs_from(args: argparse.Namespace) -> tuple[list[Job], str]:
    """The trace and a line describing where it came from; TraceError on bad input."""
    generators = [name for name in ("poisson", "diurnal", "bursts") if getattr(args, name) is not None]
    if args.trace is not None and generators:
        raise TraceError(f"--trace and --{generators[0]} both give a trace; pass one or the other")
    if args.trace is not None:
        jobs = load_trace(args.trace)
        return jobs, f"{args.trace}: {describe(jobs)}"
    if not generators:
        raise TraceError("no trace; pass --trace FILE, or generate one with --poisson, --diurnal or --bursts")
    rng = random.Random(args.seed)
    jobs: list[Job] = []
    names = []
    if args.poisson is not None:
        jobs += poisson(*args.poisson, args.job_seconds, rng)
        names.append(f"poisson {args.poisson[0]:g}/s for {args.poisson[1]:g}s")
    if args.diurnal is not None:
        jobs += diurnal(*args.diurnal, args.job_seconds, rng)
        names.append(f"diurnal peak {args.diurnal[0]:g}/s over {args.diurnal[1]:g}h")
    if args.bursts is not None:
        jobs += bursts(*args.bursts, args.job_seconds, rng)
        names.append(f"{args.bursts[0]} bursts of {args.bursts[1]} every {args.bursts[2]:g}s")
    if not jobs:
        raise TraceError("the generated trace has no jobs; raise the rate or the length")
    jobs.sort(key=lambda j: j.arrival)
    source = f"{' + '.join(names)}, jobs {args.job_seconds.describe()}, seed {args.seed}"
    return jobs, f"{source}: {describe(jobs)}"


# -- what is printed ----------------------------------------------------------------------


def _figure(value: float) -> str:
    """Two decimals, or three significant digits for small figures so a short trace does not show 0.00."""
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def format_table(results: Sequence[Result], front: Sequence[int], chosen: int | None) -> str:
    dicts = [r.plan.as_dict() for r in results]
    varying = [param for param in PARAMS if len({flag_value(d[param.name]) for d in dicts}) > 1]
    head = ["set", *(param.column for param in varying)]
    head += ["jobs", "p50 s", "p95 s", "p99 s", "max s", "cold", "peak", "billed h", "busy h", "cost", ""]
    rows = []
    for i, (r, d) in enumerate(zip(results, dicts, strict=False)):
        w = r.wait_stats()
        mark = ("chosen " if i == chosen else "") + ("pareto" if i in front else "")
        rows.append(
            [
                str(i + 1),
                *(flag_value(d[param.name]) for param in varying),
                str(r.jobs),
                f"{w['p50']:.1f}",
                f"{w['p95']:.1f}",
                f"{w['p99']:.1f}",
                f"{w['max']:.1f}",
                str(r.cold_starts),
                str(r.peak_workers),
                _figure(r.billed_worker_s / 3600),
                _figure(r.busy_worker_s / 3600),
                _figure(r.cost),
                mark.strip(),
            ]
        )
    widths = [max(len(row[c]) for row in [head, *rows]) for c in range(len(head))]
    lines = ["  ".join(cell.rjust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in [head, *rows]]
    if not varying:
        return "\n".join(lines)
    fixed = [f"{param.flag} {flag_value(dicts[0][param.name])}" for param in PARAMS if param not in varying]
    return "\n".join(lines) + "\nsame in every set: " + " ".join(fixed)


def format_choice(result: Result, max_p95: float) -> str:
    d = result.plan.as_dict()
    w = result.wait_stats()
    lines = [
        f"cheapest set with p95 wait <= {max_p95:g}s: cost {result.cost:.2f}, p95 wait {w['p95']:.1f}s, "
        f"{result.cold_starts} cold starts, at most {result.peak_workers} workers",
        "set on the endpoint:",
    ]
    # In EndpointParams' order, as the stand-in lists them.
    lines += [f"  {BY_NAME[f.name].vast} = {flag_value(d[f.name])}" for f in fields(EndpointParams)]
    flags = " ".join(f"{param.flag} {flag_value(d[param.name])}" for param in ENDPOINT)
    lines.append(f"  (the stand-in: python -m lib.standin {flags})")
    if result.plan.max_sessions is not None:
        lines.append(f"run the dispatcher with --max-sessions {result.plan.max_sessions}")
    else:
        # Uncapped here; a dispatcher capped at the most sessions this replay had alive opens the same ones.
        sessions = max(result.peak_sessions, 1)
        fewer = f"; its default, {DEFAULT_MAX_SESSIONS}, would open fewer" if sessions > DEFAULT_MAX_SESSIONS else ""
        lines.append(
            f"run the dispatcher with --max-sessions {sessions} or more: the most sessions alive at once here{fewer}"
        )
    return "\n".join(lines)


def results_json(results: Sequence[Result], front: Sequence[int], chosen: int | None, source: str) -> dict[str, Any]:
    return {
        "trace": source,
        "results": [r.as_dict() for r in results],
        "pareto": list(front),
        "chosen": chosen,
    }


def write_jobs(path: Path, jobs: Sequence[Job], results: Sequence[Result]) -> None:
    """Each job's wait for a worker under each set, one CSV row per job and set, in arrival order."""
    with open(path, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["set", "job", "arrival", "duration", "wait"])
        for number, result in enumerate(results, start=1):
            for index, (job, wait) in enumerate(zip(jobs, result.waits, strict=True), start=1):
                writer.writerow([number, index, f"{job.arrival:.6f}", f"{job.duration:.6f}", f"{wait:.6f}"])


# -- main ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    # The book's warnings (a worker errored, say) would mean the model went
    # somewhere the planner did not mean it to: shown, one line each.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.max_p95_wait is not None and not (args.max_p95_wait >= 0 and math.isfinite(args.max_p95_wait)):
        parser.error(f"--max-p95-wait {args.max_p95_wait:g} must be seconds >= 0")
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg"):
        parser.error(f"--plot {args.plot}: name a .png or .svg file")
    if args.processes < 0:
        parser.error(f"--processes {args.processes} must be >= 0 (0: one per core)")
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--jobs-out", args.jobs_out)):
        problem = output_file_problem(flag, path)
        if problem:
            parser.error(problem)
    try:
        each = read_cold_starts(args.cold_starts) if args.cold_starts is not None else ()
    except TraceError as exc:
        parser.error(str(exc))
    plans = plans_from(args, each)
    for i, plan in enumerate(plans):
        problems = plan.problems()
        if problems:
            where = f"parameter set {i + 1} of {len(plans)}: " if len(plans) > 1 else ""
            parser.error(where + "; ".join(problems))
    try:
        jobs, source = jobs_from(args)
    except TraceError as exc:
        parser.error(str(exc))
    print(f"trace: {source}", flush=True)
    processes = args.processes or default_processes()
    if len(jobs) * len(plans) >= _LONG_REPLAY:
        # A set of many jobs takes a while before the first progress line.
        sets = f"{len(plans)} parameter set{'s' if len(plans) > 1 else ''}"
        print(f"replaying {sets} over {len(jobs)} jobs on {min(processes, len(plans))} process(es)...", file=sys.stderr)
    try:
        with sigterm_as_ctrl_c():  # the sweep's processes are stopped either way
            results = run_sweep(jobs, plans, seed=args.seed, processes=processes, progress=Progress())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    front = pareto_front(results)
    chosen = cheapest_within(results, args.max_p95_wait) if args.max_p95_wait is not None else None
    print(format_table(results, front, chosen))
    status = 0
    if args.max_p95_wait is not None:
        if chosen is None:
            best = min(range(len(results)), key=lambda i: results[i].wait_stats()["p95"])
            print(
                f"no set keeps p95 wait <= {args.max_p95_wait:g}s (the best is set {best + 1} at "
                f"{results[best].wait_stats()['p95']:.1f}s); allow more workers, cold workers or a min_load"
            )
            status = 1
        else:
            print(format_choice(results[chosen], args.max_p95_wait))
    if args.json is not None:
        args.json.write_text(json.dumps(results_json(results, front, chosen, source), indent=1) + "\n")
        print(f"results written to {args.json}")
    if args.jobs_out is not None:
        write_jobs(args.jobs_out, jobs, results)
        print(f"per-job waits written to {args.jobs_out}")
    if args.plot is not None:
        from lib.planner.plot import plot_results

        shown = chosen if chosen is not None else min(front, key=lambda i: results[i].wait_stats()["p95"])
        if len(jobs) >= _LONG_REPLAY:
            print(f"replaying set {shown + 1} again for its timeline...", file=sys.stderr)
        replay = Progress()
        try:
            with sigterm_as_ctrl_c():
                timeline = simulate(
                    jobs,
                    results[shown].plan,
                    seed=args.seed,
                    record=True,
                    progress=lambda n: replay(0, 1, n / len(jobs)),
                )
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        replay(1, 1, 1.0)
        plot_results(args.plot, results, front, shown, timeline, source)
        print(f"plot written to {args.plot} (timeline of set {shown + 1})")
    return status
