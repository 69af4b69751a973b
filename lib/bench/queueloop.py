"""The queue loop measured: warm dispatch per hop, throughput through warm workers, chaos.

``python -m lib.bench --only queue_loop`` runs a nats-server, the stand-in
with a consumer beside every worker and the real dispatcher in this process;
then the local demo itself with workers killed mid-job. ``measure(quick)``
returns the figures; ``rows`` the bench table's lines.

Hops of one job (wall clock, one machine): published -> the dispatcher sees it
(notice) -> session asked and reserved by the SDK (route + create) -> the
consumer's claimed event (claim + fetch) -> its started event (exec: COMMAND
spawned).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import asynccontextmanager
from typing import Any

from lib.demo.run import consumer_command
from lib.standin.autoscaler import LocalConfig, serve
from lib.standin.book import BookSettings
from lib.standin.fleet import FleetSettings
from lib.standin.process import ChildProcess
from lib.standin.queueservers import nats_server
from lib.standin.scaling import EndpointParams, LocalPolicy
from workers.null.dispatch import sdk
from workers.null.dispatch.dispatcher import Dispatcher, DispatchOptions
from workers.null.dispatch.ledger import Ledger
from workers.null.dispatch.summary import percentile
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
            book=BookSettings(
                params=EndpointParams(max_workers=max_workers, inactivity_timeout=60.0),
                policy=LocalPolicy(scale_down_delay=60.0),
                route_hold=4.0,
            ),
            provisioning_delay=0.0,
            consumer=consumer_command(url, ack_wait=ACK_WAIT),
            claim_deadline=10.0,
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


SUMMARY = re.compile(r"^(\d+) of (\d+) jobs done, (\d+) failed, (\d+) lost, (\d+) run twice$", re.M)
BILLED = re.compile(r"^billed worker-seconds: ([\d.]+), busy worker-seconds: ([\d.]+)", re.M)
TO_ZERO = re.compile(r"back to 0 after ([\d.]+)s", re.M)


async def chaos(jobs: int, kills: int, job_seconds: float) -> dict[str, Any]:
    """The local demo as a user runs it, with ``kills`` workers SIGKILLed mid-job: its summary, parsed."""
    args = [
        "-m", "lib.demo", "--jobs", str(jobs),
        "--job-seconds", str(job_seconds), "--chaos", str(kills), "--plain",
    ]  # fmt: skip
    demo = ChildProcess.python(*args, tail_lines=None)
    try:
        await demo.start()
        code = await demo.wait(600)
    finally:
        await demo.stop()
    text = demo.text
    summary, billed, to_zero = SUMMARY.search(text), BILLED.search(text), TO_ZERO.search(text)
    if summary is None or billed is None:
        raise RuntimeError(f"the demo printed no summary (exit {code}):\n{text[-2000:]}")
    done, total, failed, lost, twice = (int(g) for g in summary.groups())
    return {
        "command": " ".join(args),
        "exit_code": code,
        "jobs": total,
        "kills": kills,
        "done": done,
        "failed": failed,
        "lost": lost,
        "run_twice": twice,
        "billed_worker_s": float(billed.group(1)),
        "busy_worker_s": float(billed.group(2)),
        "back_to_zero_s": float(to_zero.group(1)) if to_zero else None,
    }


async def measure(quick: bool) -> dict[str, Any]:
    return {
        "warm": await warm_dispatch(5 if quick else 20),
        "throughput": await throughput(3 if quick else 10, 30 if quick else 200),
        "chaos": await chaos(5 if quick else 100, 1 if quick else 5, 1.0 if quick else 2.0),
    }


def rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The queue loop's lines of the bench table: (measure, figure, target)."""
    warm = results["warm"]
    found = []
    for name, s in warm["hops"].items():
        target = "p50 <= 50 ms, p99 <= 200 ms" if name == "total" else ""
        figure = f"{s['p50'] * 1000:.1f} ms / {s['p99'] * 1000:.1f} ms"
        label = "published -> handler started" if name == "total" else name
        found.append((f"queue loop, warm dispatch: {label}, p50 / p99", figure, target))
    found.append(
        (
            "queue loop, warm dispatch: runs with a 429 or an unheld route",
            f"{warm['slow_routes']} of {warm['runs']}",
            "0",
        )
    )
    t = results["throughput"]
    found.append(
        (
            f"queue loop, throughput: {t['jobs']} instant jobs, {t['workers']} warm workers",
            f"{t['jobs_per_s']:.1f} jobs/s",
            ">= 50 jobs/s" if t["workers"] >= 10 else "",
        )
    )
    c = results["chaos"]
    found.append(
        (
            f"queue loop, chaos: {c['jobs']} jobs, {c['kills']} workers killed: done / lost / run twice",
            f"{c['done']} / {c['lost']} / {c['run_twice']}",
            f"{c['jobs']} / 0 / <= {c['kills']}",
        )
    )
    found.append(
        (
            "queue loop, chaos run: billed / busy worker-seconds",
            f"{c['billed_worker_s']:.1f} / {c['busy_worker_s']:.1f}",
            "",
        )
    )
    return found
