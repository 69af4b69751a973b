"""The one door to the ``vastai`` worker framework's internals.

The framework has no public way to end a session without its grant, to report
at once, or to fix ``max_perf``; the null worker reaches for a handful of
internals instead. Each private name is written once, below, and used only
through the functions of this module. The start-up self-check is built from
the same names, so a framework that moved one is reported to the autoscaler
as an errored worker naming the installed version, rather than running with a
``/release`` that cannot work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from importlib import metadata
from typing import Any

import aiohttp

from workers.null.instance.settings import Settings

log = logging.getLogger(__name__)

TESTED_VERSION = "1.9.1"

WORKER_MODULE = "vastai.serverless.server.worker"
BACKEND_MODULE = "vastai.serverless.server.lib.backend"
METRICS_MODULE = "vastai.serverless.server.lib.metrics"
TYPES_MODULE = "vastai.serverless.server.lib.data_types"

# Private names, each written here only.
CLOSE_SESSION = "_Backend__close_session"  # Backend: ends a session without its grant
RUN_ON_CLOSE = "_Backend__run_session_on_close"  # Backend: posts a session's on-close callback
SESSIONS_LOCK = "_sessions_lock"  # Backend: guards sessions and session_metrics
PUBKEY = "_pubkey"  # Backend instance: the autoscaler's key, None until fetched
PUBKEY_FETCHED = "_Backend__pubkey_fetch_complete"  # Backend instance: set when the fetch ended
PUBKEY_FAILED = "_Backend__pubkey_failed"  # Backend instance
SEND_REPORT = "_Metrics__send_metrics_and_reset"  # Metrics: one /worker_status/ report
SEND_DELETED = "_Metrics__send_delete_requests_and_reset"  # Metrics: one /delete_requests/
REPORT_LOOP = "_send_metrics_loop"  # Metrics: the one-second report loop
MODEL_LOADED = "_model_loaded"  # Metrics: sets max_perf and readiness
MODEL_ERRORED = "_model_errored"  # Metrics: sets the sticky error_msg
REQUEST_START = "_request_start"  # Metrics: a request's load starts counting
REQUEST_SUCCESS = "_request_success"
REQUEST_END = "_request_end"  # Metrics: load stops counting; queued for /delete_requests/
REQUEST_REJECT = "_request_reject"  # Metrics: reported as "Rejected" (busy: the autoscaler routes again)

# What the worker needs of each class or module: (module, class or "", names).
_REQUIRED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (WORKER_MODULE, "", ("Worker", "WorkerConfig", "HandlerConfig", "BenchmarkConfig")),
    (WORKER_MODULE, "Worker", ("run_async",)),
    (BACKEND_MODULE, "", ("Backend", "BENCHMARK_INDICATOR_FILE")),
    (
        BACKEND_MODULE,
        "Backend",
        (
            "session_create_handler",
            "session_end_handler",
            "session_get_handler",
            "session_health_handler",
            "pyworker_update_handler",
            "session",
            CLOSE_SESSION,
            RUN_ON_CLOSE,
        ),
    ),
    (
        METRICS_MODULE,
        "Metrics",
        (
            "aclose",
            REPORT_LOOP,
            SEND_REPORT,
            SEND_DELETED,
            MODEL_LOADED,
            MODEL_ERRORED,
            REQUEST_START,
            REQUEST_SUCCESS,
            REQUEST_END,
            REQUEST_REJECT,
        ),
    ),
    (TYPES_MODULE, "", ("Session", "RequestMetrics")),
)

_DATACLASS_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        BACKEND_MODULE,
        "Backend",
        ("sessions", "session_metrics", SESSIONS_LOCK, "max_sessions", "unsecured", "mtoken", "lifecycle"),
    ),
    (
        TYPES_MODULE,
        "Session",
        (
            "session_id",
            "lifetime",
            "auth_data",
            "expiration",
            "on_close_route",
            "on_close_payload",
            "requests",
            "created_at",
            "request_idx",
        ),
    ),
    (
        TYPES_MODULE,
        "RequestMetrics",
        ("request_idx", "reqnum", "workload", "status", "success", "is_session", "entered_queue_at", "work_started_at"),
    ),
    (TYPES_MODULE, "ModelMetrics", ("error_msg", "requests_working", "requests_deleting")),
)

# Set on the Backend instance by its __post_init__, so checked once it exists.
_INSTANCE_ATTRIBUTES = ("metrics", PUBKEY, PUBKEY_FETCHED, PUBKEY_FAILED)


class FrameworkMismatch(Exception):
    def __init__(self, missing: list[str]):
        super().__init__(", ".join(missing))
        self.missing = missing


def installed_version() -> str:
    try:
        return metadata.version("vastai")
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(missing: Iterable[str]) -> str:
    return (
        f"vastai {installed_version()} is not compatible with the null worker (tested with "
        f"{TESTED_VERSION}; missing: {', '.join(missing)}); pin vastai=={TESTED_VERSION} "
        f"(SDK_VERSION={TESTED_VERSION} in the template)"
    )


def missing_internals() -> list[str]:
    """Names the framework lacks, empty when it has everything the worker uses."""
    missing: list[str] = []
    for module_name, class_name, attributes in _REQUIRED:
        try:
            owner = importlib.import_module(module_name)
        except Exception as exc:  # any import failure means the framework moved
            return [f"{module_name} ({type(exc).__name__}: {exc})"]
        if class_name:
            owner = getattr(owner, class_name, None)
            if owner is None:
                missing.append(f"{module_name}.{class_name}")
                continue
        prefix = class_name or module_name
        missing += [f"{prefix}.{name}" for name in attributes if not hasattr(owner, name)]
    for module_name, class_name, names in _DATACLASS_FIELDS:
        cls = getattr(importlib.import_module(module_name), class_name, None)
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        missing += [f"{class_name}.{name}" for name in names if name not in fields]
    return missing


def missing_instance_attributes(backend: object) -> list[str]:
    return [f"Backend().{name}" for name in _INSTANCE_ATTRIBUTES if not hasattr(backend, name)]


# -- taking over ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Originals:
    """The framework's own hooks that the worker wraps rather than replaces."""

    model_loaded: Callable[..., None]
    model_errored: Callable[[str], None]
    update_handler: Callable[..., Awaitable[Any]]


