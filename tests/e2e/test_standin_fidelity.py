"""The stand-in exact at the SDK's edges: cost rule, console key, held routes, idle CPU, consumers, the book's clock."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import aiohttp
import pytest

from lib.standin.autoscaler import DEFAULT_ENDPOINT, build_arg_parser, config_from_args, serve
from lib.standin.book import Answer, Provision, Resume, Stop, replay
from lib.standin.scaling import Phase
from tests.standin import explain, fast_config, process_gone, sdk_client, wait_fleet

# Long enough that no worker process starts during the tests that only talk HTTP.
NO_START = dict(provisioning_delay=120.0)


def route_body(standin, **overrides) -> dict:
    body = {"endpoint": DEFAULT_ENDPOINT, "api_key": standin.config.api_key, "cost": 100, "request_idx": 0}
    return {**body, **overrides}


async def test_route_refuses_a_cost_of_zero_or_less_or_not_finite_naming_the_rule():
    """/route/ answers 422 naming the cost rule for a cost <= 0 or not finite, and nothing waits."""
    async with serve(fast_config(**NO_START)) as standin, aiohttp.ClientSession() as http:
        for cost in ("0", "-5", "Infinity", "NaN"):
            raw = json.dumps(route_body(standin)).replace('"cost": 100', f'"cost": {cost}')
            async with http.post(f"{standin.url}/route/", data=raw) as response:
                answer = await response.json()
            assert response.status == 422, cost
            assert "held session fills its worker whatever its cost" in answer["error"], answer
        assert standin.fleet.waiting == {}


async def test_console_refuses_a_wrong_account_key_as_vast_does():
    """The SDK with a wrong account key gets 401 from the endpoint list, and so does no key; the right key works."""
    async with serve(fast_config(**NO_START)) as standin, aiohttp.ClientSession() as http:
        wrong = sdk_client(standin)
        wrong.api_key = "not-the-key"
        try:
            with pytest.raises(Exception, match="401"):
                await wrong.get_endpoint(DEFAULT_ENDPOINT)
        finally:
            await wrong.close()
        url = f"{standin.url}/api/v0/endptjobs/"
        async with http.get(url, headers={"Authorization": f"Bearer {standin.config.api_key}"}) as response:
            assert response.status == 200 and len((await response.json())["results"]) == 1
        async with http.get(url, params={"api_key": standin.config.api_key}) as response:
            assert response.status == 200 and len((await response.json())["results"]) == 1
        async with http.get(f"{standin.url}/api/v0/endptjobs/1/", params={"api_key": "nope"}) as response:
            assert response.status == 401 and set(await response.json()) == {"error"}
        async with http.get(url) as response:
            assert response.status == 401


def test_api_key_flag_sets_the_account_key():
    """--api-key is the key the console checks and the endpoint carries."""
    parser = build_arg_parser()
    config = config_from_args(parser.parse_args(["--api-key", "s3cret"]), parser)
    assert config.api_key == "s3cret"


async def test_client_gone_from_a_held_route_stops_counting_at_once():
    """A client that disconnects from a held /route/ is no demand a moment later, not waiting_timeout later."""
    async with serve(fast_config(route_hold=8.0, waiting_timeout=20.0, **NO_START)) as standin:
        async with aiohttp.ClientSession() as http:
            held = asyncio.ensure_future(http.post(f"{standin.url}/route/", json=route_body(standin)))
            await wait_fleet(standin.fleet, lambda f: f.waiting, 5, "the route to wait")
            held.cancel()
            with pytest.raises(asyncio.CancelledError):
                await held
        gone_at = time.monotonic()
        await wait_fleet(standin.fleet, lambda f: not f.waiting, 2, "the waiter to be dropped")
        print(f"waiter dropped {time.monotonic() - gone_at:.3f}s after its client went away")


@pytest.mark.slow
async def test_stand_in_sleeps_while_a_request_waits_for_a_worker():
    """With one held /route/ waiting (no worker will come), the stand-in's process uses a few percent of a core."""
    async with serve(fast_config(route_hold=8.0, **NO_START)) as standin, aiohttp.ClientSession() as http:
        held = asyncio.ensure_future(http.post(f"{standin.url}/route/", json=route_body(standin)))
        try:
            await wait_fleet(standin.fleet, lambda f: f.waiting and f.instances, 5, "a waiting route and a worker")
            cpu, wall = time.process_time(), time.monotonic()
            await asyncio.sleep(3.0)  # the measurement window, not a synchronisation
            share = (time.process_time() - cpu) / (time.monotonic() - wall)
            assert not held.done(), "the route was still held through the window"
        finally:
            held.cancel()
            with pytest.raises(asyncio.CancelledError):
                await held
    print(f"stand-in CPU while one request waited: {share * 100:.1f}% of a core over 3 s")
    assert share < 0.20, f"{share * 100:.0f}% of a core while idle-waiting: the loop spins"


