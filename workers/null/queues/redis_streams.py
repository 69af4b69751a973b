"""Redis 7+ / Valkey Streams adapter: one stream, one consumer group shared by every worker.

Keys, for a stream named S:

    S              the stream; each entry has fields id, body, attempt (deliveries
                   before this entry, carried over by a retry) and enqueued
    S:dead         dead-lettered jobs (id, body, attempt, reason)
    S:delayed      retries waiting for their delay: a sorted set of job ids by due time
    S:retry:<id>   the body and attempt of one waiting retry
    S:seen:<id>    present for DEDUPE_WINDOW seconds after a publish, to drop duplicates
    S:reclaim      held while one consumer takes back lapsed entries
    S:events       the pub/sub channel of job events

How each verb maps onto Streams:

- ``claim``: first moves due retries back into the stream, then (holding
  ``S:reclaim``, one reclaimer at a time since concurrent ``XAUTOCLAIM`` can
  hand out one entry twice, redis #13956) takes one entry idle for longer than
  ``ack_wait`` with ``XAUTOCLAIM``; else ``XREADGROUP COUNT 1 ... >``, blocking.
- ``keep_alive``: a script checks with ``XPENDING`` that this consumer still
  owns the entry and only then ``XCLAIM``\\s it to itself with ``JUSTID``, which
  resets its idle time without counting a delivery.
- ``ack``: the same check, then ``XACK`` and ``XDEL``, in one script.
- ``retry(delay)``: Streams have no delayed redelivery. The script acks and
  deletes the entry and parks the job in ``S:delayed``; once due, ``claim`` or
  ``depth`` adds it back as a new entry with the same job id and its attempt
  count carried over.
- ``give_up``: the check, then ``XADD`` to ``S:dead``, ``XACK``, ``XDEL``.

Ownership is the server's pending list, read and acted on atomically, so a
claim whose entry went to another consumer cannot ack, renew or hand it back.
``ack_wait`` lives on the clients: it is the idle time after which a claim
takes an entry back, so every consumer of a stream should use the same one.
A delivery past ``max_deliver`` is dead-lettered by ``claim`` at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from workers.null.protocol import JobEvent
from workers.null.queues.address import QueueAddress
from workers.null.queues.base import (
    SETUP_HINT,
    Claim,
    Depth,
    Feed,
    Job,
    NotOwned,
    Queue,
    QueueError,
    QueueUnavailable,
    check_job_id,
    describe,
    not_connected,
    server_failed,
)

log = logging.getLogger(__name__)

# How long a job id is remembered to drop a duplicate publish (as NATS's window).
DEDUPE_WINDOW = 120.0
# How long the reclaim lock outlives a reclaimer that died holding it.
RECLAIM_LOCK_MS = 5000
# Retries are parked until due; a claim waiting for jobs looks at them this often at most.
MAX_BLOCK = 1.0

_OWNED = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
"""
RENEW = (
    _OWNED
    + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""
)
ACK = (
    _OWNED
    + """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: stream, delayed, retry hash; ARGV: group, consumer, entry, delay ms, job id, body, attempt, enqueued
RETRY = (
    _OWNED
    + _NOW
    + """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[3], 'body', ARGV[6], 'attempt', ARGV[7], 'enqueued', ARGV[8])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[5])
return 1
"""
)
# KEYS: stream, dead; ARGV: group, consumer, entry, job id, body, attempt, reason
GIVE_UP = (
    _OWNED
    + """
