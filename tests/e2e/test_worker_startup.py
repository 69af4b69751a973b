"""Start-up of the real worker process: its shape, its settings, its framework check, its capacity."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest

from lib.standin.process import REPO_ROOT, ChildProcess, ChildTimeout, WorkerPorts, free_port, worker_env
from workers.null.instance import framework

SUBPROCESS_DEADLINE = 30.0


async def run_python(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str, float]:
    """Runs ``python *args`` to completion; returns (exit code, stdout, stderr, seconds taken)."""
    started = time.monotonic()
    child = ChildProcess([sys.executable, *args], env=env, cwd=cwd, tail_lines=None, separate_stderr=True)
    try:
        await child.start()
        try:
            code = await child.wait(SUBPROCESS_DEADLINE)
        except ChildTimeout:
            raise AssertionError(
                f"python {' '.join(args)} still running after {SUBPROCESS_DEADLINE}s; "
                f"stdout:\n{stdout_of(child)}\nstderr:\n{stderr_of(child)}"
            ) from None
    finally:
        await child.stop()
    return code, stdout_of(child), stderr_of(child), time.monotonic() - started


def stdout_of(child: ChildProcess) -> str:
    return "".join(line + "\n" for line in child.output)


def stderr_of(child: ChildProcess) -> str:
    return "".join(line + "\n" for line in child.errors)


# -- 1. shape ------------------------------------------------------------------------

IMPORT_ONLY = textwrap.dedent(
    """
    import os, socket, threading
    import workers.null.worker
    # Nothing started: no thread, and every port the worker would serve is still free
    # to a server binding it as the worker does (SO_REUSEADDR).
    assert threading.active_count() == 1, threading.enumerate()
    for name in ("WORKER_PORT", "WORKER_HTTP_PORT", "NULL_CONTROL_PORT"):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", int(os.environ[name])))
            sock.listen()
    print("imported, nothing started")
    """
)


async def test_importing_the_worker_module_starts_nothing(autoscaler, tmp_path):
    """Importing workers.null.worker opens no port, starts no thread, reports nothing and returns at once."""
    env = worker_env(ports=WorkerPorts.allocate(), container_id=1, report_addr=autoscaler.url)
    code, out, err, took = await run_python(["-c", IMPORT_ONLY], env, tmp_path)
    print(f"import took {took:.2f}s")
    assert (code, out.strip()) == (0, "imported, nothing started"), f"stdout:\n{out}\nstderr:\n{err}"
    assert autoscaler.reports == [], "importing the module sent a report"
    assert not (tmp_path / ".has_benchmark").exists(), "importing the module wrote the benchmark cache"


def test_build_worker_config_gives_one_session_one_benchmarked_ping_and_a_lifecycle():
    """build_worker_config(settings) is a WorkerConfig: max_sessions 1, a
    single /ping carrying a BenchmarkConfig, a lifecycle."""
    from vastai.serverless.server.worker import BenchmarkConfig, WorkerConfig

    from workers.null.instance.settings import Settings
    from workers.null.worker import build_worker_config

    settings = Settings.from_env(
        {
            "WORKER_PORT": "3000",
            "VAST_TCP_PORT_3000": "3000",
            "PUBLIC_IPADDR": "127.0.0.1",
            "CONTAINER_ID": "1",
            "REPORT_ADDR": "http://127.0.0.1:9",
        }
    )
    config = build_worker_config(settings)
    assert isinstance(config, WorkerConfig)
    assert config.max_sessions == 1
    assert [handler.route for handler in config.handlers] == ["/ping"]
    assert isinstance(config.handlers[0].benchmark_config, BenchmarkConfig)
    assert config.lifecycle is not None
    assert hasattr(config.lifecycle, "__aenter__") and hasattr(config.lifecycle, "__aexit__")


async def test_module_entrypoint_runs_and_reports_ready_at_once(start_worker):
    """`python -m workers.null.worker` gets to a ready report: max_perf 100.0, no load, no error, its own URL."""
    worker = await start_worker()
    ready = await worker.wait_ready()
    print(f"ready report {ready.at - worker.started_at:.3f}s after the process started")
    assert ready.body["cur_load"] == 0.0, worker.explain()
    assert ready.body["error_msg"] == "", worker.explain()
    assert ready.body["url"] == worker.url, worker.explain()
    assert worker.process.running, worker.explain()


# -- 2. settings ---------------------------------------------------------------------

BAD_SETTINGS = [
    # (id, variable the line must name, changes: None removes the variable)
    ("WORKER_PORT-missing", "WORKER_PORT", {"WORKER_PORT": None}),
    ("WORKER_PORT-not-a-number", "WORKER_PORT", {"WORKER_PORT": "http"}),
    ("WORKER_PORT-zero", "WORKER_PORT", {"WORKER_PORT": "0"}),
    ("WORKER_PORT-too-big", "WORKER_PORT", {"WORKER_PORT": "70000"}),
    ("CONTAINER_ID-missing", "CONTAINER_ID", {"CONTAINER_ID": None}),
    ("CONTAINER_ID-not-a-number", "CONTAINER_ID", {"CONTAINER_ID": "c-42"}),
    ("REPORT_ADDR-missing", "REPORT_ADDR", {"REPORT_ADDR": None}),
    ("REPORT_ADDR-not-a-url", "REPORT_ADDR", {"REPORT_ADDR": "run.vast.ai"}),
    ("REPORT_ADDR-ftp", "REPORT_ADDR", {"REPORT_ADDR": "ftp://run.vast.ai"}),
    ("PUBLIC_IPADDR-missing", "PUBLIC_IPADDR", {"PUBLIC_IPADDR": None}),
    ("PUBLIC_IPADDR-blank", "PUBLIC_IPADDR", {"PUBLIC_IPADDR": "  "}),
    ("VAST_TCP_PORT-missing", "VAST_TCP_PORT_%(port)s", {"VAST_TCP_PORT_%(port)s": None}),
    ("VAST_TCP_PORT-not-a-number", "VAST_TCP_PORT_%(port)s", {"VAST_TCP_PORT_%(port)s": "abc"}),
    ("NULL_CONTROL_PORT-not-a-number", "NULL_CONTROL_PORT", {"NULL_CONTROL_PORT": "18999x"}),
    ("BACKEND_HEALTH_URL-not-a-url", "BACKEND_HEALTH_URL", {"BACKEND_HEALTH_URL": "localhost:8000/health"}),
    ("NULL_MAX_LIFETIME-negative", "NULL_MAX_LIFETIME", {"NULL_MAX_LIFETIME": "-1"}),
]


@pytest.mark.parametrize(
    "variable, changes", [case[1:] for case in BAD_SETTINGS], ids=[case[0] for case in BAD_SETTINGS]
)
async def test_missing_or_malformed_setting_fails_start_with_one_line_naming_it(
    autoscaler, tmp_path, variable, changes
):
    """A missing or malformed variable stops the worker with exit code 2 and one stderr line naming it, no traceback."""
    port = free_port()
    # Only what the worker needs: nothing inherited from the test's environment.
    env = {
        "PYTHONPATH": str(REPO_ROOT),
        "WORKER_PORT": str(port),
        f"VAST_TCP_PORT_{port}": str(port),
        "CONTAINER_ID": "1",
        "REPORT_ADDR": autoscaler.url,
        "PUBLIC_IPADDR": "127.0.0.1",
        "NULL_CONTROL_PORT": str(free_port()),
    }
    for name, value in changes.items():
        name = name % {"port": port}
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    variable = variable % {"port": port}
    code, out, err, _ = await run_python(["-m", "workers.null.worker"], env, tmp_path)
    explanation = f"exit code {code}; stdout:\n{out}\nstderr:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, explanation
    assert "Traceback" not in err + out, explanation
    assert len(lines) == 1, explanation
    assert variable in lines[0], explanation
    assert "set" in lines[0], f"the line does not say what to set; {explanation}"
    assert autoscaler.reports == [], "a worker that failed its settings still reported"


# -- 3. exact capacity ---------------------------------------------------------------


async def test_ready_reports_carry_max_perf_100_despite_a_stale_benchmark_cache(start_worker, http):
    """A stale .has_benchmark holding another number in the worker's directory does not change max_perf from 100.0."""
    worker = await start_worker(files={".has_benchmark": "123456.7\n"}, ready=False)
    loaded = await worker.wait_report(lambda report: report["max_perf"] != 0.0, message="a report with max_perf set")
    assert loaded.body["max_perf"] == 100.0, worker.explain()
    since = time.time()
    async with http.post(worker.url + "/session/create", json=worker.create_body(on_close=False)) as resp:
        assert resp.status == 201, worker.explain()
    await worker.wait_report(lambda report: report["cur_load"] == 100.0, since=since, message="the open session")
    async with http.post(worker.control + "/release") as resp:
        assert (await resp.json())["released"] is True, worker.explain()
    await worker.wait_report(lambda report: report["cur_load"] == 0.0, since=since, message="the release")
    perfs = {report["max_perf"] for report in worker.reports() if report["max_perf"] != 0.0}
    assert perfs == {100.0}, f"max_perf values reported: {perfs}; {worker.explain()}"


