"""``python -m workers.null.dispatcher``: the dispatcher's command line.

    python -m workers.null.dispatcher --queue nats://host:4222/jobs --endpoint NAME --instance prod
    python -m workers.null.dispatcher --queue URL setup        # create the stream and consumer when missing

``add_dispatch_arguments`` and ``dispatch_problems`` are the flags a run of the
dispatcher takes, shared with the local demo (``python -m lib.demo``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from workers.null.cli import (
    DefaultsShown,
    Interrupt,
    OneLineParser,
    StartupError,
    missing_api_key,
    positive,
    refuse_first,
    run_command,
)
from workers.null.cli import configure_logging as configure_command_logging
from workers.null.dispatch import sdk
from workers.null.dispatch.dispatcher import (
    CONNECT_TIMEOUT,
    Dispatcher,
    DispatchOptions,
    connect_queue,
    dispatch_until_stopped,
    jobs_log,
)
from workers.null.dispatch.joblog import JobLog
from workers.null.dispatch.ledger import Attempt, Ledger
from workers.null.protocol import MAX_DELIVERIES

PROG = "python -m workers.null.dispatcher"
# Flags of the local demo, which is a command of its own.
DEMO_FLAGS = ("--jobs", "--job-seconds", "--trace", "--chaos", "--deadline", "--cold-start", "--fleet-log")


def add_dispatch_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a dispatcher's run: its sessions, the queue's window and attempts, what it writes and shows."""
    defaults = DispatchOptions()
    parser.add_argument(
        "--max-sessions", type=int, default=defaults.max_sessions, help="sessions (so workers) at most at once"
    )
    parser.add_argument(
        "--lifetime", type=float, default=defaults.lifetime, help="session lease in seconds; the consumer renews it"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help="seconds a session waits for a worker before it is asked again",
    )
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=30.0,
        help="the queue's claim window in seconds (setup, and lost-worker timing)",
    )
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=MAX_DELIVERIES,
        help="the consumers' --max-deliveries; setup sets SQS's redrive backstop from it",
    )
    parser.add_argument(
        "--reconcile", type=float, default=defaults.reconcile_every, help="seconds between reads of the queue's counts"
    )
    parser.add_argument(
        "--health-every",
        type=float,
        default=defaults.health_every,
        help="seconds between checks that a worker still holds its session",
    )
    parser.add_argument("--job-log", type=Path, metavar="FILE", help="append one JSON line per job attempt here")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    parser.add_argument("--plain", action="store_true", help="log lines even on a terminal (no live view)")
    parser.add_argument("--verbose", action="store_true", help="also show the SDK's own log lines")


def dispatch_problems(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """The checks of ``add_dispatch_arguments``'s flags, as ``(ok, message)``."""
    return [
        (args.max_sessions >= 1, f"--max-sessions {args.max_sessions}: give 1 or more"),
        (positive(args.lifetime), f"--lifetime {args.lifetime:g}: give seconds > 0"),
        (positive(args.timeout), f"--timeout {args.timeout:g}: give seconds > 0"),
        (positive(args.ack_wait), f"--ack-wait {args.ack_wait:g}: give seconds > 0"),
        (args.max_deliveries >= 1, f"--max-deliveries {args.max_deliveries}: give 1 or more"),
        (positive(args.reconcile), f"--reconcile {args.reconcile:g}: give seconds > 0"),
        (positive(args.health_every), f"--health-every {args.health_every:g}: give seconds > 0"),
        (
            args.metrics_port is None or 0 <= args.metrics_port <= 65535,
            f"--metrics-port {args.metrics_port}: give a port 0-65535",
        ),
    ]


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        usage="%(prog)s --queue URL [--endpoint NAME] [--instance ...] [options] [run | setup]",
        description=(
            "Open one Vast session per queued job, so the autoscaler runs exactly as many workers as there "
            "are jobs no worker took yet. setup: create the stream and its durable consumer (or group) when "
            "missing, then exit. Ctrl-C: open no more sessions, let running jobs finish, exit 0; a second "
            "Ctrl-C closes them now. The whole loop on this machine, with no Vast account: python -m lib.demo."
        ),
        formatter_class=DefaultsShown,
    )
    parser.add_argument("action", nargs="?", choices=("run", "setup"), default="run", help="what to do")
    parser.add_argument(
        "--queue", metavar="URL", help="nats://host:4222/STREAM or redis://host:6379/0?stream=jobs&group=null"
    )
    parser.add_argument("--endpoint", default=sdk.DEFAULT_ENDPOINT, help="the Vast endpoint's name")
    parser.add_argument(
        "--instance", choices=sdk.INSTANCES, default="prod", help="Vast autoscaler to use; local: the stand-in"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        help="seconds to keep trying to reach the queue server at start before exiting 2",
    )
    parser.add_argument(
        "--local-port",
        type=int,
        default=sdk.DEFAULT_LOCAL_PORT,
        help="with --instance local: the port of the stand-in (python -m lib.standin) on 127.0.0.1",
    )
    add_dispatch_arguments(parser)
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    checks = [
        (
            args.queue is not None,
            "no --queue: pass --queue nats://host:4222/jobs (or run python -m lib.demo for the whole loop here)",
        ),
        *dispatch_problems(args),
        (positive(args.connect_timeout), f"--connect-timeout {args.connect_timeout:g}: give seconds > 0"),
        (0 <= args.local_port <= 65535, f"--local-port {args.local_port}: give a port 0-65535"),
    ]
    refuse_first(parser, checks)


