"""The session client against the local stand-in and real worker processes."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from contextlib import suppress

import aiohttp
import pytest

from lib.standin.autoscaler import serve
from lib.standin.process import ChildProcess
from tests.standin import explain, fast_config, process_gone, sdk_client, wait_fleet
from workers.null.cli import Interrupt
from workers.null.client import SessionRunner
from workers.null.dispatch import sdk
from workers.null.dispatch.sdk import DEFAULT_ENDPOINT

pytestmark = pytest.mark.slow


def session_args(**overrides) -> argparse.Namespace:
    values = dict(count=1, hold=1.0, interval=0.0, cost=100.0, lifetime=60.0, timeout=60.0)
    values.update(overrides)
    return argparse.Namespace(**values)


async def held_session(worker_control_url: str) -> object:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{worker_control_url}/status") as response:
            return (await response.json())["session"]


async def test_client_reserves_holds_and_releases_every_session():
    """python -m workers.null.client against a running stand-in reserves, holds and releases each session, exit 0."""
    async with serve(fast_config()) as standin:
        port = standin.url.rsplit(":", 1)[1]
        run = ChildProcess.python(
            "-m",
            "workers.null.client",
            "--instance",
            "local",
            "--local-port",
            port,
            "--count",
            "3",
            "--hold",
            "1.5",
            "--interval",
            "0.3",
            tail_lines=None,
        )
        try:
            await run.start()
            code = await run.wait(90)
            assert code == 0, f"{run.tail()}\n{explain(standin.fleet)}"
        finally:
            await run.stop()
        assert len(run.matches(r"session \d: requested")) == 3, run.tail()
        assert len(run.matches(r"session \d: reserved on 127\.0\.0\.1:\d+ after \d+\.\ds")) == 3, run.tail()
        assert len(run.matches(r"session \d: released after holding 1\.\ds")) == 3, run.tail()
        assert len(run.matches(r"^\d\s+127\.0\.0\.1:\d+\s+\d+\.\ds\s+1\.\ds\s+released$")) == 3, run.tail()
        assert run.matches(r"^3 of 3 sessions reserved and released; took \d+\.\ds$"), run.tail()
        assert run.matches(r"using the local stand-in at http://127\.0\.0\.1:\d+"), run.tail()
        await wait_fleet(
            standin.fleet,
            lambda f: not f.sessions and all(i.cur_load == 0 for i in f.instances.values()),
            10,
            "every worker free",
        )


async def test_hold_longer_than_the_lifetime_is_kept_alive_until_released():
    """A session held 2.5s with a 1.2s lifetime survives through keep-alive pings; left alone, one expires."""
    lifetime, hold = 1.2, 2.5  # the hold outlasts two lifetimes
    async with serve(fast_config(inactivity_timeout=30.0)) as standin:
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
            dispatcher = SessionRunner(endpoint, session_args(hold=hold, lifetime=lifetime), Interrupt())
            (record,) = await asyncio.wait_for(dispatcher.run(), 60)
            assert record.outcome == "released", explain(standin.fleet)
            assert record.held_seconds >= hold

            # Without keep-alive the same lifetime ends the session on its own.
            session = await asyncio.wait_for(endpoint.session(cost=100, lifetime=lifetime), 30)
            opened = time.monotonic()
            (inst,) = [i for i in standin.fleet.instances.values() if i.url == session.url]
            deadline = opened + 10
            while await held_session(inst.ports.control_url) is not None:
                assert time.monotonic() < deadline, "the unrenewed session did not expire"
                await asyncio.sleep(0.1)
            assert time.monotonic() - opened < hold, "it would not have survived the hold above unrenewed"
        finally:
            await client.close()


async def test_ctrl_c_closes_held_sessions_cancels_waiting_ones_and_exits_130():
    """SIGINT mid-run ends both held sessions with /session/end, gives up the waiting one, and exits 130."""
    async with serve(fast_config(max_workers=2)) as standin:
        fleet = standin.fleet
        port = standin.url.rsplit(":", 1)[1]
        run = ChildProcess.python(
            "-m",
            "workers.null.client",
            "--instance",
            "local",
            "--local-port",
            port,
            "--count",
            "3",
            "--hold",
            "120",
            "--interval",
            "0.2",
            tail_lines=None,
        )
        try:
            await run.start()
            await run.wait_for_line(r"session \d: reserved", timeout=60, count=2)
            await run.wait_for_line(r"session \d: requested", timeout=10, count=3)
            workers = [i for i in fleet.instances.values()]
            assert all([await held_session(i.ports.control_url) for i in workers]), explain(fleet)
            run.send_signal(signal.SIGINT)
            code = await run.wait(30)
            assert code == 130, run.tail()
        finally:
            await run.stop()
        assert len(run.matches(r"released early \(interrupted\)$")) == 2, run.tail()
        assert len(run.matches(r"interrupted before reservation$")) == 1, run.tail()
        for inst in workers:
            assert await held_session(inst.ports.control_url) is None, f"worker {inst.id} still holds a session"
        await wait_fleet(fleet, lambda f: not f.sessions, 10, "the stand-in to see every session end")


async def test_ctrl_c_with_its_own_stand_in_leaves_no_worker_process():
    """The demo's session mode starts its own stand-in; SIGINT then leaves no worker process behind."""
    run = ChildProcess.python("-m", "lib.demo", "--sessions", "1", "--hold", "120", tail_lines=None)
    try:
        await run.start()
        await run.wait_for_line(r"started the local stand-in in this process", timeout=30)
        (loading,) = await run.wait_for_line(r"worker \d+ loading: pid (\d+)", timeout=60)
        await run.wait_for_line(r"session 1: reserved", timeout=60)
        run.send_signal(signal.SIGINT)
        code = await run.wait(30)
        assert code == 130, run.tail()
        assert process_gone(int(loading.group(1))), run.tail()
        assert run.matches(r"session 1: released early after holding"), run.tail()
    finally:
        await run.stop()
        # Should the client have been killed, its workers (own process groups) outlive it.
        for match in run.matches(r"worker \d+ loading: pid (\d+)"):
            with suppress(ProcessLookupError):
                os.killpg(int(match.group(1)), signal.SIGKILL)


