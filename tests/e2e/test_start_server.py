"""start_server.sh, the instance bootstrap, run the way an instance runs it.

Everything stays on this machine: the autoscaler is the recording fake, the
"remote" repository is a git repository in a temporary directory, and pip
runs with ``PIP_NO_INDEX=1`` so an install that needed the network fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lib.standin.process import REPO_ROOT, ChildProcess, WorkerPorts, free_port
from lib.standin.recorder import RecordingAutoscaler

SCRIPT = REPO_ROOT / "start_server.sh"
REQUIREMENTS = REPO_ROOT / "requirements.txt"
# The venv running the tests already satisfies requirements.txt, so a boot
# that uses it as ENV_PATH needs no network.
TEST_VENV = Path(sys.prefix)

NETWORK_TOOLS = ("git", "curl", "wget", "pip", "pip3", "uv")
# Only what a shell and the interpreters need; the rest of the caller's
# environment (a VIRTUAL_ENV, a PYTHONPATH, Vast variables) must not leak in.
PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYENV_ROOT", "PYENV_VERSION")

_container_ids = itertools.count(7001)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def vastai_pin() -> str:
    match = re.search(r"^vastai==(\S+)", REQUIREMENTS.read_text(), re.MULTILINE)
    assert match, "requirements.txt pins no vastai==VERSION"
    return match.group(1)


def script_env(tmp_path: Path, report_addr: str, **overrides: str | None) -> dict[str, str]:
    """The variables an instance has, pointed at loopback; a None override removes one."""
    env = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    env.update(
        WORKSPACE_DIR=str(tmp_path / "workspace"),
        SERVER_DIR=str(REPO_ROOT),
        ENV_PATH=str(tmp_path / "no-venv"),
        BACKEND="null",
        REPORT_ADDR=report_addr,
        CONTAINER_ID=str(next(_container_ids)),
        PUBLIC_IPADDR="127.0.0.1",
        USE_SSL="false",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def with_worker_ports(env: dict[str, str], ports: WorkerPorts) -> dict[str, str]:
    env.update(
        {
            "WORKER_PORT": str(ports.worker),
            "WORKER_HTTP_PORT": str(ports.http),
            f"VAST_TCP_PORT_{ports.worker}": str(ports.worker),
            "NULL_CONTROL_PORT": str(ports.control),
        }
    )
    return env


def network_tool_stubs(tmp_path: Path) -> Path:
    """A PATH entry where git, curl, wget, pip and uv only record that they ran."""
    bin_dir = tmp_path / "network-stubs"
    bin_dir.mkdir()
    calls = tmp_path / "network-calls.log"
    for name in NETWORK_TOOLS:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 97\n')
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def network_calls(tmp_path: Path) -> str:
    calls = tmp_path / "network-calls.log"
    return calls.read_text() if calls.exists() else ""


def path_without(tmp_path: Path, names: Iterable[str]) -> str:
    """A PATH with every program of the current one except ``names``."""
    excluded = set(names)
    bin_dir = tmp_path / "path-without-{}".format("-".join(sorted(excluded)))
    bin_dir.mkdir()
    seen = set(excluded)
    for directory in os.environ["PATH"].split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in sorted(os.listdir(directory)):
            program = os.path.join(directory, entry)
            if entry in seen or not (os.path.isfile(program) and os.access(program, os.X_OK)):
                continue
            seen.add(entry)
            (bin_dir / entry).symlink_to(program)
    return str(bin_dir)


@asynccontextmanager
async def booted(env: dict[str, str]) -> AsyncIterator[ChildProcess]:
    """Runs the script (and, after its exec, the worker), every output line kept.

    Stopped on the way out with SIGTERM, then SIGKILL of its process group,
    which holds only what the script started (tee, a clone, pip).
    """
    boot = ChildProcess([str(SCRIPT)], env=env, cwd=REPO_ROOT, tail_lines=None)
    try:
        yield await boot.start()
    finally:
        await boot.stop(10.0)


async def exit_code(boot: ChildProcess, timeout: float = 60.0) -> int:
    """Waits for the exit and for the end of its output (tee has written the log by then)."""
    return await boot.wait(timeout, drain=10.0)


async def wait_for_report(
    autoscaler: RecordingAutoscaler,
    boot: ChildProcess,
    predicate: Callable[[dict[str, Any]], bool],
    what: str,
    since: float,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """The first report since ``since`` matching ``predicate``; fails early when the process exits first."""

    def match() -> dict[str, Any] | None:
        return next((r.body for r in autoscaler.reports if r.at >= since and predicate(r.body)), None)

    waiter = asyncio.ensure_future(autoscaler.wait_for(match, timeout, what))
    exited = asyncio.ensure_future(boot.proc.wait())
    try:
        await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, exited):
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
        return waiter.result()
    raise AssertionError(f"no {what} (exit code {boot.returncode}); output:\n{boot.tail()}")


def ready_report(container_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("id") == int(container_id) and r.get("max_perf") == 100.0 and r.get("error_msg") == ""


def error_reports(autoscaler: RecordingAutoscaler, container_id: str) -> list[dict[str, Any]]:
    return [r.body for r in autoscaler.reports if r.body.get("id") == int(container_id) and r.body.get("error_msg")]


async def failed_boot(env: dict[str, str], timeout: float = 60.0) -> ChildProcess:
    async with booted(env) as boot:
        code = await exit_code(boot, timeout)
        assert code != 0, f"start_server.sh exited 0; output:\n{boot.tail()}"
    return boot


def assert_reported(
    autoscaler: RecordingAutoscaler, env: dict[str, str], boot: ChildProcess, expected: str
) -> dict[str, Any]:
    reports = error_reports(autoscaler, env["CONTAINER_ID"])
    assert len(reports) == 1, f"expected one error report, got {reports}; output:\n{boot.tail()}"
    assert expected in reports[0]["error_msg"], f"{reports[0]['error_msg']!r} lacks {expected!r}"
    return reports[0]


def log_file(env: dict[str, str]) -> Path:
    return Path(env["WORKSPACE_DIR"]) / "pyworker.log"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_is_clean_under_shellcheck() -> None:
    """start_server.sh has no shellcheck finding at warning level or above."""
    result = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_script_is_executable_with_strict_mode() -> None:
    """The script runs as a program and stops at the first failing command or unset variable."""
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -Eeuo pipefail\n" in text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"BACKEND": 'no"such\\backend'}, "BACKEND='no\"such\\backend' is not a Python package name"),
        ({"BACKEND": "nosuch"}, "has no workers/nosuch/worker.py"),
        ({"WORKER_PORT": "70000"}, "WORKER_PORT='70000' is not a TCP port"),
        ({"USE_SSL": "True"}, "USE_SSL='True' must be true or false"),
    ],
    ids=["backend-not-a-name", "backend-not-in-checkout", "port-out-of-range", "use-ssl-not-lowercase"],
)
async def test_bad_setting_is_reported_verbatim_and_exits_non_zero(
    autoscaler: RecordingAutoscaler, tmp_path: Path, overrides: dict[str, str], expected: str
) -> None:
    """A bad BACKEND, WORKER_PORT or USE_SSL reaches the autoscaler as error_msg, quotes and backslashes intact."""
    env = script_env(tmp_path, autoscaler.url, **overrides)
    boot = await failed_boot(env)
    assert_reported(autoscaler, env, boot, expected)
    assert not Path(env["ENV_PATH"]).exists(), "a refused boot created the venv"


async def test_error_report_carries_every_worker_status_field(autoscaler: RecordingAutoscaler, tmp_path: Path) -> None:
    """The error report has the framework's WorkerStatusData fields: the id, the token, the public URL, zero load."""
    from vastai.serverless.server.lib.data_types import WorkerStatusData

    public_port = free_port()
    env = script_env(
        tmp_path,
        autoscaler.url,
        BACKEND="nosuch",
        WORKER_PORT="3000",
        MASTER_TOKEN="master-token",
        **{"VAST_TCP_PORT_3000": str(public_port)},
    )
    boot = await failed_boot(env)
    report = assert_reported(autoscaler, env, boot, "workers/nosuch/worker.py")
    assert set(report) == {f.name for f in dataclasses.fields(WorkerStatusData)}
    assert report["id"] == int(env["CONTAINER_ID"])
    assert report["mtoken"] == "master-token"
    assert report["url"] == f"http://127.0.0.1:{public_port}"
    assert report["error_msg"].startswith("start_server.sh: ")
    assert report["working_request_idxs"] == []
    numbers = {
        k: v
        for k, v in report.items()
        if k not in {"id", "mtoken", "version", "error_msg", "url", "working_request_idxs"}
    }
    assert numbers and all(v == 0 for v in numbers.values()), numbers


