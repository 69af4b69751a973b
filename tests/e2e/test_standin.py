"""The local stand-in end to end: its HTTP API, the real SDK client and real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from contextlib import suppress

import aiohttp
import pytest

from lib.standin import autoscaler as serverless
from lib.standin.autoscaler import DEFAULT_ENDPOINT, serve
from lib.standin.process import ChildProcess
from lib.standin.scaling import Phase
from tests.helpers import post, usage_refused
from tests.standin import explain, fast_config, process_gone, sdk_client, wait_fleet

# Long enough that no worker process starts during the tests that only talk HTTP.
NO_START = dict(provisioning_delay=120.0)


async def test_sdk_finds_the_endpoint_with_its_key_and_parameters():
    """The SDK's get_endpoint reads the stand-in's endpoint list: name, API key and scaling parameters."""
    async with serve(fast_config(target_util=0.9, max_workers=4, **NO_START)) as standin:
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
        finally:
            await client.close()
    assert endpoint.api_key == standin.config.api_key
    assert endpoint.data.config.target_util == 0.9
    assert endpoint.data.config.max_workers == 4


async def test_route_without_a_free_worker_answers_a_request_index_to_poll_with():
    """With no worker ready, /route/ answers after route_hold with Vast's waiting fields and no url, then the
    same index."""
    async with serve(fast_config(route_hold=0.3, **NO_START)) as standin, aiohttp.ClientSession() as http:
        body = {
            "endpoint": DEFAULT_ENDPOINT,
            "api_key": standin.config.api_key,
            "cost": 100,
            "request_idx": 0,
            "replay_timeout": 60,
        }
        started = time.monotonic()
        status, first = await post(http, f"{standin.url}/route/", body)
        assert time.monotonic() - started >= 0.3
        assert status == 200 and "url" not in first and first["request_idx"] > 0
        assert first["endpoint"] == DEFAULT_ENDPOINT
        assert first["status"] == {phase.value: int(phase is Phase.PROVISIONING) for phase in Phase}, first
        status, again = await post(http, f"{standin.url}/route/", {**body, "request_idx": first["request_idx"]})
        assert status == 200 and set(again) == {"request_idx", "endpoint", "status"}
        assert again["request_idx"] == first["request_idx"]
        assert list(standin.fleet.waiting) == [first["request_idx"]]


async def test_route_refuses_unknown_endpoints_wrong_keys_and_malformed_bodies():
    """/route/ answers 404 for another endpoint, 401 for a wrong key and 422 for a bad body, each with an error."""
    async with serve(fast_config(**NO_START)) as standin, aiohttp.ClientSession() as http:
        good = {"endpoint": DEFAULT_ENDPOINT, "api_key": standin.config.api_key, "cost": 100, "request_idx": 0}
        cases = [
            ({**good, "endpoint": "other"}, 404),
            ({**good, "api_key": "wrong"}, 401),
            ({**good, "cost": "lots"}, 422),
            ({**good, "cost": -1}, 422),
            ({**good, "cost": 0}, 422),
            ({**good, "request_idx": "7"}, 422),
            ([good], 422),
        ]
        for body, expected in cases:
            status, answer = await post(http, f"{standin.url}/route/", body)
            assert (status, set(answer)) == (expected, {"error"}), body
        assert standin.fleet.waiting == {}


async def test_workers_are_listed_as_the_sdk_reads_them():
    """get_endpoint_workers returns each instance with its state, through the SDK's Worker type."""
    async with serve(fast_config(min_load=100.0, **NO_START)) as standin:
        await wait_fleet(standin.fleet, lambda f: f.created, 5, "min_load to provision a worker")
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
            workers = await client.get_endpoint_workers(endpoint)
        finally:
            await client.close()
    assert [(w.id, w.status) for w in workers] == [(1, "provisioning")]


