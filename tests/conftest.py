"""Fixtures only; what they build comes from tests/helpers.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from lib.standin.grants import GrantSigner
from lib.standin.recorder import RecordingAutoscaler, serving
from tests.helpers import DESK_ENV, RunningWorker, StartWorker, public_app, running_worker


@pytest.fixture(autouse=True)
def logging_as_it_was():
    """Each test leaves logging as it found it.

    A command's ``main()`` run in-process sets its loggers' levels and adds a
    handler on the root; left in place, the stand-in's book would log every
    route of every later replay at INFO, into a stream that test has closed.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = logging.root.manager.loggerDict
    levels = {name: each.level for name, each in loggers.items() if isinstance(each, logging.Logger)}
    yield
    for handler in root.handlers[:]:
        # pytest's own capture handlers come and go with each phase of the test.
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    if root.level != level:
        root.setLevel(level)
    for name, each in list(loggers.items()):
        if isinstance(each, logging.Logger) and each.level != levels.get(name, logging.NOTSET):
            each.setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture(scope="session")
def signer() -> GrantSigner:
    return GrantSigner()


@pytest.fixture
async def autoscaler(signer: GrantSigner) -> AsyncIterator[RecordingAutoscaler]:
    recorder = RecordingAutoscaler(signer)
    async with serving(recorder.app()) as url:
        recorder.url = url
        yield recorder


@pytest.fixture
async def desk(monkeypatch, signer):
    """The session desk installed on a real framework Backend, in this process, ready."""
    from vastai.serverless.server.worker import Worker

    from workers.null.instance import framework
    from workers.null.instance.settings import Settings
    from workers.null.worker import build_worker_config, close_clients, install

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
    await close_clients(worker.backend)


@pytest.fixture
async def public(desk) -> AsyncIterator[TestClient]:
    """A test client of the worker's public routes, as the framework serves them, on the in-process desk."""
    async with TestClient(TestServer(public_app(desk))) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
async def start_worker(autoscaler: RecordingAutoscaler, tmp_path: Path) -> AsyncIterator[StartWorker]:
    """Starts real worker processes against the recording autoscaler (see ``running_worker``); stops them after."""
    async with AsyncExitStack() as stack:

        async def start(env: dict[str, str] | None = None, **options) -> RunningWorker:
            return await stack.enter_async_context(running_worker(autoscaler, tmp_path, env, **options))

        yield start