async def test_report_addr_is_a_fallback_list(autoscaler: RecordingAutoscaler, tmp_path: Path) -> None:
    """With REPORT_ADDR "down,up" the error still arrives, at the first address that answers."""
    down = f"http://127.0.0.1:{free_port()}"
    env = script_env(tmp_path, f"{down}/,{autoscaler.url}/", BACKEND="nosuch")
    boot = await failed_boot(env)
    assert_reported(autoscaler, env, boot, "workers/nosuch/worker.py")
    assert f"could not report the error to {down}/worker_status/" in boot.text


async def test_error_is_reported_with_python3_when_curl_is_missing(
    autoscaler: RecordingAutoscaler, tmp_path: Path
) -> None:
    """Without curl on PATH the error report goes out through python3."""
    if shutil.which("python3") is None:
        pytest.skip("python3 is not on PATH")
    env = script_env(tmp_path, autoscaler.url, BACKEND="nosuch", PATH=path_without(tmp_path, ["curl"]))
    boot = await failed_boot(env)
    assert_reported(autoscaler, env, boot, "workers/nosuch/worker.py")


async def test_error_without_container_id_is_logged_not_reported(
    autoscaler: RecordingAutoscaler, tmp_path: Path
) -> None:
    """Without CONTAINER_ID nothing is sent (the autoscaler could not place it) and the log says so."""
    env = script_env(tmp_path, autoscaler.url, BACKEND="nosuch", CONTAINER_ID=None)
    boot = await failed_boot(env)
    assert autoscaler.reports == []
    assert "not reported to the autoscaler: CONTAINER_ID=''" in boot.text


