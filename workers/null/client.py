"""``python -m workers.null.client``: open, hold and close null-worker sessions through the vastai SDK.

``python -m workers.null.client --instance local --count 3`` opens three
sessions one second apart, holds each for a few seconds and closes each with
``/session/end``, against the local stand-in (started in-process when none
answers on 127.0.0.1:8080). The work is in ``sessionclient.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from .cli import (
    DefaultsShown,
    OneLineParser,
    configure_logging,
    missing_api_key,
    non_negative,
    positive,
    refuse_first,
    run_command,
)

INSTANCES = ("prod", "alpha", "candidate", "local")
DEFAULT_ENDPOINT = "null-pyworker"  # the stand-in serves this name by default
LOCAL_API_KEY = "local"  # the stand-in's default key
DEFAULT_LOCAL_PORT = 8080  # where the SDK's instance="local" looks for the autoscaler


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m workers.null.client",
        description=(
            "Open COUNT null-worker sessions through the vastai SDK, INTERVAL seconds apart, hold each "
            "HOLD seconds and close each with /session/end. Exit 0 only when every session was reserved "
            "and released; Ctrl-C closes the open ones and exits 130."
        ),
        formatter_class=DefaultsShown,
    )
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="endpoint name")
    parser.add_argument(
        "--instance",
        choices=INSTANCES,
        default="local",
        help="Vast autoscaler to use; local: the stand-in on 127.0.0.1, started in-process when none answers",
    )
    parser.add_argument("--count", type=int, default=1, help="sessions to open")
    parser.add_argument("--hold", type=float, default=4.0, help="seconds to hold each session")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between opening one session and the next")
    parser.add_argument("--cost", type=float, default=100.0, help="session cost; 100 = one null worker")
    parser.add_argument(
        "--lifetime",
        type=float,
        default=60.0,
        help="session lease in seconds; holds longer than this renew it every lifetime/3 seconds",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each reservation")
    parser.add_argument(
        "--local-port",
        type=int,
        default=DEFAULT_LOCAL_PORT,
        help="with --instance local: the stand-in's port on 127.0.0.1 (0: always start a private one on a free port)",
    )
    parser.add_argument("--verbose", action="store_true", help="also show the SDK's own log lines")
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    checks = (
        (args.count >= 1, f"--count {args.count}: give 1 or more sessions"),
        (non_negative(args.hold), f"--hold {args.hold:g}: give seconds >= 0"),
        (non_negative(args.interval), f"--interval {args.interval:g}: give seconds >= 0"),
        (
            positive(args.cost),
            f"--cost {args.cost:g}: give a number > 0 (a session fills one worker whatever its cost; 100 = one worker)",
        ),
        (positive(args.lifetime), f"--lifetime {args.lifetime:g}: give seconds > 0"),
        (args.timeout > 0, f"--timeout {args.timeout:g}: give seconds > 0"),
        (0 <= args.local_port <= 65535, f"--local-port {args.local_port}: give a port 0-65535 (0: a free one)"),
    )
    refuse_first(parser, checks)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    if args.instance == "local":
        api_key = LOCAL_API_KEY
    else:
        api_key = (env.get("VAST_API_KEY") or "").strip()
        if not api_key:
            return missing_api_key(parser.prog, args.instance, "--instance local")
    configure_logging(["workers.null.client"], verbose=args.verbose)
    from .sessionclient import run

    return run_command(parser.prog, run(args, api_key))


if __name__ == "__main__":
    sys.exit(main())
