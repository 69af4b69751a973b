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


def parse_queue_url(url: str) -> QueueAddress:
    """Parses a queue URL; raises QueueError with one line naming the problem and the fix."""
    if not isinstance(url, str) or not url.strip():
        raise QueueError(f"no queue address given: pass --queue {NATS_FORM} or {REDIS_FORM}")
    url = url.strip()
    if "://" not in url:
        raise _bad(url, "no scheme (nats://, redis:// or rediss://)")
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
