"""Soak: thousands of sessions through one worker process, nothing lost, nothing leaked.

The size is set by ``NULL_SOAK_CYCLES`` (create → release cycles; a fifth as
many create → expire cycles follow, with lifetimes of 0.02-0.08 s). The
default, 1000, is a shortened run of about 15 s for CI; the full soak is::

    NULL_SOAK_CYCLES=5000 .venv/bin/python -m pytest tests/e2e/test_soak.py -s

which prints the cycle counts, the worker's RSS and open fds before and
after, and the duration.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import pytest

SOAK_CYCLES = int(os.environ.get("NULL_SOAK_CYCLES", "1000"))
EXPIRE_CYCLES = max(1, SOAK_CYCLES // 5)
WARM_UP = 100  # cycles before the baseline: first-use imports, connection pools, allocator arenas
# The worker ends a lapsed lease on its own timer, so an expire cycle lasts its
# lifetime plus one round trip: short ones keep the count and cost little.
LIFETIMES = (0.02, 0.04, 0.08)
# Bounds with room for the allocator's noise; a leak of a few KiB per session
# crosses them in the full soak.
RSS_GROWTH_LIMIT_KIB = 16 * 1024
FD_GROWTH_LIMIT = 8


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def duplicates(values: list[Any]) -> dict[Any, int]:
    return {value: n for value, n in collections.Counter(values).items() if n > 1}


@pytest.mark.slow
@pytest.mark.timeout(max(180, 60 + SOAK_CYCLES // 10))  # about 0.03 s a cycle, with room
async def test_soak_release_and_expire_cycles_lose_and_leak_nothing(start_worker, http):
    """Thousands of create → release and create → expire cycles on one worker: every one succeeds, each
    callback and delete report arrives exactly once, RSS and fds stay bounded."""
    worker = await start_worker()
    autoscaler = worker.autoscaler
    pid = worker.process.pid
    assert pid is not None
    # Only the URL is signed, so one signature serves every grant to this worker.
    signed = worker.grant()
    opened: dict[str, int] = {}  # session_id -> request_idx
    next_idx = iter(range(10_000_000, 20_000_000))

    async def create(lifetime: float) -> str:
        request_idx = next(next_idx)
        body = {
            "auth_data": {**signed, "request_idx": request_idx, "reqnum": request_idx},
            "payload": {
                "lifetime": lifetime,
                "on_close_route": autoscaler.on_close_url,
                "on_close_payload": {"request_idx": request_idx},
            },
        }
        async with http.post(worker.url + "/session/create", json=body) as response:
            answer = await response.text()
            assert response.status == 201, f"create #{len(opened)}: {response.status} {answer}\n{worker.explain()}"
            session_id = (await response.json())["session_id"]
        assert session_id not in opened, f"session id {session_id} handed out twice"
        opened[session_id] = request_idx
        return session_id

    async def release_cycle() -> None:
        session_id = await create(60)
        async with http.post(worker.control + "/release") as response:
            answer = await response.json()
        assert answer == {"released": True, "session_ids": [session_id]}, f"{answer}\n{worker.explain()}"

    def called_back(session_id: str) -> bool:
        return any(c.body.get("session_id") == session_id for c in autoscaler.callbacks)

    async def expire_cycle(n: int) -> None:
        session_id = await create(LIFETIMES[n % len(LIFETIMES)])
        # Its callback is sent once the session has ended: the worker is free again.
        await autoscaler.wait_for(
            lambda: called_back(session_id),
            timeout=10,
            message=f"the callback of expired session {session_id}\n{worker.explain()}",
        )

    for _ in range(WARM_UP):
        await release_cycle()
    rss_before, fds_before = rss_kib(pid), open_fds(pid)
    started = time.monotonic()
    for _ in range(SOAK_CYCLES):
        await release_cycle()
    released_at = time.monotonic()
    for n in range(EXPIRE_CYCLES):
        await expire_cycle(n)
    finished = time.monotonic()
    rss_after, fds_after = rss_kib(pid), open_fds(pid)

    print(
        f"\nsoak: {SOAK_CYCLES} release cycles in {released_at - started:.1f}s, "
        f"{EXPIRE_CYCLES} expire cycles in {finished - released_at:.1f}s (after {WARM_UP} warm-up cycles); "
        f"worker RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB ({(rss_after - rss_before):+d} KiB), "
        f"open fds {fds_before} -> {fds_after}"
    )

    total = len(opened)
    await autoscaler.wait_for(
        lambda: len(autoscaler.callbacks) >= total, timeout=30, message=f"{total} callbacks\n{worker.explain()}"
    )
    callback_ids = [c.body.get("session_id") for c in autoscaler.callbacks]
    assert not duplicates(callback_ids), f"callbacks delivered more than once: {duplicates(callback_ids)}"
    assert set(callback_ids) == set(opened), (
        f"callbacks for unknown sessions or missing: {set(callback_ids) ^ set(opened)}"
    )
    mismatched = [c.body for c in autoscaler.callbacks if c.body.get("request_idx") != opened[c.body["session_id"]]]
    assert not mismatched, f"callbacks carrying another session's payload: {mismatched[:5]}"

    def finished_requests() -> list[dict[str, Any]]:
        return [
            r for d in autoscaler.deleted if d.body.get("worker_id") == worker.container_id for r in d.body["requests"]
        ]

    await autoscaler.wait_for(
        lambda: len(finished_requests()) >= total,
        timeout=30,
        message=f"{total} finished sessions in /delete_requests/\n{worker.explain()}",
    )
    finished_list = finished_requests()
    reported_idxs = [r["request_idx"] for r in finished_list]
    assert not duplicates(reported_idxs), (
        f"sessions reported finished more than once: {list(duplicates(reported_idxs))[:10]}"
    )
    assert set(reported_idxs) == set(opened.values()), (
        f"missing or unknown: {sorted(set(reported_idxs) ^ set(opened.values()))[:10]}"
    )
    failed = [r for r in finished_list if r["success"] is not True]
    assert not failed, f"sessions reported as failed: {failed[:5]}"

    await autoscaler.wait_for(
        lambda: worker.reports() and worker.reports()[-1]["cur_load"] == 0.0,
        timeout=15,
        message=f"a last report of cur_load 0\n{worker.explain()}",
    )
    errors = [r["error_msg"] for r in worker.reports() if r.get("error_msg")]
    assert not errors, f"the worker reported errors: {errors[:3]}"
    assert worker.process.running, worker.explain()
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KIB, (
        f"RSS grew by {rss_after - rss_before} KiB over {total} sessions"
    )
    assert fds_after - fds_before <= FD_GROWTH_LIMIT, f"open fds went from {fds_before} to {fds_after}"
