from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from lib.bench.recorder import is_ready
from lib.standin.grants import GrantSigner
from lib.standin.process import WorkerPorts, WorkerProcess, worker_env
from tests.fakes import FakeAutoscaler, serving
from tests.helpers import public_app

_container_ids = itertools.count(1001)

# The in-process worker (the ``desk`` fixture): its URL, for grants, and the
# platform environment the framework's Backend reads.
DESK_URL = "http://127.0.0.1:3999"
DESK_ENV = {
    "WORKER_PORT": "3999",
    "VAST_TCP_PORT_3999": "3999",
    "PUBLIC_IPADDR": "127.0.0.1",
    "CONTAINER_ID": "7",
    "REPORT_ADDR": "http://127.0.0.1:9",
    "NULL_MAX_LIFETIME": "600",
}


@pytest.fixture(scope="session")
def signer() -> GrantSigner:
    return GrantSigner()


@pytest.fixture
async def autoscaler(signer: GrantSigner) -> AsyncIterator[FakeAutoscaler]:
    fake = FakeAutoscaler(signer)
    async with serving(fake.app()) as url:
        fake.url = url
        yield fake


@pytest.fixture
async def desk(monkeypatch, signer):
    """The session desk installed on a real framework Backend, in this process, ready."""
    from vastai.serverless.server.worker import Worker

    from workers.null import framework
    from workers.null.settings import Settings
    from workers.null.worker import build_worker_config, install

    # The framework's Backend and Metrics read os.environ when built; the
    # null worker's own Settings are still built from the dict.
    for name, value in DESK_ENV.items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    level = root.level
    worker = Worker(build_worker_config(Settings.from_env(DESK_ENV)))
    root.setLevel(level)  # the framework forces DEBUG on the root logger
    desk = install(worker, Settings.from_env(DESK_ENV))
    framework.set_public_key(worker.backend, signer.key.publickey())
    desk.ready = True
    yield desk
    await desk.cancel_callbacks()
    client = worker.backend.__dict__.get("session")  # the callback client, created on first use
    if client is not None:
        await client.close()


@pytest.fixture
async def public(desk) -> AsyncIterator[TestClient]:
    """A test client of the worker's public routes, as the framework serves them, on the in-process desk."""
    async with TestClient(TestServer(public_app(desk))) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@dataclass
class RunningWorker:
    process: WorkerProcess
    ports: WorkerPorts
    container_id: int
    autoscaler: FakeAutoscaler
    started_at: float

    @property
    def url(self) -> str:
        return self.ports.url

    @property
    def control(self) -> str:
        return self.ports.control_url

    def grant(self, **kwargs: Any) -> dict[str, Any]:
        return self.autoscaler.grant(self.url, **kwargs)

    def create_body(self, lifetime: float = 60, on_close: bool = True, **grant_kwargs: Any) -> dict[str, Any]:
        return {
            "auth_data": self.grant(**grant_kwargs),
            "payload": {
                "lifetime": lifetime,
                "on_close_route": self.autoscaler.on_close_url if on_close else None,
                "on_close_payload": {"job": "job-1"} if on_close else None,
            },
        }

    def reports(self, since: float = 0.0) -> list[dict[str, Any]]:
        return self.autoscaler.reports_for(self.container_id, since)

    async def wait_report(
        self, predicate: Callable[[dict[str, Any]], bool], since: float = 0.0, timeout: float = 15.0, message: str = ""
    ):
        return await self.autoscaler.wait_for(
            lambda: self.autoscaler.first_report(self.container_id, predicate, since),
            timeout,
            f"{message or 'a report'} from worker {self.container_id}; its output:\n{self.process.tail()}",
        )

    async def wait_ready(self, timeout: float = 30.0):
        return await self.wait_report(is_ready, timeout=timeout, message="the ready report")

    def explain(self) -> str:
        return f"worker output:\n{self.process.tail()}"


StartWorker = Callable[..., Awaitable[RunningWorker]]


@pytest.fixture
async def start_worker(autoscaler: FakeAutoscaler, tmp_path: Path) -> AsyncIterator[StartWorker]:
    """Starts real worker processes against the fake autoscaler; stops them after the test."""
    started: list[WorkerProcess] = []

    async def start(
        env: dict[str, str] | None = None,
        *,
        ready: bool = True,
        report_addr: str | None = None,
        files: dict[str, str] | None = None,
    ) -> RunningWorker:
        """``files`` (name -> text) are written into the worker's directory before it starts."""
        ports = WorkerPorts.allocate()
        container_id = next(_container_ids)
        cwd = tmp_path / f"worker-{container_id}"
        for name, text in (files or {}).items():
            cwd.mkdir(parents=True, exist_ok=True)
            (cwd / name).write_text(text)
        process = WorkerProcess(
            env=worker_env(
                ports=ports,
                container_id=container_id,
                report_addr=report_addr or autoscaler.url,
                extra=env,
            ),
            cwd=cwd,
        )
        started_at = time.time()
        await process.start()
        started.append(process)
        worker = RunningWorker(process, ports, container_id, autoscaler, started_at)
        if ready:
            await worker.wait_ready()
        return worker

    try:
        yield start
    finally:
        for process in started:
            if process.running:
                await process.stop()
