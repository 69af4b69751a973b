"""sqs:// addresses: every documented form, and one line naming the problem and the fix for each bad one."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from lib.standin.process import REPO_ROOT, python_env
from workers.null.protocol import JobEvent
from workers.null.queues import QueueError, SqsAddress, open_queue, parse_queue_url

FIX = (
    "use sqs://QUEUE?region=REGION[&endpoint=URL&dead=DEAD&events=EVENTS] "
    "or sqs://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE"
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqs://jobs", SqsAddress("jobs", "jobs-dead", "jobs-events")),
        ("sqs://Jobs_1?region=eu-west-1", SqsAddress("Jobs_1", "Jobs_1-dead", "Jobs_1-events", region="eu-west-1")),
        (
            "sqs://jobs?region=us-east-1&endpoint=http://127.0.0.1:5000/",
            SqsAddress("jobs", "jobs-dead", "jobs-events", region="us-east-1", endpoint="http://127.0.0.1:5000"),
        ),
        (
            "sqs://jobs?endpoint=https://sqs.internal:9324&dead=failed&events=seen",
            SqsAddress("jobs", "failed", "seen", endpoint="https://sqs.internal:9324"),
        ),
        ("sqs://work.fifo", SqsAddress("work.fifo", "work-dead.fifo", "work-events")),
        ("sqs://work.fifo?dead=bad.fifo", SqsAddress("work.fifo", "bad.fifo", "work-events")),
        (
            "sqs://sqs.us-east-1.amazonaws.com/123456789012/jobs",
            SqsAddress("jobs", "jobs-dead", "jobs-events", region="us-east-1", account="123456789012"),
        ),
        (
            "SQS://eu-west-2.queue.amazonaws.com/123456789012/jobs?region=eu-west-2&dead=d",
            SqsAddress("jobs", "d", "jobs-events", region="eu-west-2", account="123456789012"),
        ),
        (
            "sqs://sqs.cn-north-1.amazonaws.com.cn/123456789012/jobs",
            SqsAddress("jobs", "jobs-dead", "jobs-events", region="cn-north-1", account="123456789012"),
        ),
    ],
)
def test_each_documented_sqs_form_parses_to_its_address(url: str, expected: SqsAddress):
    """Every sqs:// form in the docs parses to the address with its defaults filled in, and prints back as itself."""
    address = parse_queue_url(url)
    assert address == expected
    assert parse_queue_url(str(address)) == address


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqs://", "no queue name"),
        ("sqs://jo.bs", "queue name 'jo.bs' is not 1 to 80 letters, digits, '-' or '_' (a FIFO one ending in .fifo)"),
        ("sqs://" + "q" * 81, "is not 1 to 80 letters"),
        ("sqs://" + "q" * 76 + ".fifo", "is not 1 to 80 letters"),
        ("sqs://jobs?queue=x", "unknown parameter 'queue' (an sqs:// queue takes region=, endpoint=, dead=, events=)"),
        ("sqs://jobs?region=", "empty region="),
        ("sqs://jobs?region=us-east-1&region=eu-west-1", "parameter 'region' given twice"),
        ("sqs://jobs?region=Virginia", "region 'Virginia' is not an AWS region such as us-east-1"),
        ("sqs://jobs#x", "unexpected fragment '#x'"),
        ("sqs://AKIA:secret@jobs", "credentials in the address (they come from the AWS chain"),
        ("sqs://jobs?endpoint=127.0.0.1:5000", "endpoint '127.0.0.1:5000' is not http://HOST[:PORT] or https://"),
        ("sqs://jobs?endpoint=ftp://h", "endpoint 'ftp://h' is not http://HOST[:PORT]"),
        ("sqs://jobs?endpoint=http://h:port", "endpoint 'http://h:port' is malformed"),
        ("sqs://jobs?endpoint=http://k:s@h:1", "credentials in endpoint= (they come from the AWS chain"),
        ("sqs://work.fifo?dead=plain", "dead-letter queue 'plain' is not a FIFO queue name (SQS needs one for FIFO"),
        ("sqs://work?dead=bad.fifo", "dead-letter queue name 'bad.fifo' is not 1 to 80 letters"),
        (
            "sqs://work?events=e.fifo",
            "events queue name 'e.fifo' is not 1 to 80 letters, digits, '-' or '_' (nor FIFO)",
        ),
        ("sqs://work?dead=work", "the work, dead-letter and events queues must be three different queues"),
        ("sqs://127.0.0.1:5000/123456789012/jobs", "host '127.0.0.1:5000' with a path is not an AWS SQS host"),
        ("sqs://sqs.us-east-1.amazonaws.com/jobs", "path '/jobs' is not /ACCOUNT/QUEUE"),
        ("sqs://sqs.us-east-1.amazonaws.com/12345/jobs", "account '12345' is not 12 digits"),
        (
            "sqs://sqs.us-east-1.amazonaws.com/123456789012/jobs?region=eu-west-1",
            "region=eu-west-1 contradicts the host's region us-east-1",
        ),
        (
            "sqs://sqs.us-east-1.amazonaws.com/123456789012/jobs?endpoint=http://h",
            "endpoint= with a queue URL (the URL's host is the endpoint)",
        ),
    ],
)
def test_each_bad_sqs_address_is_one_line_naming_the_problem_and_the_fix(url: str, problem: str):
    """A bad sqs:// address raises QueueError: one line with the problem, the address as given, and the forms."""
    with pytest.raises(QueueError) as raised:
        parse_queue_url(url)
    message = str(raised.value)
    assert problem in message and message.endswith(FIX) and "\n" not in message, message