# -- control server ------------------------------------------------------------------


async def test_taken_control_port_is_reported_as_an_error_naming_the_setting(start_worker):
    """When NULL_CONTROL_PORT is already taken, the worker reports an
    error_msg naming NULL_CONTROL_PORT instead of going ready."""
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        worker = await start_worker({"NULL_CONTROL_PORT": str(port)}, ready=False)
        errored = await worker.wait_report(lambda report: bool(report["error_msg"]), message="an error report")
        assert "NULL_CONTROL_PORT" in errored.body["error_msg"], worker.explain()
        assert str(port) in errored.body["error_msg"], worker.explain()
        assert not [r for r in worker.reports() if r["max_perf"] == 100.0 and not r["error_msg"]], worker.explain()
    finally:
        server.close()
        await server.wait_closed()


# -- 8. framework compatibility ------------------------------------------------------

BREAK_CLASS = f"""
import vastai.serverless.server.lib.backend as backend
del backend.Backend.{framework.CLOSE_SESSION}
"""

BREAK_INSTANCE = f"""
import vastai.serverless.server.lib.backend as backend
_post_init = backend.Backend.__post_init__
def __post_init__(self):
    _post_init(self)
    del self.{framework.PUBKEY}
backend.Backend.__post_init__ = __post_init__
"""


