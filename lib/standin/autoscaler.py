"""Vast Serverless on one machine: console endpoint list, autoscaler and instances.

``python -m lib.standin`` serves, on 127.0.0.1:8080 (the SDK's
``instance="local"`` address), what the ``vastai`` SDK client and the worker
framework call, and runs real null worker processes as the scaling model in
``lib.standin.scaling`` asks. A dispatcher written against
``Serverless(instance="local")`` runs against it unchanged, apart from
pointing ``webserver_url`` at it too.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import math
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

from lib.standin.book import BookSettings
from lib.standin.fleet import Fleet, FleetSettings
from lib.standin.grants import GrantSigner
from lib.standin.params import BY_NAME, ENDPOINT, Kind, Param, flag_value
from lib.standin.scaling import EndpointParams, LocalPolicy
from workers.null.cli import DefaultsShown, OneLineParser
from workers.null.dispatch.sdk import DEFAULT_ENDPOINT, DEFAULT_LOCAL_PORT, LOCAL_API_KEY
from workers.null.protocol import SESSION_COST

log = logging.getLogger("lib.standin.autoscaler")  # also when run as __main__

HOST = "127.0.0.1"
DEFAULT_PORT = DEFAULT_LOCAL_PORT
ENDPOINT_ID = 1
USER_ID = 1


@dataclass(frozen=True)
class LocalConfig:
    fleet: FleetSettings = field(default_factory=FleetSettings)
    endpoint_name: str = DEFAULT_ENDPOINT
    # The account key: the console's endpoint list asks for it, and the
    # endpoint it lists carries it as its own key, which /route/ checks.
    api_key: str = LOCAL_API_KEY
    port: int = DEFAULT_PORT


# The fleet's cost rule, as the 422 for a cost outside it says.
COST_RULE = (
    "cost must be a finite number > 0: a held session fills its worker whatever its cost, "
    "and a cost of 0 or less is no demand, so it would never start a worker"
)


class PortInUse(OSError):
    """The stand-in's port is taken; the message names it and the fix."""


@dataclass
class LocalServerless:
    """A running stand-in: its base URL (console and autoscaler alike) and its fleet."""

    config: LocalConfig
    fleet: Fleet
    signer: GrantSigner
    url: str = ""
    created_at: float = field(default_factory=time.time)

    def endpoint_record(self) -> dict[str, Any]:
        """The endpoint as the console's /api/v0/endptjobs/ lists it."""
        return {
            "id": ENDPOINT_ID,
            "endpoint_name": self.config.endpoint_name,
            "api_key": self.config.api_key,
            "user_id": USER_ID,
            "created_at": self.created_at,
            "endpoint_state": "active",
            **asdict(self.config.fleet.book.params),  # min_load ... inactivity_timeout, under Vast's names
            # Accepted by Vast, not modelled here: no capacity is planned ahead.
            "cold_mult": None,
            "min_cold_load": None,
        }


