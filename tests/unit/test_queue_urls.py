"""Queue URLs: every documented form, and one line naming the problem and the fix for each bad one."""

from __future__ import annotations

import pytest

from workers.null.queues import QueueAddress, QueueError, open_queue, parse_queue_url

FIX = "use nats://host:4222/STREAM or redis://host:6379/0?stream=jobs&group=null"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nats://localhost", QueueAddress("nats", "localhost", 4222, "jobs", "null", subject="jobs")),
        ("nats://127.0.0.1:4223/", QueueAddress("nats", "127.0.0.1", 4223, "jobs", "null", subject="jobs")),
        ("nats://q.example:4222/work", QueueAddress("nats", "q.example", 4222, "work", "null", subject="work")),
        (
            "nats://q/work?subject=jobs.gpu&consumer=fleet-a",
            QueueAddress("nats", "q", 4222, "work", "fleet-a", subject="jobs.gpu"),
        ),
        (
            "nats://alice:s%40cret@q:4222/jobs",
            QueueAddress("nats", "q", 4222, "jobs", "null", subject="jobs", username="alice", password="s@cret"),
        ),
        ("NATS://[::1]:4222/jobs", QueueAddress("nats", "::1", 4222, "jobs", "null", subject="jobs")),
        ("redis://localhost", QueueAddress("redis", "localhost", 6379, "jobs", "null", db=0)),
        ("redis://r:6380/2", QueueAddress("redis", "r", 6380, "jobs", "null", db=2)),
        ("redis://r/0?stream=work&group=fleet", QueueAddress("redis", "r", 6379, "work", "fleet", db=0)),
        ("redis://:pw@r:6379/1", QueueAddress("redis", "r", 6379, "jobs", "null", db=1, password="pw")),
        ("redis://bob:pw@r", QueueAddress("redis", "r", 6379, "jobs", "null", username="bob", password="pw")),
        ("rediss://r:6390/0?stream=a:b", QueueAddress("rediss", "r", 6390, "a:b", "null", db=0)),
    ],
)
def test_each_documented_url_form_parses_to_its_address(url: str, expected: QueueAddress):
    """Every URL form in the docs parses to the address with its defaults filled in."""
    assert parse_queue_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://q:5672/jobs", "unknown scheme 'amqp' in --queue amqp://q:5672/jobs"),
        ("localhost:4222", "no scheme (nats://, redis:// or rediss://) in --queue localhost:4222"),
        ("nats:///jobs", "no host in --queue nats:///jobs"),
        ("nats://q:port/jobs", "malformed address (Port could not be cast to integer value as 'port')"),
        ("nats://q:99999/jobs", "malformed address (Port out of range 0-65535)"),
        ("nats://q:0/jobs", "port 0 in"),
        ("nats://q/jobs#x", "unexpected fragment '#x'"),
        ("nats://q/jobs/more", "path '/jobs/more' has more than one part (only the stream's name goes there)"),
        ("nats://q/jo.bs", "stream name 'jo.bs' is not letters, digits, '-' or '_'"),
        ("nats://q/jobs?subject=jobs.*", "subject 'jobs.*' is not dot-separated letters, digits, '-' or '_'"),
        ("nats://q/jobs?consumer=a.b", "consumer name 'a.b' is not letters, digits, '-' or '_'"),
        ("nats://q/jobs?group=x", "unknown parameter 'group' (a nats:// queue takes subject= and consumer=)"),
        ("nats://q/jobs?subject=", "empty subject="),
        ("nats://q/jobs?subject=a&subject=b", "parameter 'subject' given twice"),
        ("redis://r/jobs", "database '/jobs' is not a number (the stream goes in ?stream=)"),
        ("redis://r/0?consumer=x", "unknown parameter 'consumer' (a redis:// queue takes stream= and group=)"),
        ("redis://r/0?stream=a%20b", "stream name 'a b' has whitespace"),
        ("redis://r/0?group=", "empty group="),
    ],
)
def test_each_bad_url_is_one_line_naming_the_problem_and_the_fix(url: str, problem: str):
    """A bad queue URL raises QueueError: one line with the problem, the URL as given, and both URL forms."""
    with pytest.raises(QueueError) as raised:
        parse_queue_url(url)
    message = str(raised.value)
    assert problem in message and message.endswith(FIX) and "\n" not in message, message


def test_the_message_hides_the_password():
    """A bad URL's message shows the address with its password masked."""
    with pytest.raises(QueueError) as raised:
        parse_queue_url("amqp://alice:hunter2@q/jobs")
    assert "hunter2" not in str(raised.value) and "alice:***@q" in str(raised.value)


def test_an_empty_address_names_both_forms():
    """No address at all says so and shows both URL forms."""
    with pytest.raises(QueueError, match="no queue address given: pass --queue nats://"):
        parse_queue_url("  ")


def test_server_url_carries_credentials_and_str_does_not():
    """The client connects with the credentials; the address printed in messages has none."""
    address = parse_queue_url("redis://:pw@r:6380/3?stream=s")
    assert address.server_url == "redis://:pw@r:6380/3"
    assert "pw" not in str(address) and "pw" not in repr(address)
    assert str(address) == "redis://r:6380/3?stream=s&group=null"
    nats = parse_queue_url("nats://u:p@[::1]/jobs")
    assert nats.server_url == "nats://u:p@[::1]:4222" and nats.server == "nats://[::1]:4222"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"ack_wait": 0}, "ack_wait 0 is not a positive number of seconds"),
        ({"max_deliver": 0}, "max_deliver 0 is not a whole number >= 1"),
        ({"connect_timeout": -1}, "connect_timeout -1 is not a positive number of seconds"),
    ],
)
def test_open_queue_refuses_bad_limits(kwargs: dict, problem: str):
    """open_queue refuses a non-positive ack_wait, max_deliver or connect_timeout, naming the value."""
    with pytest.raises(QueueError, match=problem):
        open_queue("nats://q/jobs", **kwargs)


def test_open_queue_picks_the_adapter_by_scheme_without_connecting():
    """A nats:// URL opens the JetStream adapter and a redis:// one the Streams adapter, neither connected yet."""
    from workers.null.queues.jetstream import JetStreamQueue
    from workers.null.queues.redis_streams import RedisStreamQueue

    nats = open_queue("nats://q/work", ack_wait=3, max_deliver=2)
    assert isinstance(nats, JetStreamQueue) and (nats.ack_wait, nats.max_deliver, nats.stream) == (3, 2, "work")
    assert isinstance(open_queue("redis://r/0?stream=s"), RedisStreamQueue)