async def test_sdk_version_other_than_the_pin_is_refused(autoscaler: RecordingAutoscaler, tmp_path: Path) -> None:
    """SDK_VERSION naming another vastai than requirements.txt pins stops the boot before any install."""
    pin = vastai_pin()
    env = script_env(tmp_path, autoscaler.url, SDK_VERSION="0.0.1")
    boot = await failed_boot(env)
    report = assert_reported(autoscaler, env, boot, f"SDK_VERSION=0.0.1 differs from vastai=={pin}")
    assert f"set SDK_VERSION={pin} or unset it" in report["error_msg"]
    assert not Path(env["ENV_PATH"]).exists()


async def test_missing_checkout_without_pyworker_repo_is_reported(
    autoscaler: RecordingAutoscaler, tmp_path: Path
) -> None:
    """With no checkout in SERVER_DIR and no PYWORKER_REPO, the report names PYWORKER_REPO."""
    env = script_env(tmp_path, autoscaler.url, SERVER_DIR=str(tmp_path / "server"))
    boot = await failed_boot(env)
    assert_reported(autoscaler, env, boot, "PYWORKER_REPO is unset")


@needs_git
async def test_failed_clone_is_reported_logged_and_leaves_no_partial_checkout(
    autoscaler: RecordingAutoscaler, tmp_path: Path
) -> None:
    """A PYWORKER_REPO that cannot be cloned is reported with git's reason, written to the log, and leaves SERVER_DIR
    absent.
    """
    env = script_env(
        tmp_path, autoscaler.url, SERVER_DIR=str(tmp_path / "server"), PYWORKER_REPO=str(tmp_path / "no-such-repo")
    )
    boot = await failed_boot(env)
    report = assert_reported(autoscaler, env, boot, f"cloning PYWORKER_REPO={tmp_path / 'no-such-repo'} failed")
    assert "does not exist" in report["error_msg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workspace"]
    assert "ERROR: " + report["error_msg"].replace("start_server.sh: ", "", 1) in log_file(env).read_text()