async def test_reports_from_unknown_workers_are_accepted_and_ignored():
    """A report from a worker the stand-in did not start gets 200 {} and changes nothing; a malformed one gets 422."""
    async with serve(fast_config(**NO_START)) as standin, aiohttp.ClientSession() as http:
        status, answer = await post(http, f"{standin.url}/worker_status/", {"id": 99, "cur_load": 100, "max_perf": 100})
        assert (status, answer) == (200, {})
        status, answer = await post(http, f"{standin.url}/worker_status/", {"id": "x"})
        assert status == 422 and "error" in answer
        assert standin.fleet.instances == {}


def test_port_in_use_is_one_line_naming_the_fix(capsys):
    """Starting on a taken port prints one line naming the port and --port, exit 2, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = serverless.main(["--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"port {port}" in err and "--port" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--target-util", "1.5"], "--target-util"),
        (["--max-workers", "0"], "--max-workers"),
        (["--cold-workers", "30"], "--cold-workers"),
        (["--inactivity-timeout", "soon"], "--inactivity-timeout"),
        (["--port", "70000"], "--port"),
        (["--worker-env", "NOEQUALS"], "--worker-env"),
    ],
)
def test_bad_flag_is_one_line_naming_the_flag(capsys, argv, named):
    """Each invalid flag value exits 2 with a single line that names the flag."""
    line = usage_refused(capsys, serverless.main, argv)
    assert named in line, line


def test_help_shows_every_endpoint_parameter_with_its_default(capsys):
    """--help lists each endpoint parameter flag with its default value."""
    with pytest.raises(SystemExit):
        serverless.main(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--min-load",
        "--target-util",
        "--max-workers",
        "--cold-workers",
        "--max-queue-time",
        "--target-queue-time",
        "--inactivity-timeout",
        "--provisioning-delay",
        "--port",
    ):
        assert flag in out
    assert "(default: 8080)" in out


# -- with real worker processes ------------------------------------------------------------


@pytest.mark.slow
async def test_three_sessions_at_target_util_one_get_exactly_three_workers_then_zero():
    """0 -> 3 -> 0: three concurrent sessions get three workers, one each, and the fleet empties after they end."""
    async with serve(fast_config(target_util=1.0, inactivity_timeout=1.0)) as standin:
        fleet = standin.fleet
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
            sessions = await asyncio.wait_for(
                asyncio.gather(*(endpoint.session(cost=100, lifetime=60) for _ in range(3))), 60
            )
            urls = sorted(s.url for s in sessions)
            assert len(set(urls)) == 3, explain(fleet)
            assert sorted(i.url for i in fleet.instances.values()) == urls, explain(fleet)
            assert fleet.created == [1, 2, 3], explain(fleet)
            pids = fleet.running_pids()
            for session in sessions:
                await endpoint.close_session(session)  # raises unless the worker answered 200
            await wait_fleet(fleet, lambda f: not f.instances, 30, "scale to zero")
            assert fleet.created == [1, 2, 3], "no worker beyond the three was ever started"
            assert all(process_gone(pid) for pid in pids)
        finally:
            await client.close()


@pytest.mark.slow
async def test_target_util_point_nine_starts_an_extra_idle_worker():
    """With target_util 0.9 one session of cost 100 brings up a second worker that stays idle."""
    async with serve(fast_config(target_util=0.9)) as standin:
        fleet = standin.fleet
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
            session = await asyncio.wait_for(endpoint.session(cost=100, lifetime=60), 60)

            def settled(f):
                live = f.live()
                reported = [i for i in live if i.url == session.url and i.cur_load == 100.0]
                return len(live) == 2 and all(i.phase is Phase.READY for i in live) and reported

            await wait_fleet(fleet, settled, 30, "two ready workers, the session reported on one")
            loads = sorted((i.url == session.url, i.cur_load, len(i.working)) for i in fleet.live())
            assert loads == [(False, 0.0, 0), (True, 100.0, 1)], explain(fleet)
            assert fleet.created == [1, 2], explain(fleet)
            await endpoint.close_session(session)
        finally:
            await client.close()


@pytest.mark.slow
async def test_last_worker_stops_only_once_inactivity_timeout_has_passed():
    """After the last session ends, the last worker keeps running for inactivity_timeout, then stops."""
    inactivity = 1.5
    async with serve(fast_config(inactivity_timeout=inactivity, scale_down_delay=0.2)) as standin:
        fleet = standin.fleet
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
            session = await asyncio.wait_for(endpoint.session(cost=100, lifetime=60), 60)
            await endpoint.close_session(session)
            released = time.monotonic()
            await wait_fleet(fleet, lambda f: not f.instances, 30, "scale to zero")
            waited = time.monotonic() - released
        finally:
            await client.close()
    assert waited >= inactivity - 0.2, f"stopped {waited:.2f}s after the release"


@pytest.mark.slow
async def test_cold_worker_is_restarted_instead_of_provisioning_a_new_one():
    """With cold_workers 1 the idle worker is stopped but kept, and the next session restarts it, skipping the
    cold start."""
    async with serve(fast_config(cold_workers=1, inactivity_timeout=0.5, provisioning_delay=3.0)) as standin:
        fleet = standin.fleet
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
            started = time.monotonic()
            first = await asyncio.wait_for(endpoint.session(cost=100, lifetime=60), 60)
            first_wait = time.monotonic() - started
            await endpoint.close_session(first)
            await wait_fleet(
                fleet, lambda f: [i.phase for i in f.instances.values()] == [Phase.COLD], 30, "worker 1 cold"
            )
            assert fleet.running_pids() == []
            started = time.monotonic()
            second = await asyncio.wait_for(endpoint.session(cost=100, lifetime=60), 60)
            second_wait = time.monotonic() - started
            await endpoint.close_session(second)
        finally:
            await client.close()
    assert fleet.created == [1], "the cold instance was reused"
    assert first_wait >= 3.0 and second_wait < first_wait, (first_wait, second_wait)


@pytest.mark.slow
async def test_worker_that_reports_an_error_or_dies_is_replaced():
    """A worker reporting an error_msg, and then one whose process is killed, are each stopped and replaced."""
    async with serve(fast_config(min_load=100.0)) as standin, aiohttp.ClientSession() as http:
        fleet = standin.fleet

        def ready_worker(worker_id):
            return lambda f: worker_id in f.instances and f.instances[worker_id].phase is Phase.READY

        await wait_fleet(fleet, ready_worker(1), 30, "worker 1 ready")
        report = {
            "id": 1,
            "cur_load": 0.0,
            "max_perf": 100.0,
            "error_msg": "model server crashed",
            "working_request_idxs": [],
        }
        status, _ = await post(http, f"{standin.url}/worker_status/", report)
        assert status == 200
        await wait_fleet(fleet, ready_worker(2), 30, "worker 2 to replace the errored worker 1")
        await wait_fleet(fleet, lambda f: 1 not in f.instances, 15, "worker 1 stopped")

        fleet.instances[2].process.kill()
        await wait_fleet(fleet, ready_worker(3), 30, "worker 3 to replace the killed worker 2")
        assert fleet.created == [1, 2, 3]


@pytest.mark.slow
async def test_ctrl_c_on_the_standalone_stand_in_stops_every_worker():
    """SIGINT to python -m lib.standin stops its workers and exits 0."""
    run = ChildProcess.python(
        "-m",
        "lib.standin",
        "--port",
        "0",
        "--min-load",
        "200",
        "--provisioning-delay",
        "0",
        "--target-queue-time",
        "0",
        tail_lines=None,
    )
    try:
        await run.start()
        loading = await run.wait_for_line(r"worker \d+ loading: pid (\d+)", timeout=30, count=2)
        await run.wait_for_line(r"worker \d+ ready", timeout=30, count=2)
        pids = [int(m.group(1)) for m in loading]
        run.send_signal(signal.SIGINT)
        code = await run.wait(20)
        assert code == 0, run.tail()
        assert all(process_gone(pid) for pid in pids), run.tail()
        assert run.matches(r"stopped$"), run.tail()
    finally:
        await run.stop(10.0)
        # Should the stand-in have been killed, its workers (own process groups) outlive it.
        for match in run.matches(r"worker \d+ loading: pid (\d+)"):
            with suppress(ProcessLookupError):
                os.killpg(int(match.group(1)), signal.SIGKILL)
