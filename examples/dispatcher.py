"""Opens one session per job on a null-pyworker endpoint; the consumer ends it.

    VAST_API_KEY=... python3 dispatcher.py ENDPOINT CALLBACK_URL JOB...

CALLBACK_URL is how the workers reach this process (it listens on that URL's
port on every interface): each worker POSTs the session's on_close_payload
plus its session_id there when the session ends, whoever ended it.
"""

import asyncio
import sys
from urllib.parse import urlsplit

from aiohttp import web
from vastai import Serverless

LEASE = 60  # seconds; the consumer renews it while the job runs


async def dispatch(endpoint, jobs, callback_url):
    """Reserves one worker per job; returns {job: session_id} for your queue."""

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
        return job, session.session_id

    return dict(await asyncio.gather(*(reserve(job) for job in jobs)))


def callback_app(ended, path):
    """Puts each {"job", "session_id"} the workers POST to ``path`` on the ``ended`` queue."""

    async def session_ended(request):
        await ended.put(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post(path, session_ended)
    return app


async def main(endpoint_name, callback_url, jobs):
    ended = asyncio.Queue()
    runner = web.AppRunner(callback_app(ended, urlsplit(callback_url).path or "/"))
    await runner.setup()
    await web.TCPSite(runner, port=urlsplit(callback_url).port).start()
    try:
        async with Serverless() as client:
            endpoint = await client.get_endpoint(endpoint_name)
            sessions = await dispatch(endpoint, jobs, callback_url)
            open_sessions = set(sessions.values())
            while open_sessions:
                note = await ended.get()
                # Anyone can POST here: act only on sessions this process opened.
                if note.get("session_id") in open_sessions:
                    open_sessions.discard(note["session_id"])
                    print(f"job {note['job']}: session {note['session_id']} ended", flush=True)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
