"""``python -m workers.null.consumer --queue URL -- COMMAND [ARGS]``: the consumer's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from workers.null.cli import DefaultsShown, OneLineParser
from workers.null.consumer.options import ConsumerError, ConsumerOptions, control_port_from_env, default_name
from workers.null.consumer.runs import command_runs, handler_runs, load_handler
from workers.null.consumer.serve import check_command, open_consumer_queue, serve
from workers.null.queues import masked

log = logging.getLogger("workers.null.consumer")


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = ConsumerOptions(name="HOST-PID")
    parser = OneLineParser(
        prog="python -m workers.null.consumer",
        usage="%(prog)s --queue URL [options] (-- COMMAND [ARGS] | --handler module:function)",
        description=(
            "For each session the worker beside it is reserved for, take one job from the queue, run it, "
            "ack it (or retry / dead-letter it), then release the worker. SIGTERM: no new session, the "
            "running job gets --grace seconds, exit 0."
        ),
        formatter_class=DefaultsShown,
    )
    parser.add_argument(
        "--queue", required=True, metavar="URL", help="nats://host:4222/STREAM or redis://host:6379/0?stream=S&group=G"
    )
    parser.add_argument(
        "--handler", metavar="MODULE:FUNCTION", help="call this Python function with each job instead of COMMAND"
    )
    parser.add_argument(
        "--claim-timeout",
        type=float,
        default=defaults.claim_timeout,
        help="seconds to wait for a job once a session is held; none: release at once",
    )
    parser.add_argument(
        "--retry-delay",
        type=float,
        default=defaults.retry_delay,
        help="seconds before a job that failed once is delivered again (less up to half, at random)",
    )
    parser.add_argument(
        "--retry-backoff", type=float, default=defaults.retry_backoff, help="each further failure multiplies the delay"
    )
    parser.add_argument("--retry-max", type=float, default=defaults.retry_max, help="the longest delay, in seconds")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=defaults.max_attempts,
        help="a job that fails this many times is dead-lettered; lost leases and hand-backs do not count",
    )
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=defaults.max_deliveries,
        help="a delivery past this number is dead-lettered unrun, whatever ended the earlier ones (crash loops)",
    )
    parser.add_argument(
        "--no-events",
        dest="events",
        action="store_false",
        help="publish no job events: the dispatcher then learns of each job's end from the queue and the workers",
    )
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=None,
        help="the queue's claim window in seconds, as the dispatcher set it (default: the queue's own)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace,
        help="seconds a running job gets after SIGTERM before it is stopped and handed back",
    )
    parser.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="the worker's control port (default: NULL_CONTROL_PORT, else 18999)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=defaults.health_port,
        help="serve GET /health on 127.0.0.1 at this port for BACKEND_HEALTH_URL (0: a free port, logged)",
    )
    parser.add_argument("--name", default=None, help="this consumer's name on the queue (default: HOST-PID)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(our flags, COMMAND) split at the first ``--``."""
    argv = list(argv)
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s consumer %(levelname)s %(message)s"
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = build_arg_parser()
    flags, command = split_command(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(flags)
    try:
        if args.handler and command:
            raise ConsumerError("both --handler and a COMMAND: give one of them")
        if args.handler:
            runs = handler_runs(load_handler(args.handler))
        else:
            check_command(command)
            runs = command_runs(command)
        options = ConsumerOptions(
            claim_timeout=args.claim_timeout,
            retry_delay=args.retry_delay,
            retry_backoff=args.retry_backoff,
            retry_max=args.retry_max,
            max_attempts=args.max_attempts,
            max_deliveries=args.max_deliveries,
            events=args.events,
            ack_wait=args.ack_wait,
            grace=args.grace,
            control_port=control_port_from_env(env) if args.control_port is None else args.control_port,
            health_port=args.health_port,
            name=args.name if args.name is not None else default_name(),
        )
        problems = options.problems()
        if problems:
            parser.error(problems[0])
        queue = open_consumer_queue(args.queue, args.ack_wait, args.max_deliveries)
        configure_logging(args.verbose)
        return asyncio.run(serve(queue, runs, options, label=masked(args.queue)))
    except ConsumerError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop took over SIGINT: nothing was claimed yet
        return 0