@pytest.mark.slow
async def test_real_time_fleet_decides_as_the_book_does_on_a_virtual_clock():
    """SDK sessions through the real-time stand-in, replayed on a virtual clock: the same commands at the same times."""
    async with serve(fast_config(max_workers=2, inactivity_timeout=1.0, scale_down_delay=0.3)) as standin:
        fleet = standin.fleet
        fleet.book.events, fleet.book.issued = [], []
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
            sessions = await asyncio.wait_for(
                asyncio.gather(*(endpoint.session(cost=100, lifetime=30) for _ in range(2))), 60
            )
            await endpoint.close_session(sessions[0])
            await wait_fleet(fleet, lambda f: len(f.live()) == 1, 20, "the surplus worker stopped")
            await endpoint.close_session(sessions[1])
            await wait_fleet(fleet, lambda f: not f.instances, 20, "scale to zero")
        finally:
            await client.close()
        events, issued = list(fleet.book.events), list(fleet.book.issued)
        until = fleet.clock()
    virtual = replay(fleet.settings.book, events, until)

    def shape(run):
        return [(type(c).__name__, getattr(c, "worker_id", None), getattr(c, "request_idx", None)) for _, c in run]

    assert shape(virtual) == shape(issued), (shape(virtual), shape(issued))
    kinds = {type(c) for _, c in issued}
    assert {Provision, Stop, Answer} <= kinds and Resume not in kinds, issued
    lag = max(abs(a - b) for (a, _), (b, _) in zip(virtual, issued, strict=True))
    print(f"{len(issued)} commands; the real-time fleet issued each within {lag * 1000:.1f} ms of the virtual clock")
    assert lag < 0.25


CONSUMER = """
import json, os, signal, sys, time
print("consumer up", flush=True)
with open("consumer.json", "w") as f:
    json.dump({"pid": os.getpid(), "pgid": os.getpgid(0), "env": {k: os.environ.get(k) for k in
               ("NULL_CONTROL_PORT", "NULL_CLAIM_DEADLINE", "BACKEND_HEALTH_URL")}}, f)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(3600)
"""


def read_consumer(inst) -> dict | None:
    path = inst.cwd / "consumer.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_consumer_flag_is_split_like_a_shell_line():
    """--consumer CMD becomes the argv run beside each worker; --claim-deadline sets the workers' deadline."""
    parser = build_arg_parser()
    args = parser.parse_args(
        ["--consumer", "python -m workers.null.consumer --queue 'nats://127.0.0.1:4222/jobs' -- sh -c 'sleep 1'"]
    )
    settings = config_from_args(args, parser).fleet
    assert settings.consumer == (
        "python",
        "-m",
        "workers.null.consumer",
        "--queue",
        "nats://127.0.0.1:4222/jobs",
        "--",
        "sh",
        "-c",
        "sleep 1",
    )
    assert settings.env_for_worker()["NULL_CLAIM_DEADLINE"] == "30"
    assert "NULL_CLAIM_DEADLINE" not in config_from_args(parser.parse_args([]), parser).fleet.env_for_worker()


@pytest.mark.slow
async def test_consumer_runs_beside_each_worker_in_its_group_and_dies_with_it():
    """Each worker gets the consumer in its environment and process group; Fleet.kill ends both, and so does a stop."""
    config = fast_config(min_load=100.0, consumer=(sys.executable, "-c", CONSUMER), claim_deadline=7.0)
    async with serve(config) as standin:
        fleet = standin.fleet
        await wait_fleet(
            fleet,
            lambda f: 1 in f.instances and f.instances[1].phase is Phase.READY and read_consumer(f.instances[1]),
            30,
            "worker 1 ready with its consumer",
        )
        first = fleet.instances[1]
        seen = read_consumer(first)
        assert seen["pgid"] == first.pid, "the consumer is in its worker's process group"
        assert seen["env"]["NULL_CONTROL_PORT"] == str(first.ports.control)
        assert seen["env"]["NULL_CLAIM_DEADLINE"] == "7"
        assert "consumer: consumer up" in first.process.tail(), explain(fleet)
        assert fleet.describe()[0]["consumer_pid"] == seen["pid"]
        assert fleet.holding_sessions() == {}

        assert fleet.kill(1)
        await wait_fleet(fleet, lambda f: process_gone(seen["pid"]) and 1 not in f.instances, 15, "worker 1 gone")
        await wait_fleet(
            fleet,
            lambda f: 2 in f.instances and f.instances[2].phase is Phase.READY and read_consumer(f.instances[2]),
            30,
            "worker 2 to replace it, with its consumer",
        )
        second = read_consumer(fleet.instances[2])
    assert process_gone(second["pid"]), "the consumer stopped with its worker"


@pytest.mark.slow
async def test_fleet_knows_which_workers_hold_a_session():
    """holding_sessions() names the worker a session is held on, and forgets it when the session ends."""
    async with serve(fast_config()) as standin:
        fleet = standin.fleet
        client = sdk_client(standin)
        try:
            endpoint = await client.get_endpoint(DEFAULT_ENDPOINT)
            session = await asyncio.wait_for(endpoint.session(cost=100, lifetime=30), 60)
            (inst,) = [i for i in fleet.instances.values() if i.url == session.url]
            await wait_fleet(fleet, lambda f: inst.id in f.holding_sessions(), 10, "the session in the reports")
            await endpoint.close_session(session)
            await wait_fleet(fleet, lambda f: f.holding_sessions() == {}, 10, "the session gone from the reports")
        finally:
            await client.close()
    assert not os.path.exists(inst.cwd)
