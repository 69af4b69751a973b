"""Opens one session per job on a null-pyworker endpoint; the consumer ends it.

    VAST_API_KEY=... python3 dispatcher.py ENDPOINT CALLBACK_URL JOB...

CALLBACK_URL is how the workers reach this process (it listens on that URL's
port on every interface): each worker POSTs the session's on_close_payload
plus its session_id there when the session ends, whoever ended it. A worker
that is lost (killed, its instance gone) sends nothing: the session's health,
asked every HEALTH_EVERY seconds while nothing arrives, tells of it.
"""

import asyncio
import sys
from urllib.parse import urlsplit

from aiohttp import web
from vastai import Serverless

LEASE = 60  # seconds; the consumer renews it while the job runs
HEALTH_EVERY = 10  # seconds without a callback before asking the workers


async def dispatch(endpoint, jobs, callback_url):
    """Reserves one worker per job; returns {job: session} for your queue."""

    async def reserve(job):
        # Returns once a worker is reserved: the SDK retries while every worker
        # is busy, and the waiting load makes the autoscaler start more.
        session = await endpoint.session(
            cost=100,
            lifetime=LEASE,
            on_close_route=callback_url,
            on_close_payload={"job": job},
        )
        # No `async with` and no close(): the consumer's /release ends it.
        print(f"job {job}: worker reserved, session {session.session_id}", flush=True)
        return job, session

    return dict(await asyncio.gather(*(reserve(job) for job in jobs)))


def callback_app(ended, path):
    """Puts each {"job", "session_id"} the workers POST to ``path`` on the ``ended`` queue."""

    async def session_ended(request):
        await ended.put(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post(path, session_ended)
    return app


async def still_held(endpoint, session):
    """Whether the session's worker still holds it; False when it ended or the worker does not answer."""
    try:
        return await asyncio.wait_for(endpoint.session_healthcheck(session), 5)
    except Exception:  # 410 for a session that ended, a connection error for a worker that is gone
        return False


async def wait_for_ends(endpoint, sessions, ended, health_every=HEALTH_EVERY):
    """Returns {job: "ended" or "worker lost"} once every session in {job: session} is over."""
    open_sessions = {session.session_id: job for job, session in sessions.items()}
    outcomes = {}
    while open_sessions:
        try:
            note = await asyncio.wait_for(ended.get(), health_every)
        except asyncio.TimeoutError:
            # No callback for a while: a lost worker sends none, so ask each
            # session's worker whether it still holds it.
            for job, session in sessions.items():
                if session.session_id in open_sessions and not await still_held(endpoint, session):
                    del open_sessions[session.session_id]
                    outcomes[job] = "worker lost"
                    print(f"job {job}: worker lost, session {session.session_id} gone", flush=True)
            continue
        # Anyone can POST here: act only on sessions this process opened.
        job = open_sessions.pop(note.get("session_id"), None)
        if job is not None:
            outcomes[job] = "ended"
            print(f"job {job}: session {note['session_id']} ended", flush=True)
    return outcomes


async def main(endpoint_name, callback_url, jobs):
    ended = asyncio.Queue()
    runner = web.AppRunner(callback_app(ended, urlsplit(callback_url).path or "/"))
    await runner.setup()
    await web.TCPSite(runner, port=urlsplit(callback_url).port).start()
    try:
        async with Serverless() as client:
            endpoint = await client.get_endpoint(endpoint_name)
            sessions = await dispatch(endpoint, jobs, callback_url)
            await wait_for_ends(endpoint, sessions, ended)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