def test_credentials_in_the_address_are_masked_in_the_message():
    """An address carrying a secret is refused, and the message shows the secret as ***."""
    with pytest.raises(QueueError) as raised:
        parse_queue_url("sqs://AKIAEXAMPLE:hunter2@jobs?region=us-east-1")
    assert "hunter2" not in str(raised.value) and "***@jobs" in str(raised.value)


def test_the_server_in_messages_is_the_endpoint_or_the_region():
    """Messages name the endpoint when there is one, else SQS and its region."""
    assert parse_queue_url("sqs://q?endpoint=http://h:1").server == "http://h:1"
    assert parse_queue_url("sqs://q?region=eu-west-1").server == "SQS eu-west-1"
    assert parse_queue_url("sqs://q").server == "SQS (region from the AWS configuration)"
    assert parse_queue_url("sqs://q.fifo").fifo and not parse_queue_url("sqs://q").fifo


def test_parsing_an_sqs_address_imports_no_aws_client():
    """Parsing an sqs:// address loads neither aiobotocore nor botocore (a worker without SQS never pays for them)."""
    code = (
        "import sys; from workers.null.queues import parse_queue_url; parse_queue_url('sqs://jobs?region=us-east-1');"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiobotocore', 'botocore', 'boto3')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_open_queue_picks_the_sqs_adapter_without_connecting():
    """An sqs:// address opens the SQS adapter, not connected, with the visibility rounded up to whole seconds."""
    from workers.null.queues.sqs import SqsQueue

    queue = open_queue("sqs://work?region=us-east-1", ack_wait=2.5, max_deliver=3)
    assert isinstance(queue, SqsQueue)
    assert (queue.ack_wait, queue.visibility, queue.max_deliver, queue.max_receive_count) == (2.5, 3, 3, 5)


def test_open_queue_refuses_an_ack_wait_past_the_visibility_limit():
    """SQS holds a message at most 12 hours: a longer ack_wait is refused in one line."""
    with pytest.raises(QueueError, match="longer than SQS's 12 h visibility limit"):
        open_queue("sqs://work?region=us-east-1", ack_wait=50000)


def _sqs_docs() -> str:
    """The SQS reference, wherever it lives: its own page, or merged into the queues page."""
    pages = [REPO_ROOT / "docs" / name for name in ("sqs.md", "queues.md")]
    return "\n".join(page.read_text() for page in pages if page.exists())


def test_the_documented_address_examples_parse():
    """Every example address in the SQS docs parses, so the docs and the parser cannot drift apart."""
    examples = re.findall(r"^- `(sqs://[^`]+)`$", _sqs_docs(), flags=re.MULTILINE)
    assert len(examples) >= 4
    for example in examples:
        assert isinstance(parse_queue_url(example), SqsAddress)


def test_the_documented_event_body_is_a_job_event():
    """The events queue's documented message body reads as a JobEvent with every field the docs show."""
    [body] = re.findall(r"```json\n(\{\"kind\".*\})\n```", _sqs_docs())
    data = json.loads(body)
    event = JobEvent.from_dict(data)
    assert event.to_dict() == data