STANDIN = web.AppKey("standin", LocalServerless)


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _account_key(request: web.Request) -> str | None:
    """The key a console call carries: the SDK sends it as a bearer token and as ``api_key``."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query.get("api_key")


def _refuse_wrong_key(request: web.Request) -> web.Response | None:
    if _account_key(request) != request.app[STANDIN].config.api_key:
        return _error(401, "no account with that API key: pass the stand-in's --api-key")
    return None


async def list_endpoints(request: web.Request) -> web.Response:
    standin = request.app[STANDIN]
    refused = _refuse_wrong_key(request)
    if refused is not None:
        return refused
    return web.json_response({"success": True, "results": [standin.endpoint_record()]})


async def get_endpoint(request: web.Request) -> web.Response:
    standin = request.app[STANDIN]
    refused = _refuse_wrong_key(request)
    if refused is not None:
        return refused
    if request.match_info["endpoint_id"] != str(ENDPOINT_ID):
        return _error(
            404, f"no endpoint {request.match_info['endpoint_id']}: this stand-in serves endpoint {ENDPOINT_ID}"
        )
    return web.json_response({"success": True, "result": standin.endpoint_record()})


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (booleans, strings, NaN, infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range
        return None
    return number if math.isfinite(number) else None


async def route(request: web.Request) -> web.Response:
    standin = request.app[STANDIN]
    body = await _json_object(request)
    if body is None:
        return _error(422, "body must be a JSON object")
    name = body.get("endpoint")
    if name != standin.config.endpoint_name:
        return _error(404, f"no endpoint named {name!r}: this stand-in serves {standin.config.endpoint_name!r}")
    if body.get("api_key") != standin.config.api_key:
        return _error(401, "api_key is not this endpoint's key")
    cost = _finite(body.get("cost", SESSION_COST))
    if cost is None or cost <= 0:
        return _error(422, COST_RULE)
    request_idx = body.get("request_idx") or 0
    if not isinstance(request_idx, int) or isinstance(request_idx, bool):
        return _error(422, "request_idx must be an integer")
    answer = await standin.fleet.route_held(cost, request_idx)
    if answer.url is None:
        # Vast's waiting answer: the endpoint and its workers by status.
        return web.json_response(
            {"request_idx": answer.request_idx, "endpoint": name, "status": standin.fleet.phase_counts()}
        )
    grant = standin.signer.grant(
        answer.url, endpoint=standin.config.endpoint_name, cost=cost, request_idx=answer.request_idx
    )
    return web.json_response(grant)


async def pubkey(request: web.Request) -> web.Response:
    return web.Response(text=request.app[STANDIN].signer.public_pem)


async def worker_status(request: web.Request) -> web.Response:
    body = await _json_object(request)
    if body is None or not isinstance(body.get("id"), int):
        return _error(422, "a report is a JSON object with an integer id")
    for name in ("cur_load", "max_perf"):
        if body.get(name) is not None and _finite(body[name]) is None:
            return _error(422, f"{name} must be a finite number")
    idxs = body.get("working_request_idxs") or []
    if not isinstance(idxs, list) or not all(isinstance(i, int) for i in idxs):
        return _error(422, "working_request_idxs must be a list of integers")
    if not request.app[STANDIN].fleet.on_report(body):
        # Answered 200 all the same: a worker left from an earlier run would
        # otherwise retry every report.
        log.debug("report from worker %s, which is not one of this stand-in's", body["id"])
    return web.json_response({})


async def delete_requests(request: web.Request) -> web.Response:
    body = await _json_object(request)
    if body is None or not isinstance(body.get("worker_id"), int) or not isinstance(body.get("requests"), list):
        return _error(422, "body must be {worker_id: int, requests: [...]}")
    items = [item for item in body["requests"] if isinstance(item, dict)]
    request.app[STANDIN].fleet.on_deleted(body["worker_id"], items)
    return web.json_response({})


async def endpoint_workers(request: web.Request) -> web.Response:
    standin = request.app[STANDIN]
    body = await _json_object(request)
    if body is None or body.get("id") != ENDPOINT_ID:
        # The SDK reads a dict with error_msg as "not ready yet" and returns [].
        return web.json_response({"error_msg": f"no endpoint with that id: this stand-in serves {ENDPOINT_ID}"})
    return web.json_response(standin.fleet.describe())


def make_app(standin: LocalServerless) -> web.Application:
    app = web.Application()
    app[STANDIN] = standin
    app.router.add_get("/api/v0/endptjobs/", list_endpoints)
    app.router.add_get("/api/v0/endptjobs/{endpoint_id}/", get_endpoint)
    app.router.add_post("/route/", route)
    app.router.add_get("/pubkey/", pubkey)
    app.router.add_post("/worker_status/", worker_status)
    app.router.add_post("/delete_requests/", delete_requests)
    app.router.add_post("/get_endpoint_workers/", endpoint_workers)
    return app


@asynccontextmanager
async def serve(config: LocalConfig, *, signer: GrantSigner | None = None) -> AsyncIterator[LocalServerless]:
    """Serves the stand-in on 127.0.0.1:``config.port`` (0: any free port) and runs its fleet.

    On exit every instance is stopped, whatever ended the block.
    """
    problems = config.fleet.problems()
    if problems:
        raise ValueError("; ".join(problems))
    standin = LocalServerless(config=config, fleet=Fleet(config.fleet), signer=signer or GrantSigner())
    # handler_cancellation: a client that goes away from a held /route/
    # cancels its handler, so its request stops counting at once.
    runner = web.AppRunner(make_app(standin), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, config.port)
        try:
            await site.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    exc.errno,
                    f"port {config.port} on {HOST} is in use (another stand-in?): stop what holds it, "
                    "or pass --port with a free port",
                ) from None
            raise
        host, port = runner.addresses[0][:2]
        standin.url = f"http://{host}:{port}"
        standin.fleet.start(standin.url)
        log.info(
            "serving endpoint %r on %s (api key %r); %s",
            config.endpoint_name,
            standin.url,
            config.api_key,
            describe_params(config.fleet),
        )
        try:
            yield standin
        finally:
            await standin.fleet.aclose()
    finally:
        await runner.cleanup()


def describe_params(settings: FleetSettings) -> str:
    shown = []
    for param in ENDPOINT:
        value = getattr(settings.book.params, param.name)
        shown.append(f"{param.vast} {flag_value(value)}{param.unit if value is not None else ''}")
    return (
        ", ".join(shown) + f", cold start {settings.provisioning_delay:g}s, "
        f"scale-down delay {settings.book.policy.scale_down_delay:g}s"
    )


# -- command line ---------------------------------------------------------------------


def seconds_or_off(text: str) -> float | None:
    if text.strip().lower() in ("off", "none", "unset"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds or 'off'") from None
    return value


def command_line(text: str) -> tuple[str, ...]:
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a command line ({exc})") from None
    if not argv:
        raise argparse.ArgumentTypeError("the command is empty: give a program and its arguments")
    return argv


def key_value(text: str) -> tuple:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return (name, value)


# How the stand-in reads one value of each kind of parameter it takes.
_PARSE = {Kind.NUMBER: float, Kind.WHOLE: int, Kind.SECONDS_OR_OFF: seconds_or_off}


def _add_param(group: argparse._ArgumentGroup, param: Param) -> None:
    group.add_argument(param.flag, dest=param.name, type=_PARSE[param.kind], default=param.default, help=param.help)


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = LocalConfig()
    book = defaults.fleet.book
    parser = OneLineParser(
        prog="python -m lib.standin",
        description=(
            "Vast Serverless on this machine: the console endpoint list, the autoscaler "
            "(/route/, /worker_status/, ...) and real null worker processes, on 127.0.0.1."
        ),
        formatter_class=DefaultsShown,
    )
    parser.add_argument(
        "--port",
        type=int,
        default=defaults.port,
        help="port on 127.0.0.1 (0: any free port); the SDK's instance='local' uses 8080",
    )
    parser.add_argument("--endpoint", default=defaults.endpoint_name, help="name of the one endpoint served")
    parser.add_argument(
        "--api-key",
        default=defaults.api_key,
        help="the account's API key: the console's endpoint list refuses others (401), and the endpoint "
        "it lists carries this key, which /route/ checks",
    )
    group = parser.add_argument_group("endpoint parameters (Vast's names)")
    # In EndpointParams' order, as the console's endpoint record lists them.
    for f in fields(EndpointParams):
        _add_param(group, BY_NAME[f.name])
    group = parser.add_argument_group("stand-in behaviour")
    group.add_argument(
        "--provisioning-delay",
        type=float,
        default=defaults.fleet.provisioning_delay,
        help="seconds from creating an instance to starting its worker (the cold start)",
    )
    _add_param(group, BY_NAME["scale_down_delay"])
    group.add_argument(
        "--assumed-perf",
        type=float,
        default=book.policy.assumed_perf,
        help="max_perf assumed for workers that have not reported yet",
    )
    group.add_argument(
        "--load-timeout",
        type=float,
        default=book.load_timeout,
        help="seconds a started worker may take to report ready before it is replaced",
    )
    _add_param(group, BY_NAME["route_hold"])
    group.add_argument(
        "--waiting-timeout",
        type=float,
        default=book.waiting_timeout,
        help="seconds a waiting request that is no longer polled still counts as demand",
    )
    group.add_argument(
        "--grant-timeout",
        type=float,
        default=book.grant_timeout,
        help="seconds a grant counts as its worker's load until the worker's reports show or end it",
    )
    group.add_argument(
        "--worker-env",
        type=key_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every worker, e.g. NULL_MAX_LIFETIME=600 (repeatable)",
    )
    group.add_argument("--python", default=sys.executable, help="interpreter that runs the workers")
    group.add_argument(
        "--consumer",
        type=command_line,
        default=None,
        metavar="CMD",
        help="a command run beside every worker, in its environment (NULL_CONTROL_PORT...) and process group, "
        "as an on-start script runs a queue consumer on Vast; split like a shell line",
    )
    group.add_argument(
        "--claim-deadline",
        type=float,
        default=defaults.fleet.claim_deadline,
        help="NULL_CLAIM_DEADLINE given to workers with a --consumer: seconds a session may go unclaimed",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING"),
        help="DEBUG adds every grant expiry and unknown report",
    )
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LocalConfig:
    params = EndpointParams(**{f.name: getattr(args, f.name) for f in fields(EndpointParams)})
    book = BookSettings(
        params=params,
        policy=LocalPolicy(scale_down_delay=args.scale_down_delay, assumed_perf=args.assumed_perf),
        load_timeout=args.load_timeout,
        grant_timeout=args.grant_timeout,
        waiting_timeout=args.waiting_timeout,
        route_hold=args.route_hold,
    )
    settings = FleetSettings(
        book=book,
        provisioning_delay=args.provisioning_delay,
        python=args.python,
        worker_env=tuple(args.worker_env),
        consumer=args.consumer,
        claim_deadline=args.claim_deadline,
    )
    problems = settings.problems()
    if problems:
        flag = problems[0].split(" ", 1)[0].replace("_", "-")
        parser.error(f"{problems[0]}: fix --{flag}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number: give 0-65535 (0: any free port)")
    return LocalConfig(fleet=settings, endpoint_name=args.endpoint, api_key=args.api_key, port=args.port)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    logging.getLogger("lib").setLevel(level)


async def run(config: LocalConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serve(config) as standin:
            log.info(
                "ready: Serverless(api_key=%r, instance='local', webserver_url=%r); Ctrl-C stops it and every worker",
                config.api_key,
                standin.url,
            )
            await stop.wait()
            log.info("stopping %d worker(s)", len(standin.fleet.instances))
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    configure_logging(args.log_level)
    try:
        return asyncio.run(run(config))
    except PortInUse as exc:
        print(f"{parser.prog}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the event loop took over Ctrl-C: no worker was started yet
        return 0
