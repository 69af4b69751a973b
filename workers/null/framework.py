"""The parts of the `vastai` worker framework the null worker relies on.

The framework has no public way to end a session without its grant, to report
at once, or to fix ``max_perf``; the null worker reaches for a handful of
internals instead. They are listed here and checked at start, so a framework
that moved them is reported to the autoscaler as an errored worker naming the
installed version, rather than running with a ``/release`` that cannot work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
from collections.abc import Iterable
from importlib import metadata

import aiohttp

from .settings import Settings

log = logging.getLogger(__name__)

TESTED_VERSION = "1.9.1"

# (module, class or None for the module itself, attributes it must have)
_REQUIRED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vastai.serverless.server.worker", "", ("Worker", "WorkerConfig", "HandlerConfig", "BenchmarkConfig")),
    ("vastai.serverless.server.worker", "Worker", ("run_async",)),
    ("vastai.serverless.server.lib.backend", "", ("Backend", "BENCHMARK_INDICATOR_FILE")),
    (
        "vastai.serverless.server.lib.backend",
        "Backend",
        (
            "session_create_handler",
            "session_end_handler",
            "session_get_handler",
            "session_health_handler",
            "pyworker_update_handler",
            "_Backend__close_session",
            "_Backend__run_session_on_close",
            "_fetch_pubkey",
            "session",
        ),
    ),
    (
        "vastai.serverless.server.lib.metrics",
        "Metrics",
        (
            "_send_metrics_loop",
            "_Metrics__send_metrics_and_reset",
            "_Metrics__send_delete_requests_and_reset",
            "_model_loaded",
            "_model_errored",
            "_request_start",
            "_request_success",
            "_request_end",
            "_request_reject",
            "aclose",
        ),
    ),
    ("vastai.serverless.server.lib.data_types", "", ("Session", "RequestMetrics")),
)

_DATACLASS_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "vastai.serverless.server.lib.backend",
        "Backend",
        ("sessions", "session_metrics", "_sessions_lock", "max_sessions", "unsecured", "mtoken", "lifecycle"),
    ),
    (
        "vastai.serverless.server.lib.data_types",
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
        "vastai.serverless.server.lib.data_types",
        "RequestMetrics",
        ("request_idx", "reqnum", "workload", "status", "is_session", "entered_queue_at", "work_started_at"),
    ),
    ("vastai.serverless.server.lib.data_types", "ModelMetrics", ("error_msg", "requests_working")),
)

# Set on the Backend instance by its __post_init__, so checked once it exists.
BACKEND_INSTANCE_ATTRIBUTES = ("metrics", "_pubkey", "_Backend__pubkey_fetch_complete", "_Backend__pubkey_failed")


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
    return [f"Backend().{name}" for name in BACKEND_INSTANCE_ATTRIBUTES if not hasattr(backend, name)]


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
