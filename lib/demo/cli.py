"""``python -m lib.demo``: the whole queue loop on this machine, with no Vast account.

python -m lib.demo                      # 20 jobs of 2 s each
python -m lib.demo --jobs 50 --chaos 3  # and SIGKILL three workers mid-job
python -m lib.demo --trace jobs.csv     # jobs at their arrival, each its duration
python -m lib.demo --sessions 3         # sessions only: the session client against the stand-in
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from workers.null.cli import DefaultsShown, OneLineParser, non_negative, positive, refuse_first, run_command
from workers.null.dispatch.cli import add_dispatch_arguments, configure_logging, dispatch_problems, is_live

PROG = "python -m lib.demo"
DEFAULT_JOBS = 20


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Run the whole queue loop on this machine: an embedded nats-server, the local stand-in for Vast "
            "Serverless with a consumer beside every worker, and the real dispatcher. It publishes the jobs, "
            "waits until every one is acked or dead-lettered and the fleet is back at zero, stops everything it "
            "started and prints a summary. Ctrl-C stops everything. With --sessions: open, hold and close that "
            "many sessions through the SDK instead, with no queue."
        ),
        formatter_class=DefaultsShown,
    )
    jobs = parser.add_argument_group("the jobs")
    jobs.add_argument(
        "--jobs", type=int, help=f"publish this many demo jobs and run them all (default: {DEFAULT_JOBS})"
    )
    jobs.add_argument("--job-seconds", type=float, default=2.0, help="seconds each demo job sleeps")
    jobs.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="publish jobs at their arrival, each sleeping its duration (CSV, JSON lines or a job log)",
    )
    jobs.add_argument("--chaos", type=int, default=0, metavar="K", help="SIGKILL K workers (and consumers) mid-job")
    jobs.add_argument(
        "--deadline", type=float, help="seconds until an unfinished job counts as lost (default: generous)"
    )
    standin = parser.add_argument_group("the stand-in")
    standin.add_argument(
        "--cold-start", type=float, default=2.0, help="seconds the stand-in takes to provision a worker"
    )
    standin.add_argument(
        "--inactivity-timeout", type=float, default=3.0, help="the stand-in's idle seconds before a worker stops"
    )
    standin.add_argument(
        "--fleet-log",
        type=Path,
        metavar="FILE",
        help="at the end, write each worker's phases over time and the stand-in's settings here (JSON)",
    )
    sessions = parser.add_argument_group("sessions only (--sessions)")
    sessions.add_argument("--sessions", type=int, metavar="N", help="open N sessions through the SDK, with no queue")
    sessions.add_argument("--hold", type=float, default=4.0, help="seconds to hold each session")
    sessions.add_argument("--interval", type=float, default=1.0, help="seconds between one session and the next")
    dispatcher = parser.add_argument_group("the dispatcher")
    add_dispatch_arguments(dispatcher)
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    checks = [
        *dispatch_problems(args),
        (args.jobs is None or args.jobs >= 1, f"--jobs {args.jobs}: give 1 or more"),
        (args.jobs is None or args.trace is None, "give --jobs or --trace, not both"),
        (non_negative(args.job_seconds), f"--job-seconds {args.job_seconds:g}: give seconds >= 0"),
        (args.chaos >= 0, f"--chaos {args.chaos}: give 0 or more workers to kill"),
        (args.deadline is None or positive(args.deadline), f"--deadline {args.deadline}: give seconds > 0"),
        (non_negative(args.cold_start), f"--cold-start {args.cold_start:g}: give seconds >= 0"),
        (
            non_negative(args.inactivity_timeout),
            f"--inactivity-timeout {args.inactivity_timeout:g}: give seconds >= 0",
        ),
        (args.sessions is None or args.sessions >= 1, f"--sessions {args.sessions}: give 1 or more"),
        (
            args.sessions is None or (args.jobs is None and args.trace is None and not args.chaos),
            "--sessions opens sessions with no queue: drop --jobs, --trace and --chaos (or drop --sessions)",
        ),
        (non_negative(args.hold), f"--hold {args.hold:g}: give seconds >= 0"),
        (non_negative(args.interval), f"--interval {args.interval:g}: give seconds >= 0"),
    ]
    refuse_first(parser, checks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    if args.jobs is None and args.trace is None:
        args.jobs = DEFAULT_JOBS
    configure_logging(
        live=is_live(args) and args.sessions is None, verbose=args.verbose, also=["lib.demo", "workers.null.client"]
    )
    if args.sessions is not None:
        from lib.demo.sessions import run_sessions

        return run_command(PROG, run_sessions(args))
    from lib.demo.run import run_demo

    return run_command(PROG, run_demo(args))