@pytest.mark.parametrize(
    "sitecustomize, missing",
    [(BREAK_CLASS, framework.CLOSE_SESSION), (BREAK_INSTANCE, framework.PUBKEY)],
    ids=["class-internal-removed", "instance-attribute-removed"],
)
async def test_incompatible_framework_is_reported_with_its_version_and_the_worker_exits(
    start_worker, tmp_path, sitecustomize, missing
):
    """A vastai without an internal the worker uses gets an error_msg naming
    the installed version reported, then a non-zero exit."""
    # A sitecustomize on PYTHONPATH runs in the worker before its own code:
    # here it stands in for a vastai release that moved an internal.
    shim = tmp_path / "incompatible-vastai"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(sitecustomize)
    worker = await start_worker({"PYTHONPATH": os.pathsep.join([str(shim), str(REPO_ROOT)])}, ready=False)
    errored = await worker.wait_report(lambda report: bool(report["error_msg"]), message="the framework error report")
    message = errored.body["error_msg"]
    assert f"vastai {metadata.version('vastai')}" in message, worker.explain()
    assert missing in message, worker.explain()
    code = await worker.process.wait(SUBPROCESS_DEADLINE)
    assert code != 0, worker.explain()
    assert not [r for r in worker.reports() if r["max_perf"] == 100.0], (
        f"an incompatible worker went ready; {worker.explain()}"
    )