async def test_a_session_deadline_is_kept_within_a_second_whatever_the_sdk_sleeps():
    """With no worker to be had, a session asked for with a 2 s deadline
    fails within 3 s (the SDK alone takes up to 5 s more)."""
    async with serve(fast_config(provisioning_delay=120.0)) as standin:
        client = sdk_client(standin)
        try:
            endpoint = await sdk.find_endpoint(client, DEFAULT_ENDPOINT)
            started = time.monotonic()
            with pytest.raises(sdk.SessionTimeout):
                await sdk.open_session(endpoint, cost=100, lifetime=30, timeout=2.0)
            took = time.monotonic() - started
        finally:
            await client.close()
    assert 2.0 <= took < 3.0, f"the deadline of 2s was kept only after {took:.2f}s"


async def test_the_client_reports_a_missed_deadline_as_not_reserved():
    """The session client's --timeout ends a session that got no worker, and says so in its outcome."""
    async with serve(fast_config(provisioning_delay=120.0)) as standin:
        client = sdk_client(standin)
        try:
            endpoint = await sdk.find_endpoint(client, DEFAULT_ENDPOINT)
            started = time.monotonic()
            (record,) = await SessionRunner(endpoint, session_args(timeout=1.5), Interrupt()).run()
            took = time.monotonic() - started
        finally:
            await client.close()
    assert record.outcome == "not reserved: no worker took the session within 1.5s"
    assert took < 2.5


async def test_closing_a_session_the_consumer_already_released_is_not_an_error():
    """sdk.close_session on a session its worker no longer holds (the consumer released it) reports no error."""
    async with serve(fast_config(provisioning_delay=0.0)) as standin:
        client = sdk_client(standin)
        try:
            endpoint = await sdk.find_endpoint(client, DEFAULT_ENDPOINT)
            session = await sdk.open_session(endpoint, cost=100, lifetime=30, timeout=60)
            (inst,) = [i for i in standin.fleet.live() if i.url == session.url]
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{inst.ports.control_url}/release") as response:
                    assert (await response.json())["released"] is True
            assert await sdk.close_session(endpoint, session) is None
            assert not await sdk.session_alive(endpoint, session)
        finally:
            await client.close()
