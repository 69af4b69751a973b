"""Queue addresses: one URL names the server, the stream and the consumer (group) in it.

``parse_queue_url`` checks an address without any client library; docs/queues.md has the full table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from workers.null.queues.base import QueueError

NATS_FORM = "nats://host:4222/STREAM"
REDIS_FORM = "redis://host:6379/0?stream=jobs&group=null"
DEFAULT_PORTS = {"nats": 4222, "redis": 6379, "rediss": 6379}
DEFAULT_STREAM = "jobs"
DEFAULT_GROUP = "null"
_QUERY_KEYS = {"nats": ("subject", "consumer"), "redis": ("stream", "group"), "rediss": ("stream", "group")}
# JetStream stream and consumer names: no whitespace, dots, wildcards or path separators.
_NATS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
# A literal subject (we publish to it): dot-separated tokens, no wildcards.
_NATS_SUBJECT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_REDIS_KEY = re.compile(r"^[^\s]{1,512}$")


@dataclass(frozen=True)
class QueueAddress:
    """Where a queue lives and which stream and consumer (group) in it; built by ``parse_queue_url``."""

    scheme: str  # "nats", "redis" or "rediss"
    host: str
    port: int
    stream: str
    group: str  # NATS: the durable consumer's name; Redis: the consumer group
    subject: str | None = None  # NATS only
    db: int = 0  # Redis only
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """``nats`` or ``redis`` (rediss is Redis over TLS)."""
        return "nats" if self.scheme == "nats" else "redis"

    @property
    def server_url(self) -> str:
        """The URL the client library connects to, credentials included."""
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}{':' + self.password if self.password else ''}@"
        tail = f"/{self.db}" if self.kind == "redis" else ""
        return f"{self.scheme}://{auth}{_host(self.host)}:{self.port}{tail}"

    @property
    def server(self) -> str:
        """The server's address for messages: no credentials."""
        return f"{self.scheme}://{_host(self.host)}:{self.port}"

    def __str__(self) -> str:
        if self.kind == "nats":
            return f"{self.server}/{self.stream}?subject={self.subject}&consumer={self.group}"
        return f"{self.server}/{self.db}?stream={self.stream}&group={self.group}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bad(url: str, problem: str) -> QueueError:
    return QueueError(f"{problem} in --queue {masked(url)}: use {NATS_FORM} or {REDIS_FORM}")


