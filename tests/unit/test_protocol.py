"""docs/protocol.md and the code agree: its event examples parse, its key table is JobEvent's, its defaults are ours."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from workers.null import protocol
from workers.null.consumer import ConsumerOptions
from workers.null.instance import desk
from workers.null.protocol import BadEvent, JobEvent, retry_delay

PAGE = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _section(title: str) -> str:
    return PAGE.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_event_example_is_a_job_event_that_writes_back_the_same():
    examples = re.findall(r"```json\n(\{.*\})\n```", _section("Job events"))
    assert len(examples) == 3
    kinds = set()
    for text in examples:
        data = json.loads(text)
        event = JobEvent.from_dict(data)
        kinds.add(event.kind)
        written = event.to_dict()
        assert {key: written[key] for key in data} == data


def test_the_key_table_names_exactly_the_fields_of_a_job_event():
    table = re.findall(r"^\| `(\w+)` \|", _section("Job events"), flags=re.MULTILINE)
    assert sorted(table) == sorted(f.name for f in dataclasses.fields(JobEvent))


def test_an_event_without_a_required_key_is_refused_naming_it():
    with pytest.raises(BadEvent, match="session_id"):
        JobEvent.from_dict({"kind": "claimed", "job_id": "a", "attempt": 1})


def test_the_documented_defaults_are_the_consumers():
    attempts = _section("Attempts")
    options = ConsumerOptions()
    assert f"`--max-attempts` ({options.max_attempts})" in attempts.replace("\n", " ")
    assert f"`--max-deliveries` ({options.max_deliveries})" in attempts.replace("\n", " ")
    assert (
        f"`--retry-delay {options.retry_delay:g}`, `--retry-backoff {options.retry_backoff:g}`, "
        f"`--retry-max {options.retry_max:g}`" in attempts
    )
    assert f"for {desk.CONSUMER_GRACE:g} s while" in " ".join(PAGE.split())
    assert f"`http://127.0.0.1:{protocol.DEFAULT_CONTROL_PORT}`" in PAGE


def test_the_delay_formula_on_the_page_is_the_one_used():
    """full = min(max, delay * backoff^(n-1)), n counting this failure; delay = full/2 + draw * full/2."""
    for failures in range(1, 8):
        full = min(300.0, 10.0 * 2.0 ** (failures - 1))
        assert retry_delay(failures, 10.0, 2.0, 300.0, draw=0.0) == pytest.approx(full / 2)
        assert retry_delay(failures, 10.0, 2.0, 300.0, draw=1.0) == pytest.approx(full)