def take_over(
    backend: Any,
    *,
    create: Callable[..., Awaitable[Any]],
    end: Callable[..., Awaitable[Any]],
    get: Callable[..., Awaitable[Any]],
    health: Callable[..., Awaitable[Any]],
    update: Callable[..., Awaitable[Any]],
    close_session: Callable[[str], Awaitable[bool]],
    report_loop: Callable[[], Awaitable[None]],
    model_loaded: Callable[[float], None],
    model_errored: Callable[[str], None],
) -> Originals:
    """Points the framework's session routes, close path, report loop and model hooks at the worker's own."""
    metrics = backend.metrics
    originals = Originals(
        model_loaded=getattr(metrics, MODEL_LOADED),
        model_errored=getattr(metrics, MODEL_ERRORED),
        update_handler=backend.pyworker_update_handler,
    )
    backend.max_sessions = 1
    backend.session_create_handler = create
    backend.session_end_handler = end
    backend.session_get_handler = get
    backend.session_health_handler = health
    backend.pyworker_update_handler = update
    # The framework's /session/end and its 5-second garbage collector call
    # this; owning it keeps one close path with prompt reports.
    setattr(backend, CLOSE_SESSION, close_session)
    setattr(metrics, REPORT_LOOP, report_loop)
    setattr(metrics, MODEL_LOADED, model_loaded)
    setattr(metrics, MODEL_ERRORED, model_errored)
    return originals


# -- reports ----------------------------------------------------------------------------


async def send_report(metrics: Any) -> None:
    """One ``/worker_status/`` report now."""
    await getattr(metrics, SEND_REPORT)()


async def send_finished(metrics: Any) -> None:
    """One ``/delete_requests/`` report now, when requests have finished."""
    if metrics.model_metrics.requests_deleting:
        await getattr(metrics, SEND_DELETED)()


def open_request(metrics: Any, request: Any) -> None:
    """Its load counts from now."""
    getattr(metrics, REQUEST_START)(request)


def finish_request(metrics: Any, request: Any) -> None:
    """Served: load drops, and it is reported finished as a success."""
    getattr(metrics, REQUEST_SUCCESS)(request)
    getattr(metrics, REQUEST_END)(request)


def reject_request(metrics: Any, request: Any) -> None:
    """Busy: reported as "Rejected", which the autoscaler answers by routing it again."""
    getattr(metrics, REQUEST_REJECT)(request)


def refuse_request(metrics: Any, request: Any, status: str) -> None:
    """Refused for what it asked: reported finished, not successful, and not "Rejected" (not routed again)."""
    request.success = False
    request.status = status
    metrics.model_metrics.requests_deleting.append(request)
    metrics.update_pending = True


# -- sessions ---------------------------------------------------------------------------


def sessions_lock(backend: Any) -> asyncio.Lock:
    return getattr(backend, SESSIONS_LOCK)


def run_on_close(backend: Any, session: Any) -> Awaitable[None]:
    """The framework's on-close callback for ``session`` (best effort, 10 s timeout)."""
    return getattr(backend, RUN_ON_CLOSE)(session)


def public_key(backend: Any) -> Any:
    """The autoscaler's public key, or None until it has been fetched."""
    return getattr(backend, PUBKEY)


def set_public_key(backend: Any, key: Any) -> None:
    setattr(backend, PUBKEY, key)


async def wait_for_public_key(backend: Any, timeout: float) -> Any:
    """Waits until the framework's key fetch ended (or ``timeout``); the key, or None."""
    try:
        await asyncio.wait_for(getattr(backend, PUBKEY_FETCHED).wait(), timeout)
    except asyncio.TimeoutError:
        pass
    return public_key(backend)


def benchmark_file() -> str:
    """The framework's benchmark cache: a number in it is taken as max_perf and skips the benchmark."""
    from vastai.serverless.server.lib import backend as framework_backend

    return framework_backend.BENCHMARK_INDICATOR_FILE


async def report_error(settings: Settings, message: str) -> bool:
    """Tell the autoscaler this worker is broken, without relying on the framework."""
    body = {
        "id": settings.container_id,
        "mtoken": "",
        "version": "0",
        "loadtime": 0.0,
        "cur_load": 0.0,
        "rej_load": 0.0,
        "new_load": 0.0,
        "error_msg": message,
        "max_perf": 0.0,
        "cur_perf": 0.0,
        "cur_capacity": 0,
        "max_capacity": 0,
        "num_requests_working": 0,
        "num_requests_recieved": 0,
        "additional_disk_usage": 0.0,
        "disk_usage": 0.0,
        "working_request_idxs": [],
        "url": settings.url,
    }
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        for addr in settings.report_addrs:
            try:
                async with client.post(addr.rstrip("/") + "/worker_status/", json=body) as resp:
                    if resp.status < 400:
                        return True
                    log.warning("could not report the error to %s: HTTP %s", addr, resp.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("could not report the error to %s: %s", addr, exc)
    return False