def masked(url: str) -> str:
    """The URL as given, with any password replaced by ***."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def parse_queue_url(url: str) -> QueueAddress | SqsAddress:
    """Parses a queue URL; raises QueueError with one line naming the problem and the fix."""
    if not isinstance(url, str) or not url.strip():
        raise QueueError(f"no queue address given: pass --queue {NATS_FORM} or {REDIS_FORM}")
    url = url.strip()
    if "://" not in url:
        raise _bad(url, "no scheme (nats://, redis:// or rediss://)")
    if url.split("://", 1)[0].lower() == "sqs":
        return parse_sqs_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad(url, f"malformed address ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise _bad(url, f"unknown scheme {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise _bad(url, "no host")
    if parts.fragment:
        raise _bad(url, f"unexpected fragment '#{parts.fragment}'")
    if port == 0:
        raise _bad(url, "port 0")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _QUERY_KEYS[scheme]:
            known = " and ".join(f"{k}=" for k in _QUERY_KEYS[scheme])
            raise _bad(url, f"unknown parameter {key!r} (a {scheme}:// queue takes {known})")
        if key in query:
            raise _bad(url, f"parameter {key!r} given twice")
        if not value:
            raise _bad(url, f"empty {key}=")
        query[key] = value
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    path = parts.path.strip("/")
    if scheme == "nats":
        if "/" in path:
            raise _bad(url, f"path '/{path}' has more than one part (only the stream's name goes there)")
        stream = unquote(path) or DEFAULT_STREAM
        if not _NATS_NAME.match(stream):
            raise _bad(url, f"stream name {stream!r} is not letters, digits, '-' or '_'")
        subject = query.get("subject", stream)
        if not _NATS_SUBJECT.match(subject):
            raise _bad(url, f"subject {subject!r} is not dot-separated letters, digits, '-' or '_' (no wildcards)")
        group = query.get("consumer", DEFAULT_GROUP)
        if not _NATS_NAME.match(group):
            raise _bad(url, f"consumer name {group!r} is not letters, digits, '-' or '_'")
        return QueueAddress(
            scheme, host, port or DEFAULT_PORTS[scheme], stream, group, subject=subject,
            username=username, password=password,
        )  # fmt: skip
    if path and not path.isdigit():
        raise _bad(url, f"database '/{path}' is not a number (the stream goes in ?stream=)")
    db = int(path) if path else 0
    stream = query.get("stream", DEFAULT_STREAM)
    group = query.get("group", DEFAULT_GROUP)
    for what, value in (("stream", stream), ("group", group)):
        if not _REDIS_KEY.match(value):
            raise _bad(url, f"{what} name {value!r} has whitespace")
    return QueueAddress(
        scheme, host, port or DEFAULT_PORTS[scheme], stream, group, db=db, username=username, password=password
    )


# -- SQS ---------------------------------------------------------------------------------
# Parsing an sqs:// address imports neither aiobotocore nor botocore.

SQS_FORM = (
    "sqs://QUEUE?region=REGION[&endpoint=URL&dead=DEAD&events=EVENTS] or sqs://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE"
)
_SQS_KEYS = ("region", "endpoint", "dead", "events")
# SQS queue names: up to 80 letters, digits, '-' and '_', a FIFO queue's ending in ".fifo".
_SQS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_SQS_FIFO_NAME = re.compile(r"^[A-Za-z0-9_-]{1,75}\.fifo$")
_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_AWS_ACCOUNT = re.compile(r"^\d{12}$")
# sqs.REGION.amazonaws.com (or .com.cn), and the legacy REGION.queue.amazonaws.com.
_AWS_SQS_HOST = re.compile(
    r"^(?:sqs\.(?P<a>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?|(?P<b>[a-z0-9-]+)\.queue\.amazonaws\.com)$"
)


@dataclass(frozen=True)
class SqsAddress:
    """An SQS work queue, its dead-letter and events queues, and where to reach them; built by ``parse_sqs_url``.

    No credentials: the client takes them from the AWS chain (``AWS_ACCESS_KEY_ID``
    and ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, the instance or task role).
    """

    queue: str
    dead: str
    events: str
    region: str | None = None  # None: the AWS chain's (AWS_REGION, AWS_DEFAULT_REGION, the profile's)
    endpoint: str | None = None  # an SQS-compatible server (moto, ElasticMQ, LocalStack); None: AWS's
    account: str | None = None  # the queue owner's account, from a queue URL; None: the caller's

    scheme = "sqs"
    kind = "sqs"

    @property
    def fifo(self) -> bool:
        return self.queue.endswith(".fifo")

    @property
    def server(self) -> str:
        """The server's address for messages."""
        if self.endpoint:
            return self.endpoint
        return f"SQS {self.region}" if self.region else "SQS (region from the AWS configuration)"

    def __str__(self) -> str:
        names = f"dead={self.dead}&events={self.events}"
        if self.account:
            # Only an AWS host parses as a queue URL, so the region is known here.
            return f"sqs://sqs.{self.region}.amazonaws.com/{self.account}/{self.queue}?{names}"
        where = "".join(f"{k}={v}&" for k, v in (("region", self.region), ("endpoint", self.endpoint)) if v)
        return f"sqs://{self.queue}?{where}{names}"


def sqs_default_names(queue: str) -> tuple[str, str]:
    """The dead-letter and events queues' default names: QUEUE-dead (FIFO for a FIFO queue) and QUEUE-events."""
    base = queue.removesuffix(".fifo")
    return (f"{base}-dead.fifo" if queue.endswith(".fifo") else f"{base}-dead"), f"{base}-events"


def _bad_sqs(url: str, problem: str) -> QueueError:
    return QueueError(f"{problem} in --queue {masked(url)}: use {SQS_FORM}")