def options_from_args(args: argparse.Namespace) -> DispatchOptions:
    return DispatchOptions(
        max_sessions=args.max_sessions,
        lifetime=args.lifetime,
        timeout=args.timeout,
        reconcile_every=args.reconcile,
        health_every=args.health_every,
    )


def configure_logging(*, live: bool, verbose: bool, also: Sequence[str] = ()) -> None:
    configure_command_logging(["workers.null.dispatcher", *also], verbose=verbose)
    # sdk.make_client's subclass logs under its class name: every ended session's health check at ERROR.
    logging.getLogger("Client").setLevel(logging.INFO if verbose else logging.CRITICAL)
    if live:
        jobs_log.setLevel(logging.WARNING)
        logging.getLogger("lib").setLevel(logging.WARNING)


async def run(args: argparse.Namespace, api_key: str) -> int:
    """The dispatcher against a queue and a Vast endpoint (or a stand-in already running)."""
    from workers.null.dispatch.view import ViewTicker

    interrupt = Interrupt(
        first="stopping: no new sessions; running jobs finish first (Ctrl-C again closes their sessions now)",
        again="closing every session now",
    )
    interrupt.install()
    job_log = JobLog(args.job_log)
    ledger = None
    try:
        async with AsyncExitStack() as stack:
            queue = await connect_queue(
                args.queue,
                ack_wait=args.ack_wait,
                max_deliveries=args.max_deliveries,
                setup=args.action == "setup",
                connect_timeout=args.connect_timeout,
            )
            stack.push_async_callback(queue.close)
            if args.action == "setup":
                ready = f"AckWait {args.ack_wait:g}s, {args.max_deliveries} deliveries at most"
                print(f"{args.queue}: stream and consumer ready ({ready})")
                return 0
            url = None
            if args.instance == "local":
                url = f"http://127.0.0.1:{args.local_port}"
            client = sdk.make_client(api_key, args.instance, url)
            stack.push_async_callback(client.close)
            routing_stop = asyncio.Event()
            finished, endpoint = await interrupt.race(sdk.find_endpoint(client, args.endpoint, routing_stop))
            if not finished:
                return 0
            ledger, metrics = start_records(args, job_log, stack, args.ack_wait)
            dispatcher = Dispatcher(queue, endpoint, options_from_args(args), ledger, routing_stop=routing_stop)
            stack.push_async_callback(dispatcher.aclose)
            ticker = ViewTicker(ledger, live=is_live(args), metrics=metrics)
            stack.push_async_callback(ticker.stop)
            await dispatcher.start()
            ticker.start()
            return await dispatch_until_stopped(dispatcher, interrupt)
    finally:
        job_log.close(ledger)
        interrupt.uninstall()


def start_records(args: argparse.Namespace, job_log: JobLog, stack: Any, ack_wait: float) -> tuple[Ledger, Any]:
    """Opens the job log, starts the metrics server if asked (stopped with ``stack``); a ledger writing to both."""
    from workers.null.dispatch.metrics import Metrics

    try:
        job_log.open()
    except OSError as exc:
        raise StartupError(f"--job-log {args.job_log}: {exc.strerror}: give a writable file", code=2) from None
    metrics = Metrics.start(args.metrics_port, args.metrics_host) if args.metrics_port is not None else None
    if metrics is not None:
        stack.callback(metrics.stop)
    return Ledger(ack_wait=ack_wait, on_attempt=_recorder(job_log, metrics)), metrics


def _recorder(job_log: JobLog, metrics: Any) -> Any:
    def record(row: Attempt) -> None:
        job_log.write(row)
        if metrics is not None:
            metrics.attempt(row)

    return record


def is_live(args: argparse.Namespace) -> bool:
    """The live one-line view: on a terminal, unless --plain."""
    return not args.plain and sys.stdout.isatty()


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = build_arg_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag in argv:
        if flag.split("=", 1)[0] in DEMO_FLAGS:
            parser.error(f"{flag.split('=', 1)[0]} is a flag of the local demo: run python -m lib.demo {flag} ...")
    args = parser.parse_args(argv)
    _validate(args, parser)
    if args.instance == "local":
        api_key = sdk.LOCAL_API_KEY
    else:
        api_key = (env.get("VAST_API_KEY") or "").strip()
        if not api_key and args.action == "run":
            return missing_api_key(parser.prog, args.instance, "python -m lib.demo")
    configure_logging(live=is_live(args), verbose=args.verbose)
    return run_command(parser.prog, run(args, api_key))