@needs_git
async def test_a_token_in_pyworker_repo_stays_out_of_the_report_and_the_log(
    autoscaler: RecordingAutoscaler, tmp_path: Path
) -> None:
    """A PYWORKER_REPO with user:token in it is shown as ***@ in the error report and the log."""
    repo = f"http://user:s3cret-token@127.0.0.1:{free_port()}/null-pyworker.git"
    env = script_env(tmp_path, autoscaler.url, SERVER_DIR=str(tmp_path / "server"), PYWORKER_REPO=repo)
    boot = await failed_boot(env)
    report = assert_reported(autoscaler, env, boot, "cloning PYWORKER_REPO=http://***@127.0.0.1:")
    assert "s3cret" not in report["error_msg"]
    assert "s3cret" not in log_file(env).read_text()


def make_remote_repo(path: Path, requirements: str) -> None:
    """A git repository shaped like this one, whose worker prints what it was started with.

    Tag v1 and the branch head differ only in the ``ref`` the worker prints, so a
    boot shows which one it checked out.
    """
    (path / "workers" / "null").mkdir(parents=True)
    (path / "requirements.txt").write_text(requirements)
    (path / "workers" / "__init__.py").write_text("")
    (path / "workers" / "null" / "__init__.py").write_text("")
    worker = path / "workers" / "null" / "worker.py"
    names = ["WORKER_PORT", "USE_SSL", "REPORT_ADDR", "BACKEND", "PYTHONUNBUFFERED", "PYTHONPATH", "CONTAINER_ID"]
    source = (
        "import json, os, sys\n"
        "print('FIXTURE-WORKER ' + json.dumps({{'ref': {ref!r}, 'pid': os.getpid(), 'cwd': os.getcwd(),"
        " 'prefix': sys.prefix, 'env': {{k: os.environ.get(k) for k in {names!r}}}}}))\n"
    )
    git = ["git", "-C", str(path), "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    worker.write_text(source.format(ref="v1", names=names))
    subprocess.run(["git", "init", "--quiet", str(path)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "v1"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    worker.write_text(source.format(ref="head", names=names))
    subprocess.run([*git, "commit", "--quiet", "-am", "head"], check=True)


def fixture_worker_line(boot: ChildProcess) -> dict[str, Any]:
    lines = [line for line in boot.lines if line.startswith("FIXTURE-WORKER ")]
    assert len(lines) == 1, f"the fixture worker did not run once; output:\n{boot.tail()}"
    return json.loads(lines[0][len("FIXTURE-WORKER ") :])


@pytest.mark.slow
@needs_git
async def test_first_boot_clones_the_ref_makes_the_venv_and_execs_the_worker_then_reboots_offline(
    autoscaler: RecordingAutoscaler, tmp_path: Path
) -> None:
    """First boot clones PYWORKER_REF, creates the venv, installs, and execs the worker with Vast's defaults; a reboot
    runs git and pip not at all.
    """
    remote = tmp_path / "remote"
    make_remote_repo(remote, "# the fixture worker needs only the standard library\npip\n")
    server_dir, env_path = tmp_path / "workspace" / "vast-pyworker", tmp_path / "workspace" / "worker-env"
    env = script_env(
        tmp_path,
        autoscaler.url,
        SERVER_DIR=None,
        ENV_PATH=None,
        WORKER_PORT=None,
        PYWORKER_REPO=str(remote),
        PYWORKER_REF="v1",
        PYTHONPATH="/elsewhere",
    )

    async with booted(env) as first:
        assert await exit_code(first, 120) == 0, first.tail()
    started = fixture_worker_line(first)
    assert started["ref"] == "v1"
    assert started["pid"] == first.pid, "the worker is not the script's process: no exec"
    assert Path(started["cwd"]) == tmp_path / "workspace"
    assert Path(started["prefix"]).resolve() == env_path.resolve()
    assert started["env"] == {
        "WORKER_PORT": "3000",
        "USE_SSL": "false",
        "REPORT_ADDR": autoscaler.url,
        "BACKEND": "null",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{server_dir}:/elsewhere",
        "CONTAINER_ID": env["CONTAINER_ID"],
    }
    assert re.search(r"creating the venv ENV_PATH=\S+ with python3(\.10)? \(Python 3\.\d+", first.text), first.text
    digest = hashlib.sha256((server_dir / "requirements.txt").read_bytes()).hexdigest()
    assert (env_path / ".null-pyworker-requirements.sha256").read_text() == digest + "\n"
    assert autoscaler.reports == []

    env["PATH"] = f"{network_tool_stubs(tmp_path)}{os.pathsep}{env['PATH']}"
    async with booted(env) as second:
        assert await exit_code(second, 60) == 0, second.tail()
    assert fixture_worker_line(second)["ref"] == "v1"
    assert network_calls(tmp_path) == ""
    assert "reboot, no network" in second.text
    assert log_file(env).read_text(errors="replace").splitlines() == first.lines + second.lines


@pytest.mark.slow
@needs_git
async def test_failed_requirements_install_is_reported_with_pips_reason(
    autoscaler: RecordingAutoscaler, tmp_path: Path
) -> None:
    """A requirements.txt pip cannot satisfy is reported with pip's last words, and the next boot tries the install
    again.
    """
    remote = tmp_path / "remote"
    make_remote_repo(remote, "null-pyworker-no-such-package==0.0.0\n")
    env = script_env(
        tmp_path,
        autoscaler.url,
        SERVER_DIR=str(tmp_path / "server"),
        ENV_PATH=str(tmp_path / "venv"),
        PYWORKER_REPO=str(remote),
    )
    boot = await failed_boot(env, timeout=120)
    report = assert_reported(autoscaler, env, boot, "installing")
    assert "No matching distribution found for null-pyworker-no-such-package==0.0.0" in report["error_msg"]
    assert (tmp_path / "venv" / "bin" / "python").exists()
    assert not (tmp_path / "venv" / ".null-pyworker-requirements.sha256").exists()

    again = await failed_boot(env, timeout=120)
    assert "installing" in again.text and "reboot, no network" not in again.text


@pytest.mark.slow
async def test_worker_comes_up_from_the_checkout_and_venv_twice_in_a_row(
    autoscaler: RecordingAutoscaler, tmp_path: Path
) -> None:
    """With this checkout as SERVER_DIR and the test venv as ENV_PATH the null worker reports ready, stops on SIGTERM
    with 0, and does it again on reboot without git or pip.
    """
    if not (REPO_ROOT / "workers" / "null" / "worker.py").exists():
        pytest.fail("workers/null/worker.py is missing")
    if not (TEST_VENV / "bin" / "python").exists():
        pytest.skip(f"the tests do not run from a venv ({TEST_VENV} has no bin/python)")
    ports = WorkerPorts.allocate()
    env = with_worker_ports(
        script_env(
            tmp_path,
            autoscaler.url,
            ENV_PATH=str(TEST_VENV),
            # Beside the test venv, not inside it, so every run starts as a first boot.
            INSTALL_MARKER=str(tmp_path / "installed.sha256"),
            SDK_VERSION=vastai_pin(),
            PIP_LOG=str(tmp_path / "pip.log"),
        ),
        ports,
    )
    # The checkout is used as it is: no clone, so nothing on the first boot needs git or curl either.
    env["PATH"] = f"{network_tool_stubs(tmp_path)}{os.pathsep}{env['PATH']}"
    container_id = env["CONTAINER_ID"]
    outputs: list[str] = []

    for boot_number in (1, 2):
        since = time.time()
        async with booted(env) as boot:
            await wait_for_report(
                autoscaler,
                boot,
                lambda r: ready_report(container_id)(r) and r.get("url") == ports.url,
                f"ready report on boot {boot_number}",
                since,
            )
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                    async with http.get(f"{ports.control_url}/status") as response:
                        status = (response.status, await response.json())
            except aiohttp.ClientError as exc:
                raise AssertionError(f"GET /status on NULL_CONTROL_PORT: {exc!r}; output:\n{boot.tail()}") from exc
            assert status[0] == 200 and status[1].get("ready") is True, (status, boot.tail())
            if boot_number == 1:
                pip_log = (tmp_path / "pip.log").read_text()
                assert "Requirement already satisfied" in pip_log
            else:
                assert (tmp_path / "pip.log").read_text() == pip_log, "pip ran on reboot"
                assert "reboot, no network" in boot.text
            boot.send_signal(signal.SIGTERM)
            stopping = time.monotonic()
            code = await exit_code(boot, 10)
            assert code == 0, f"exit code {code} after SIGTERM; output:\n{boot.tail()}"
            print(f"boot {boot_number}: ready, then stopped {time.monotonic() - stopping:.2f}s after SIGTERM")
        outputs.extend(boot.lines)
        assert error_reports(autoscaler, container_id) == [], boot.tail()
        assert [r for r in autoscaler.reports if r.at >= since and r.body.get("id") == int(container_id)]

    assert network_calls(tmp_path) == ""
    assert (tmp_path / "installed.sha256").read_text() == hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest() + "\n"
    assert log_file(env).read_text(errors="replace").splitlines() == outputs


# HTTPS: the console signs the instance's certificate request.


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@dataclasses.dataclass(frozen=True)
class ConsoleCA:
    """A certificate authority for the console stand-in, and the console's own HTTPS certificate."""

    cert: Path
    key: Path
    server_cert: Path
    server_key: Path
    # A request for a key that no instance holds: what a console that mixed
    # up its requests would sign.
    stranger_csr: Path


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> ConsoleCA:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("ca")
    ca = ConsoleCA(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key", d / "stranger.csr")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=test console CA", "-days", "2",
            "-keyout", ca.key, "-out", ca.cert)  # fmt: skip
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", ca.server_key, "-out", d / "server.csr")  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", d / "server.csr", "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
            "-days", "2", "-extfile", d / "server.ext", "-out", ca.server_cert)  # fmt: skip
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=stranger",
            "-keyout", d / "stranger.key", "-out", ca.stranger_csr)  # fmt: skip
    return ca


@dataclasses.dataclass
class SignRequest:
    instance_id: str | None
    content_type: str
    csr: bytes


@dataclasses.dataclass
class ConsoleStandin:
    """Vast's console's POST /api/v0/sign_cert/ over HTTPS: signs the posted CSR with the test CA."""

    ca: ConsoleCA
    workdir: Path
    failures: int = 0
    sign_stranger: bool = False
    requests: list[SignRequest] = dataclasses.field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v0/sign_cert/", self._sign)
        return app

    async def _sign(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(SignRequest(request.query.get("instance_id"), request.content_type, body))
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=503, text="try again later")
        n = len(self.requests)
        csr = self.workdir / f"request-{n}.csr"
        csr.write_bytes(body)
        cert = self.workdir / f"request-{n}.crt"
        proc = await asyncio.create_subprocess_exec(
            "openssl", "x509", "-req", "-in", str(self.ca.stranger_csr if self.sign_stranger else csr),
            "-CA", str(self.ca.cert), "-CAkey", str(self.ca.key), "-set_serial", str(n), "-days", "30",
            "-copy_extensions", "copy", "-out", str(cert),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            return web.Response(status=400, text=err.decode(errors="replace"))
        return web.Response(body=cert.read_bytes(), content_type="application/x-pem-file")


@pytest.fixture
async def console(test_ca: ConsoleCA, tmp_path: Path) -> AsyncIterator[ConsoleStandin]:
    workdir = tmp_path / "console"
    workdir.mkdir()
    standin = ConsoleStandin(test_ca, workdir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(test_ca.server_cert, test_ca.server_key)
    runner = web.AppRunner(standin.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        standin.url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        yield standin
    finally:
        await runner.cleanup()


def make_checkout(path: Path) -> None:
    """A checkout whose requirements the test venv already holds and whose worker prints one line."""
    (path / "workers" / "null").mkdir(parents=True)
    (path / "requirements.txt").write_text("# the fixture worker needs only the standard library\n")
    (path / "workers" / "__init__.py").write_text("")
    (path / "workers" / "null" / "__init__.py").write_text("")
    (path / "workers" / "null" / "worker.py").write_text(
        "import json, os\nprint('FIXTURE-WORKER ' + json.dumps({'USE_SSL': os.environ.get('USE_SSL')}))\n"
    )


def ssl_env(
    tmp_path: Path, autoscaler: RecordingAutoscaler, console: ConsoleStandin, **overrides: str | None
) -> dict[str, str]:
    """An instance with USE_SSL=true whose console is the stand-in and whose boot ends in the fixture worker."""
    server = tmp_path / "server"
    make_checkout(server)
    marker = tmp_path / "installed.sha256"
    marker.write_text(hashlib.sha256((server / "requirements.txt").read_bytes()).hexdigest() + "\n")
    etc = tmp_path / "etc"
    settings = {
        "USE_SSL": "true",
        "SERVER_DIR": str(server),
        "ENV_PATH": str(TEST_VENV),
        "INSTALL_MARKER": str(marker),
        "CONSOLE_URL": console.url + "/",
        "INSTANCE_CERT": str(etc / "instance.crt"),
        "INSTANCE_KEY": str(etc / "instance.key"),
        "CERT_RETRY_DELAY": "0.05",
        # curl and python3 trust the stand-in's test CA as they would Vast's public one.
        "CURL_CA_BUNDLE": str(console.ca.cert),
        "SSL_CERT_FILE": str(console.ca.cert),
    }
    settings.update(overrides)
    return script_env(tmp_path, autoscaler.url, **settings)


def assert_installed_pair(env: dict[str, str], ca: ConsoleCA) -> None:
    cert, key = Path(env["INSTANCE_CERT"]), Path(env["INSTANCE_KEY"])
    # What the framework does with them when USE_SSL=true.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile=cert, keyfile=key)
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.cert), str(cert)], capture_output=True, text=True, timeout=30
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in cert.parent.iterdir()) == ["instance.crt", "instance.key"], "temporary files left"


async def test_ssl_boot_has_the_console_sign_a_certificate_and_a_reboot_keeps_it(
    autoscaler: RecordingAutoscaler, console: ConsoleStandin, tmp_path: Path
) -> None:
    """With USE_SSL=true and no certificate, the CSR is posted to sign_cert for this container, the signed pair is
    installed, and a reboot reuses it without asking.
    """
    env = ssl_env(tmp_path, autoscaler, console)
    async with booted(env) as boot:
        assert await exit_code(boot) == 0, boot.tail()
    assert fixture_worker_line(boot) == {"USE_SSL": "true"}
    assert len(console.requests) == 1, console.requests
    request = console.requests[0]
    assert request.instance_id == env["CONTAINER_ID"]
    assert request.content_type == "application/octet-stream"
    assert request.csr.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    assert_installed_pair(env, console.ca)
    assert autoscaler.reports == []
    cert_bytes = Path(env["INSTANCE_CERT"]).read_bytes()

    async with booted(env) as again:
        assert await exit_code(again) == 0, again.tail()
    assert len(console.requests) == 1, "the reboot asked the console again"
    assert Path(env["INSTANCE_CERT"]).read_bytes() == cert_bytes
    assert f"using the instance certificate {env['INSTANCE_CERT']}" in again.text


async def test_console_errors_are_retried_with_a_growing_pause(
    autoscaler: RecordingAutoscaler, console: ConsoleStandin, tmp_path: Path
) -> None:
    """A console that answers 503 twice is asked a third time, after pauses of CERT_RETRY_DELAY and twice that, and the
    boot goes on.
    """
    console.failures = 2
    env = ssl_env(tmp_path, autoscaler, console)
    async with booted(env) as boot:
        assert await exit_code(boot) == 0, boot.tail()
    assert len(console.requests) == 3
    assert "attempt 1 failed: curl: (22) The requested URL returned error: 503; trying again in 0.05s" in boot.text
    assert "attempt 2 failed: curl: (22) The requested URL returned error: 503; trying again in 0.1s" in boot.text
    assert_installed_pair(env, console.ca)
    assert autoscaler.reports == []


async def test_certificate_for_another_key_is_refused_and_reported(
    autoscaler: RecordingAutoscaler, console: ConsoleStandin, tmp_path: Path
) -> None:
    """A signed certificate whose public key is not the instance's is not installed, and the boot fails with the reason
    reported.
    """
    console.sign_stranger = True
    env = ssl_env(tmp_path, autoscaler, console, CERT_ATTEMPTS="2")
    boot = await failed_boot(env)
    report = assert_reported(autoscaler, env, boot, "gave no usable certificate in 2 attempts")
    assert "last: its answer does not match the key" in report["error_msg"]
    assert "set USE_SSL=false" in report["error_msg"]
    assert len(console.requests) == 2
    assert not (tmp_path / "etc").exists() or list((tmp_path / "etc").iterdir()) == []
    assert "FIXTURE-WORKER" not in boot.text


async def test_ssl_by_default_with_an_unreachable_console_is_reported(
    autoscaler: RecordingAutoscaler, console: ConsoleStandin, tmp_path: Path
) -> None:
    """USE_SSL defaults to true as on Vast; when the console cannot be reached the boot reports curl's reason and names
    CONSOLE_URL.
    """
    down = f"https://127.0.0.1:{free_port()}"
    env = ssl_env(tmp_path, autoscaler, console, USE_SSL=None, CONSOLE_URL=down, CERT_ATTEMPTS="1")
    boot = await failed_boot(env)
    report = assert_reported(autoscaler, env, boot, f"{down}/api/v0/sign_cert/?instance_id={env['CONTAINER_ID']}")
    assert "Failed to connect" in report["error_msg"] or "Connection refused" in report["error_msg"], report
    assert "check CONSOLE_URL and CONTAINER_ID" in report["error_msg"]
    assert report["url"] == "" or report["url"].startswith("https://")


async def test_ssl_boot_without_curl_asks_the_console_with_python3(
    autoscaler: RecordingAutoscaler, console: ConsoleStandin, tmp_path: Path
) -> None:
    """Without curl on PATH the certificate request goes out through python3 and the pair is installed."""
    if shutil.which("python3") is None:
        pytest.skip("python3 is not on PATH")
    env = ssl_env(tmp_path, autoscaler, console, PATH=path_without(tmp_path, ["curl"]))
    async with booted(env) as boot:
        assert await exit_code(boot) == 0, boot.tail()
    assert len(console.requests) == 1
    assert_installed_pair(env, console.ca)


async def test_a_certificate_that_does_not_match_its_key_is_replaced(
    autoscaler: RecordingAutoscaler, console: ConsoleStandin, tmp_path: Path
) -> None:
    """An installed certificate that is not for the installed key (a boot cut short between the two) is replaced by a
    signed pair.
    """
    env = ssl_env(tmp_path, autoscaler, console)
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(console.ca.server_cert, env["INSTANCE_CERT"])
    openssl("genrsa", "-out", env["INSTANCE_KEY"], "2048")
    async with booted(env) as boot:
        assert await exit_code(boot) == 0, boot.tail()
    assert f"the instance certificate {env['INSTANCE_CERT']} does not match the key" in boot.text
    assert len(console.requests) == 1
    assert_installed_pair(env, console.ca)


async def test_ssl_without_container_id_is_refused_before_asking(
    autoscaler: RecordingAutoscaler, console: ConsoleStandin, tmp_path: Path
) -> None:
    """With USE_SSL=true and no CONTAINER_ID there is nothing to sign for: the boot stops, the console unasked."""
    env = ssl_env(tmp_path, autoscaler, console, CONTAINER_ID=None)
    boot = await failed_boot(env)
    assert "USE_SSL=true needs the certificate signed for CONTAINER_ID" in boot.text
    assert console.requests == []