def parse_sqs_url(url: str) -> SqsAddress:
    """Parses an ``sqs://`` address; raises QueueError with one line naming the problem and the fix."""
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _bad_sqs(url, f"malformed address ({exc})") from None
    if "@" in parts.netloc:
        raise _bad_sqs(
            url,
            "credentials in the address (they come from the AWS chain: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)",
        )
    if parts.fragment:
        raise _bad_sqs(url, f"unexpected fragment '#{parts.fragment}'")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _SQS_KEYS:
            known = ", ".join(f"{k}=" for k in _SQS_KEYS)
            raise _bad_sqs(url, f"unknown parameter {key!r} (an sqs:// queue takes {known})")
        if key in query:
            raise _bad_sqs(url, f"parameter {key!r} given twice")
        if not value:
            raise _bad_sqs(url, f"empty {key}=")
        query[key] = value
    host = parts.netloc  # not .hostname: that lowercases, and queue names are case-sensitive
    path = parts.path.strip("/")
    region = query.get("region")
    account = None
    if not host:
        raise _bad_sqs(url, "no queue name")
    if path:
        # A queue URL: sqs://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE.
        match = _AWS_SQS_HOST.match(host.lower())
        if not match:
            raise _bad_sqs(
                url,
                f"host {host!r} with a path is not an AWS SQS host (sqs.REGION.amazonaws.com); "
                "for another server name the queue alone and add endpoint=",
            )
        segments = path.split("/")
        if len(segments) != 2 or not all(segments):
            raise _bad_sqs(url, f"path '/{path}' is not /ACCOUNT/QUEUE")
        account, queue = segments
        if not _AWS_ACCOUNT.match(account):
            raise _bad_sqs(url, f"account {account!r} is not 12 digits")
        host_region = match.group("a") or match.group("b")
        if region is not None and region != host_region:
            raise _bad_sqs(url, f"region={region} contradicts the host's region {host_region}")
        region = host_region
        if "endpoint" in query:
            raise _bad_sqs(url, "endpoint= with a queue URL (the URL's host is the endpoint)")
    else:
        queue = unquote(host)
    if not (_SQS_NAME.match(queue) or _SQS_FIFO_NAME.match(queue)):
        raise _bad_sqs(
            url, f"queue name {queue!r} is not 1 to 80 letters, digits, '-' or '_' (a FIFO one ending in .fifo)"
        )
    if region is not None and not _AWS_REGION.match(region):
        raise _bad_sqs(url, f"region {region!r} is not an AWS region such as us-east-1")
    endpoint = query.get("endpoint")
    if endpoint is not None:
        endpoint = _sqs_endpoint(url, endpoint)
    default_dead, default_events = sqs_default_names(queue)
    dead = query.get("dead", default_dead)
    events = query.get("events", default_events)
    fifo = queue.endswith(".fifo")
    if fifo and not _SQS_FIFO_NAME.match(dead):
        raise _bad_sqs(url, f"dead-letter queue {dead!r} is not a FIFO queue name (SQS needs one for FIFO {queue!r})")
    if not fifo and not _SQS_NAME.match(dead):
        raise _bad_sqs(url, f"dead-letter queue name {dead!r} is not 1 to 80 letters, digits, '-' or '_'")
    if not _SQS_NAME.match(events):
        raise _bad_sqs(url, f"events queue name {events!r} is not 1 to 80 letters, digits, '-' or '_' (nor FIFO)")
    if len({queue, dead, events}) < 3:
        raise _bad_sqs(url, "the work, dead-letter and events queues must be three different queues")
    return SqsAddress(queue, dead, events, region=region, endpoint=endpoint, account=account)


def _sqs_endpoint(url: str, endpoint: str) -> str:
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise _bad_sqs(url, f"endpoint {endpoint!r} is malformed ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad_sqs(url, f"endpoint {endpoint!r} is not http://HOST[:PORT] or https://HOST[:PORT]")
    if parts.username or parts.password:
        raise _bad_sqs(url, "credentials in endpoint= (they come from the AWS chain, never the address)")
    if parts.query or parts.fragment:
        raise _bad_sqs(url, f"endpoint {endpoint!r} has a query or fragment")
    return endpoint.rstrip("/")