redis.call('XADD', KEYS[2], '*', 'id', ARGV[4], 'body', ARGV[5], 'attempt', ARGV[6], 'reason', ARGV[7])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)
# KEYS: stream, delayed; ARGV: retry hash prefix. Returns {moved, ms until the next is due or -1}.
PROMOTE = (
    _NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  local h = ARGV[1] .. id
  local f = redis.call('HMGET', h, 'body', 'attempt', 'enqueued')
  if f[1] then
    redis.call('XADD', KEYS[1], '*', 'id', id, 'body', f[1], 'attempt', f[2] or '0', 'enqueued', f[3] or '')
  end
  redis.call('DEL', h)
  redis.call('ZREM', KEYS[2], id)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if nxt[2] then return {#due, tonumber(nxt[2]) - now} end
return {#due, -1}
"""
)
# KEYS: stream, seen key; ARGV: window ms, job id, body, enqueued. Returns 1 added, 0 duplicate.
PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOSTREAM the stream does not exist') end
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'body', ARGV[3], 'attempt', '0', 'enqueued', ARGV[4])
return 1
"""
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStreamClaim(Claim):
    def __init__(self, queue: RedisStreamQueue, entry: bytes, consumer: str, job: Job, carried: int) -> None:
        self.job = job
        self._queue = queue
        self._entry = entry
        self._consumer = consumer
        self._carried = carried  # deliveries before this entry (a retry re-adds the job)
        self._settled = False
        self._lost = False
        self._renewed = time.monotonic()  # before this, the entry was surely ours

    @property
    def owned(self) -> bool:
        # Past ack_wait the entry may have been taken back; the server decides at the next verb.
        if self._settled or self._lost:
            return False
        return time.monotonic() < self._renewed + self._queue.ack_wait

    async def _run(self, verb: str, script: Any, keys: list[Any], extra: list[Any]) -> None:
        if self._settled:
            raise NotOwned(f"job {self.job.id} attempt {self.job.attempt} is already settled: cannot {verb} it again")
        if self._lost:
            raise NotOwned(f"job {self.job.id} attempt {self.job.attempt} went to another consumer: not {verb}ing it")
        q = self._queue
        sent = time.monotonic()
        with q._translate(f"{verb} job {self.job.id}"):
            done = await script(keys=[q.stream, *keys], args=[q.group, self._consumer, self._entry, *extra])
        if not done:
            self._lost = True
            raise NotOwned(
                f"job {self.job.id} attempt {self.job.attempt} is no longer held by {self._consumer} "
                f"(idle past ack_wait {q.ack_wait:g}s, taken back): it may be running elsewhere, not {verb}ing it"
            )
        self._renewed = sent

    async def keep_alive(self) -> None:
        await self._run("renew", self._queue._renew, [], [])

    async def ack(self) -> None:
        await self._run("ack", self._queue._ack, [], [])
        self._settled = True

    async def retry(self, delay: float) -> None:
        q = self._queue
        extra = [int(max(0.0, delay) * 1000), self.job.id, self.job.body, self.job.attempt, self.job.enqueued_at or ""]
        await self._run("retry", q._retry, [q.delayed_key, q.retry_key(self.job.id)], extra)
        self._settled = True

    async def give_up(self, reason: str) -> None:
        q = self._queue
        extra = [self.job.id, self.job.body, self.job.attempt, reason[:1000]]
        await self._run("give up", q._give_up, [q.dead_key], extra)
        self._settled = True
        log.info("job %s dead-lettered after attempt %d: %s", self.job.id, self.job.attempt, reason)


class RedisStreamQueue(Queue):
    def __init__(
        self, address: QueueAddress, *, ack_wait: float = 30.0, max_deliver: int = 5, connect_timeout: float = 5.0
    ) -> None:
        assert address.kind == "redis"
        self.address = address
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.connect_timeout = connect_timeout
        self.stream = address.stream
        self.group = address.group
        self.dead_key = f"{self.stream}:dead"
        self.delayed_key = f"{self.stream}:delayed"
        self.events_channel = f"{self.stream}:events"
        self.lock_key = f"{self.stream}:reclaim"
        self._redis: Any = None

    def retry_key(self, job_id: str) -> str:
        return f"{self.stream}:retry:{job_id}"

    def seen_key(self, job_id: str) -> str:
        return f"{self.stream}:seen:{job_id}"

    # -- connection ---------------------------------------------------------

    def _client(self) -> Any:
        return aioredis.Redis.from_url(
            self.address.server_url,
            socket_connect_timeout=self.connect_timeout,
            health_check_interval=15,
        )

    async def connect(self) -> None:
        if self._redis is not None:
            return
        client = self._client()
        try:
            info = await asyncio.wait_for(client.info("server"), self.connect_timeout)
        except (asyncio.TimeoutError, OSError, redis.exceptions.RedisError) as exc:
            await client.aclose()
            raise QueueUnavailable(
                f"cannot reach Redis at {self.address.server} within {self.connect_timeout:g}s "
                f"({describe(exc)}): check the address and that the server runs"
            ) from None
        version = str(info.get("redis_version", "0"))
        if int(version.split(".")[0] or 0) < 7:
            await client.aclose()
            raise QueueError(f"{self.address.server} runs Redis {version}: Streams need Redis 7 or later (or Valkey)")
        self._redis = client
        self._renew = client.register_script(RENEW)
        self._ack = client.register_script(ACK)
        self._retry = client.register_script(RETRY)
        self._give_up = client.register_script(GIVE_UP)
        self._promote = client.register_script(PROMOTE)
        self._publish = client.register_script(PUBLISH)
        self._unlock = client.register_script(UNLOCK)

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            try:
                await client.aclose()
            except Exception as exc:  # already gone
                log.debug("ignored while closing: %s", exc)

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        if self._redis is None:
            raise not_connected(what, self.address.server)
        try:
            yield
        except QueueError:
            raise
        except redis.exceptions.ResponseError as exc:
            text = str(exc)
            if "NOGROUP" in text or "NOSTREAM" in text or "no such key" in text.lower():
                raise QueueUnavailable(
                    f"cannot {what}: stream {self.stream!r} or its group {self.group!r} does not exist on "
                    f"{self.address.server}: {SETUP_HINT}"
                ) from None
            raise server_failed(what, self.address.server, exc) from None
        except (asyncio.TimeoutError, OSError, redis.exceptions.RedisError) as exc:
            raise server_failed(what, self.address.server, exc) from None

    # -- setup --------------------------------------------------------------

    async def setup(self) -> None:
        with self._translate("set up the stream"):
            try:
                await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        log.info("set up stream %s group %s on %s", self.stream, self.group, self.address.server)

    async def check(self) -> None:
        with self._translate("find the stream"):
            groups = await self._redis.xinfo_groups(self.stream)
        if not any(_text(g.get("name")) == self.group for g in groups):
            raise QueueUnavailable(
                f"stream {self.stream!r} on {self.address.server} has no group {self.group!r}: {SETUP_HINT}"
            )

    # -- jobs ---------------------------------------------------------------

    async def publish(self, job_id: str, body: bytes) -> bool:
        check_job_id(job_id)
        with self._translate(f"publish job {job_id}"):
            added = await self._publish(
                keys=[self.stream, self.seen_key(job_id)],
                args=[int(DEDUPE_WINDOW * 1000), job_id, body, repr(time.time())],
            )
        return bool(added)

    async def _promote_due(self) -> float | None:
        """Moves due retries back into the stream; seconds until the next one is due, or None."""
        _moved, next_ms = await self._promote(keys=[self.stream, self.delayed_key], args=[f"{self.stream}:retry:"])
        return None if int(next_ms) < 0 else int(next_ms) / 1000

    async def claim(self, consumer: str, timeout: float) -> Claim | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._translate("claim a job"):
            while True:
                next_due = await self._promote_due()
                got = await self._reclaim(consumer) or await self._read(consumer, deadline, next_due)
                if got is None:
                    if time.monotonic() >= deadline:
                        return None
                    continue
                claim = got
                if claim.job.attempt <= self.max_deliver:
                    log.debug("%s claimed job %s attempt %d", consumer, claim.job.id, claim.job.attempt)
                    return claim
                # The last allowed attempt ended without an answer: it will not run again.
                await claim.give_up(f"attempt {self.max_deliver} of {self.max_deliver} did not finish")

    async def _reclaim(self, consumer: str) -> RedisStreamClaim | None:
        """An entry another consumer left idle past ack_wait, taken by one reclaimer at a time."""
        token = secrets.token_hex(8)
        if not await self._redis.set(self.lock_key, token, nx=True, px=RECLAIM_LOCK_MS):
            return None
        try:
            _next, entries, _deleted = await self._redis.xautoclaim(
                self.stream, self.group, consumer, int(self.ack_wait * 1000), start_id="0-0", count=1
            )
        finally:
            await self._unlock(keys=[self.lock_key], args=[token])
        for entry, fields in entries:
            if fields:
                pending = await self._redis.xpending_range(self.stream, self.group, entry, entry, 1)
                delivered = int(pending[0]["times_delivered"]) if pending else 2
                return self._claim(entry, fields, consumer, delivered)
        return None

    async def _read(self, consumer: str, deadline: float, next_due: float | None) -> RedisStreamClaim | None:
        wait = min(deadline - time.monotonic(), MAX_BLOCK, max(0.05, self.ack_wait / 4))
        if next_due is not None:
            wait = min(wait, next_due + 0.005)
        block = max(1, int(wait * 1000))
        answer = await self._redis.xreadgroup(self.group, consumer, {self.stream: ">"}, count=1, block=block)
        for _stream, entries in answer or ():
            for entry, fields in entries:
                return self._claim(entry, fields, consumer, 1)
        return None

    def _claim(self, entry: bytes, fields: dict, consumer: str, delivered: int) -> RedisStreamClaim:
        carried = int(fields.get(b"attempt", b"0") or 0)
        enqueued = fields.get(b"enqueued") or b""
        job = Job(
            id=_text(fields.get(b"id")) or _text(entry),
            body=fields.get(b"body", b""),
            attempt=carried + delivered,
            enqueued_at=float(enqueued) if enqueued else None,
        )
        return RedisStreamClaim(self, entry, consumer, job, carried)

    async def depth(self) -> Depth:
        with self._translate("read the depth"):
            await self._promote_due()
            groups = await self._redis.xinfo_groups(self.stream)
            group = next((g for g in groups if _text(g.get("name")) == self.group), None)
            if group is None:
                raise QueueUnavailable(
                    f"stream {self.stream!r} on {self.address.server} has no group {self.group!r}: {SETUP_HINT}"
                )
            held = int(group.get("pending") or 0)
            lag = group.get("lag")
            if lag is None:  # unknown after some deletions; acked entries are deleted, so the rest is undelivered
                lag = max(0, await self._redis.xlen(self.stream) - held)
            lapsed = 0
            if held:
                idle = await self._redis.xpending_range(
                    self.stream, self.group, "-", "+", held, idle=int(self.ack_wait * 1000)
                )
                lapsed = len(idle)
            delayed = await self._redis.zcard(self.delayed_key)
        # A lapsed entry is handed to the next claim, so it counts as pending.
        return Depth(pending=int(lag) + lapsed, in_flight=held - lapsed + int(delayed))

    async def dead_letters(self) -> list[Job]:
        with self._translate("read the dead letters"):
            entries = await self._redis.xrange(self.dead_key)
        return [
            Job(_text(f.get(b"id")), f.get(b"body", b""), int(f.get(b"attempt", b"0") or 0)) for _entry, f in entries
        ]

    # -- events -------------------------------------------------------------

    async def publish_event(self, event: JobEvent) -> None:
        with self._translate(f"publish a {event.kind} event"):
            await self._redis.publish(self.events_channel, json.dumps(event.to_dict()))

    def events(self) -> Feed[JobEvent]:
        async def opener(put: Any, fail: Any) -> Any:
            with self._translate(f"subscribe to {self.events_channel}"):
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self.events_channel)
                # The server's confirmation: from here on nothing published is missed.
                while (await pubsub.get_message(timeout=5.0)) is None:
                    pass

            async def read() -> None:
                try:
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                        if message is None or message.get("type") != "message":
                            continue
                        try:
                            put(JobEvent.from_dict(json.loads(message["data"])))
                        except (ValueError, TypeError) as exc:
                            log.warning("ignored a malformed event on %s: %s", self.events_channel, exc)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    fail(QueueUnavailable(f"events from {self.address.server} stopped: {describe(exc)}"))

            return self._background(read(), pubsub.aclose)

        return Feed(opener)

    def new_jobs(self) -> Feed[str]:
        async def opener(put: Any, fail: Any) -> Any:
            # A connection of its own: XREAD BLOCK holds it.
            client = self._client()
            with self._translate(f"watch {self.stream}"):
                try:
                    info = await client.xinfo_stream(self.stream)
                    last = info["last-generated-id"]
                except redis.exceptions.ResponseError:
                    await client.aclose()
                    raise

            async def read() -> None:
                nonlocal last
                try:
                    while True:
                        answer = await client.xread({self.stream: last}, block=int(MAX_BLOCK * 5000))
                        for _stream, entries in answer or ():
                            for entry, fields in entries:
                                last = entry
                                # A retry coming back is no new job (as on NATS, where a nak is not republished).
                                if int(fields.get(b"attempt", b"0") or 0) == 0:
                                    put(_text(fields.get(b"id")) or _text(entry))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    fail(QueueUnavailable(f"new jobs from {self.address.server} stopped: {describe(exc)}"))

            return self._background(read(), client.aclose)

        return Feed(opener)

    @staticmethod
    def _background(reader: Any, close: Any) -> Any:
        task = asyncio.ensure_future(reader)

        async def closer() -> None:
            task.cancel()
            # redis-py may finish a blocking read before it sees the cancel; it ends by then.
            with suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(task, 0.2)
            await close()

        return closer


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
