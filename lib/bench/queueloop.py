"""The queue loop measured: warm dispatch per hop, throughput through warm workers, chaos.

``python -m lib.bench.queueloop [--quick]`` runs a nats-server, the stand-in
with a consumer beside every worker and the real dispatcher in this process,
and prints a table. ``measure(quick)`` returns the figures; ``render`` the table.

Hops of one job (wall clock, one machine): published -> the dispatcher sees it
(notice) -> session asked and reserved by the SDK (route + create) -> the
consumer's claimed event (claim + fetch) -> its started event (exec: COMMAND
spawned).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

from lib.bench.measure import percentile
from lib.standin.autoscaler import LocalConfig, serve
from lib.standin.fleet import FleetSettings
from lib.standin.queueservers import nats_server
from lib.standin.scaling import EndpointParams, LocalPolicy
from workers.null import sdk
from workers.null.demo import consumer_command
from workers.null.dispatcher import Dispatcher, DispatchOptions
from workers.null.ledger import Ledger
from workers.null.queues import open_queue

ACK_WAIT = 3.0


@asynccontextmanager
async def loop_running(max_workers: int, **fleet: Any):
    async with nats_server() as nats_url:
        url = f"{nats_url}/bench"
        queue = open_queue(url, ack_wait=ACK_WAIT, max_deliver=5)
        await queue.connect()
        await queue.setup()
        settings = FleetSettings(
            params=EndpointParams(max_workers=max_workers, inactivity_timeout=60.0),
            policy=LocalPolicy(scale_down_delay=60.0),
            provisioning_delay=0.0,
            consumer=consumer_command(url, ack_wait=ACK_WAIT),
            claim_deadline=10.0,
            route_hold=4.0,
            **fleet,
        )
        async with serve(LocalConfig(fleet=settings, port=0)) as local:
            client = sdk.make_client(local.config.api_key, "local", local.url, max_poll_interval=1.0)
            stop = asyncio.Event()
            endpoint = await sdk.find_endpoint(client, local.config.endpoint_name, stop)
            ledger = Ledger(ack_wait=ACK_WAIT)
            options = DispatchOptions(max_sessions=max_workers, reconcile_every=2.0, health_every=1.0, gone_confirm=0.5)
            dispatcher = Dispatcher(queue, endpoint, options, ledger, routing_stop=stop)
            await dispatcher.start()
            try:
                yield queue, ledger, local
            finally:
                await dispatcher.close_all()
                await dispatcher.aclose()
                await client.close()
                await queue.close()


async def run_jobs(queue: Any, ledger: Ledger, ids: list[str], seconds: float, timeout: float) -> dict[str, float]:
    published = {}
    for job_id in ids:
        published[job_id] = time.time()
        await queue.publish(job_id, json.dumps({"seconds": seconds}).encode())
    end = time.monotonic() + timeout
    while not all(j in ledger.jobs and ledger.jobs[j].state in ("done", "dead") for j in ids):
        if time.monotonic() > end:
            raise RuntimeError(f"jobs not done within {timeout}s")
        await asyncio.sleep(0.01)
    return published


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}


async def warm_dispatch(runs: int) -> dict[str, Any]:
    """One warm idle worker; each job published alone, published -> handler started, per hop."""
    async with loop_running(1) as (queue, ledger, local):
        await run_jobs(queue, ledger, ["warmup"], 0.0, 120)
        hops: dict[str, list[float]] = {"total": [], "notice": [], "route+create": [], "claim+fetch": [], "exec": []}
        slow = 0
        for n in range(runs):
            job_id = f"warm-{n}"
            published = await run_jobs(queue, ledger, [job_id], 0.0, 60)
            row = ledger.jobs[job_id].current
            assert row is not None and row.session is not None
            s = row.session
            t0 = published[job_id]
            parts = {
                "total": row.started - t0,
                "notice": ledger.jobs[job_id].enqueued - t0,
                "route+create": s.reserved_at - s.asked_at,
                "claim+fetch": row.claimed - s.reserved_at,
                "exec": row.started - row.claimed,
            }
            for name, value in parts.items():
                hops[name].append(value)
            if parts["route+create"] > 0.9:  # the SDK's first poll after a 429 or an unheld route waits 1 s
                slow += 1
            # Let the worker report itself idle before the next job.
            await local.fleet.wait_for(lambda f: not f.holding_sessions(), 10)
        return {"hops": {k: _stats(v) for k, v in hops.items()}, "slow_routes": slow, "runs": runs}


async def throughput(workers: int, jobs: int) -> dict[str, Any]:
    """Instant jobs through ``workers`` warm workers: sustained jobs per second."""
    async with loop_running(workers) as (queue, ledger, local):
        await run_jobs(queue, ledger, [f"w{n}" for n in range(workers)], 1.0, 180)
        await local.fleet.wait_for(lambda f: not f.holding_sessions(), 20)
        ids = [f"t{n}" for n in range(jobs)]
        started = time.time()
        await run_jobs(queue, ledger, ids, 0.0, 300)
        finished = max(ledger.jobs[j].current.finished for j in ids)
        return {
            "workers": workers,
            "jobs": jobs,
            "seconds": finished - started,
            "jobs_per_s": jobs / (finished - started),
        }


async def measure(quick: bool) -> dict[str, Any]:
    return {
        "warm": await warm_dispatch(5 if quick else 20),
        "throughput": await throughput(3 if quick else 10, 30 if quick else 200),
    }


def render(results: dict[str, Any]) -> str:
    lines = ["queue loop (one machine, nats-server, stand-in, real SDK and consumers)"]
    warm = results["warm"]
    for name, s in warm["hops"].items():
        lines.append(f"  warm dispatch {name:<13} p50 {s['p50'] * 1000:7.1f} ms   p99 {s['p99'] * 1000:7.1f} ms")
    lines.append(
        f"  runs whose route+create took >0.9 s (a 429 or an unheld route): {warm['slow_routes']} of {warm['runs']}"
    )
    t = results["throughput"]
    lines.append(
        f"  throughput: {t['jobs']} instant jobs through {t['workers']} warm workers in {t['seconds']:.1f} s "
        f"= {t['jobs_per_s']:.1f} jobs/s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.bench.queueloop", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    args = parser.parse_args(argv)
    print(render(asyncio.run(measure(args.quick))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
