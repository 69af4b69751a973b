"""The session client's command line, outcome table and exit status, without worker processes."""

from __future__ import annotations

import signal

import pytest
from aiohttp import web

from lib.standin.autoscaler import serve
from lib.standin.process import free_port
from lib.standin.recorder import serving
from tests.helpers import usage_refused
from tests.standin import fast_config
from workers.null import client
from workers.null.cli import StartupError, output_file_problem, sigterm_as_ctrl_c
from workers.null.client import SessionRecord, exit_code, format_table
from workers.null.dispatch.sdk import LOCAL_API_KEY


def parse(*argv: str):
    parser = client.build_arg_parser()
    args = parser.parse_args(list(argv))
    client._validate(args, parser)
    return args


def released(number: int, worker: str = "127.0.0.1:4000") -> SessionRecord:
    return SessionRecord(
        number, stage="done", requested_at=10.0, reserved_at=12.5, released_at=16.5, worker=worker, outcome="released"
    )


@pytest.mark.parametrize("instance", ["prod", "alpha", "candidate"])
def test_remote_instance_without_vast_api_key_is_one_line_and_exit_2(capsys, instance):
    """A remote instance with VAST_API_KEY unset or blank exits 2 with one line naming the variable."""
    for env in ({}, {"VAST_API_KEY": "  "}):
        assert client.main(["--instance", instance], env=env) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "VAST_API_KEY" in err and "--instance local" in err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--count", "0"], "--count"),
        (["--lifetime", "0"], "--lifetime"),
        (["--hold", "-1"], "--hold"),
        (["--interval", "nan"], "--interval"),
        (["--instance", "nowhere"], "--instance"),
        (["--local-port", "70000"], "--local-port"),
    ],
)
def test_bad_flag_is_one_line_naming_it_and_exit_2(capsys, argv, named):
    """Each invalid flag value exits 2 with a single line that names the flag."""
    line = usage_refused(capsys, client.main, argv, env={})
    assert named in line, line


def test_help_shows_every_flag_with_its_default(capsys):
    """--help names each flag of the issue with its default."""
    with pytest.raises(SystemExit):
        client.main(["--help"], env={})
    out = capsys.readouterr().out
    for flag in ("--endpoint", "--instance", "--count", "--hold", "--interval", "--cost", "--lifetime", "--local-port"):
        assert flag in out
    assert "(default: local)" in out


def test_table_shows_worker_time_to_reserve_time_held_and_outcome():
    """The final table has one row per session with its worker, reserve and hold times and outcome."""
    never = SessionRecord(2, stage="done", requested_at=11.0, outcome="interrupted before reservation")
    table = format_table([released(1, "#1 127.0.0.1:4000"), never]).splitlines()
    assert table[0].split() == ["session", "worker", "reserve", "held", "outcome"]
    assert table[1].split() == ["1", "#1", "127.0.0.1:4000", "2.5s", "4.0s", "released"]
    assert table[2].split() == ["2", "-", "-", "-", "interrupted", "before", "reservation"]


def test_exit_status_is_zero_only_when_every_session_was_reserved_and_released():
    """0 when all sessions were released, 1 when any was not, 128+signal when interrupted."""
    assert exit_code([released(1), released(2)], None) == 0
    failed = SessionRecord(3, stage="done", outcome="not reserved: timed out")
    assert exit_code([released(1), failed], None) == 1
    assert exit_code([], None) == 1
    assert exit_code([released(1), released(2)], signal.SIGINT) == 130
    assert exit_code([released(1)], signal.SIGTERM) == 143


async def test_something_else_on_the_local_port_is_refused_with_the_fix():
    """When the local port answers but not as a stand-in, the client stops with exit 2 and names --local-port."""
    app = web.Application()
    async with serving(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(StartupError) as refused:
            await client.run(parse("--local-port", str(port)), LOCAL_API_KEY)
    assert refused.value.code == 2
    assert "not as a Vast stand-in" in str(refused.value) and "--local-port" in str(refused.value)


async def test_no_stand_in_on_the_local_port_names_the_commands_that_start_one():
    """With nothing listening on the local port, the client stops with exit 2, naming lib.standin and lib.demo."""
    port = free_port()
    with pytest.raises(StartupError) as refused:
        await client.run(parse("--local-port", str(port)), LOCAL_API_KEY)
    message = str(refused.value)
    assert refused.value.code == 2 and "\n" not in message
    assert f"no stand-in answers at http://127.0.0.1:{port}" in message
    assert f"python -m lib.standin --port {port}" in message and "python -m lib.demo --sessions" in message


async def test_unknown_endpoint_names_the_ones_served():
    """Asking a running stand-in for an endpoint it does not serve fails naming the endpoints it has."""
    async with serve(fast_config(provisioning_delay=120.0)) as standin:
        port = standin.url.rsplit(":", 1)[1]
        with pytest.raises(StartupError) as refused:
            await client.run(parse("--local-port", port, "--endpoint", "nope"), LOCAL_API_KEY)
    message = str(refused.value)
    assert "'nope'" in message and "'null-pyworker'" in message and "--endpoint" in message


def test_sigterm_is_ctrl_c_inside_the_block_and_as_before_after_it():
    """``sigterm_as_ctrl_c``: SIGTERM raises KeyboardInterrupt inside it; afterwards the handler before it is back."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_output_file_problem_names_a_missing_directory_and_a_directory_given_as_a_file(tmp_path):
    assert output_file_problem("--json", tmp_path / "out.json") is None
    assert output_file_problem("--json", None) is None
    missing = output_file_problem("--json", tmp_path / "nope" / "out.json")
    assert missing == f"--json {tmp_path / 'nope' / 'out.json'}: there is no directory {tmp_path / 'nope'}; " + (
        "create it or name a file elsewhere"
    )
    assert output_file_problem("--json", tmp_path) == f"--json {tmp_path}: is a directory; name a file"
