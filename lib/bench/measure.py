"""How fast and how exact the null worker is, measured side by side.

``python -m lib.bench`` starts real worker processes against a recording
autoscaler on 127.0.0.1 (and, for scaling, the local stand-in), prints a
table and writes the figures as JSON. ``--quick`` runs fewer rounds, for CI.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp

from lib.standin.grants import GrantSigner
from lib.standin.process import ChildProcess, WorkerPorts, WorkerProcess, worker_env
from lib.standin.recorder import RecordingAutoscaler, is_ready, serving
from workers.null.cli import DefaultsShown, OneLineParser, output_file_problem
from workers.null.dispatch import sdk
from workers.null.dispatch.summary import percentile
from workers.null.protocol import SESSION_COST

FLOOR_COMMAND = "from vastai.serverless.server.worker import Worker"


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }


class Bench:
    def __init__(self, *, quick: bool, workdir: Path, progress: Callable[[str], None]):
        self.quick = quick
        self.workdir = workdir
        self.progress = progress
        self.signer = GrantSigner()
        self.recorder = RecordingAutoscaler(self.signer)
        self._ids = itertools.count(5001)
        self._stack = AsyncExitStack()
        self.http: aiohttp.ClientSession

    async def __aenter__(self) -> Bench:
        self.recorder.url = await self._stack.enter_async_context(serving(self.recorder.app()))
        self.http = await self._stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=60),
            )
        )
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._stack.aclose()

    # -- workers --------------------------------------------------------------

    @asynccontextmanager
    async def worker(
        self, module: str = "workers.null.worker", env: dict[str, str] | None = None
    ) -> AsyncIterator[BenchWorker]:
        ports = WorkerPorts.allocate()
        container_id = next(self._ids)
        process = WorkerProcess(
            env=worker_env(ports=ports, container_id=container_id, report_addr=self.recorder.url, extra=env),
            cwd=self.workdir / f"worker-{container_id}",
            module=module,
        )
        started = time.time()
        await process.start()
        try:
            yield BenchWorker(self, process, ports, container_id, started)
        finally:
            await process.stop()

    async def wait_report(
        self, worker: BenchWorker, predicate: Callable[[dict[str, Any]], bool], since: float, timeout: float = 30.0
    ):
        try:
            return await self.recorder.wait_for(
                lambda: self.recorder.first_report(worker.container_id, predicate, since), timeout
            )
        except AssertionError:
            raise RuntimeError(
                f"no matching report from {worker.process.module}; its output:\n{worker.process.tail()}"
            ) from None

    # -- 1. readiness -----------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        runs = 3 if self.quick else 7
        ready: list[float] = []
        for run in range(runs):
            self.progress(f"readiness: start {run + 1}/{runs}")
            async with self.worker() as worker:
                received = await self.wait_report(worker, is_ready, since=0.0, timeout=60)
                ready.append(received.at - worker.started)
        floor: list[float] = []
        for run in range(runs):
            self.progress(f"readiness: import floor {run + 1}/{runs}")
            started = time.monotonic()
            child = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOR_COMMAND)
            if await child.wait() != 0:
                raise RuntimeError(f"{sys.executable} -c {FLOOR_COMMAND!r} failed")
            floor.append(time.monotonic() - started)
        return {
            "ready_s": spread(ready),
            "import_floor_s": spread(floor),
            "ratio": statistics.median(ready) / statistics.median(floor),
        }

    # -- 2. occupancy signal ----------------------------------------------------

    async def occupancy(self) -> dict[str, Any]:
        cycles = 20 if self.quick else 100
        async with self.worker() as worker:
            await self.wait_report(worker, is_ready, since=0.0, timeout=60)
            null = await self._cycles(worker, cycles, worker.open_signed, worker.release)
        framework_cycles = 5 if self.quick else 30
        async with self.worker(module="lib.bench.plain_worker", env={"UNSECURED": "true"}) as worker:
            await worker.until_listening()
            framework = await self._cycles(worker, framework_cycles, worker.open_signed, worker.end)
        return {
            "null": null,
            "framework": framework,
            "open_ratio": null["open_s"]["p50"] / framework["open_s"]["p50"],
            "close_ratio": null["close_s"]["p50"] / framework["close_s"]["p50"],
        }

    async def _cycles(
        self,
        worker: BenchWorker,
        cycles: int,
        open_: Callable[[], Awaitable[Any]],
        close: Callable[[Any], Awaitable[None]],
    ) -> dict[str, Any]:
        opens: list[float] = []
        closes: list[float] = []
        for cycle in range(cycles):
            if cycle % 10 == 0:
                self.progress(f"occupancy ({worker.process.module}): cycle {cycle + 1}/{cycles}")
            started = time.time()
            session = await open_()
            received = await self.wait_report(worker, lambda r: r.get("cur_load", 0) >= SESSION_COST, since=started)
            opens.append(received.at - started)
            started = time.time()
            await close(session)
            received = await self.wait_report(worker, lambda r: r.get("cur_load") == 0.0, since=started)
            closes.append(received.at - started)
        return {"cycles": cycles, "open_s": spread(opens), "close_s": spread(closes)}

    # -- 3. contention ----------------------------------------------------------

    async def contention(self) -> dict[str, Any]:
        concurrent = 200
        async with self.worker() as worker:
            await self.wait_report(worker, is_ready, since=0.0, timeout=60)
            bodies = [worker.create_body() for _ in range(concurrent)]
            self.progress(f"contention: {concurrent} concurrent creates")

            async def create(body: dict[str, Any]):
                started = time.monotonic()
                async with self.http.post(worker.url + "/session/create", json=body) as response:
                    await response.read()
                    return response.status, time.monotonic() - started

            results = await asyncio.gather(*(create(body) for body in bodies))
            await worker.release(None)
        statuses = [status for status, _ in results]
        return {
            "requests": concurrent,
            "created_201": statuses.count(201),
            "busy_429": statuses.count(429),
            "other": len(statuses) - statuses.count(201) - statuses.count(429),
            "server_errors_5xx": sum(1 for s in statuses if s >= 500),
            "latency_s": spread([elapsed for _, elapsed in results]),
        }

    # -- 4. control path --------------------------------------------------------

    async def control(self) -> dict[str, Any]:
        calls = 50 if self.quick else 300
        release: list[float] = []
        status: list[float] = []
        async with self.worker() as worker:
            await self.wait_report(worker, is_ready, since=0.0, timeout=60)
            self.progress(f"control path: {calls} /status and /release calls")
            for _ in range(calls):
                started = time.monotonic()
                async with self.http.get(worker.ports.control_url + "/status") as response:
                    await response.read()
                status.append(time.monotonic() - started)
                await worker.open_signed()
                started = time.monotonic()
                await worker.release(None)
                release.append(time.monotonic() - started)
        return {"release_s": spread(release), "status_s": spread(status)}

    # -- 6. footprint -----------------------------------------------------------

    async def footprint(self) -> dict[str, Any]:
        window = 5.0 if self.quick else 30.0
        async with self.worker() as worker:
            await self.wait_report(worker, is_ready, since=0.0, timeout=60)
            pid = worker.process.pid
            assert pid is not None
            self.progress(f"footprint: idle for {window:.0f}s")
            ticks_before, started = cpu_ticks(pid), time.monotonic()
            await asyncio.sleep(window)  # the measurement window itself
            ticks_after, elapsed = cpu_ticks(pid), time.monotonic() - started
            rss = rss_mib(pid)
        cpu = (ticks_after - ticks_before) / os.sysconf("SC_CLK_TCK") / elapsed
        return {"window_s": round(elapsed, 2), "rss_mib": rss, "cpu_percent": 100.0 * cpu}


class BenchWorker:
    def __init__(self, bench: Bench, process: WorkerProcess, ports: WorkerPorts, container_id: int, started: float):
        self.bench = bench
        self.process = process
        self.ports = ports
        self.container_id = container_id
        self.started = started

    @property
    def url(self) -> str:
        return self.ports.url

    def create_body(self) -> dict[str, Any]:
        return {"auth_data": self.bench.signer.grant(self.url), "payload": {"lifetime": 300}}

    async def open_signed(self) -> dict[str, Any]:
        body = self.create_body()
        async with self.bench.http.post(self.url + "/session/create", json=body) as response:
            if response.status != 201:
                raise RuntimeError(f"/session/create answered {response.status}: {await response.text()}")
            return {"session_id": (await response.json())["session_id"], "session_auth": body["auth_data"]}

    async def release(self, _session: Any) -> None:
        async with self.bench.http.post(self.ports.control_url + "/release") as response:
            await response.read()

    async def end(self, session: dict[str, Any]) -> None:
        async with self.bench.http.post(self.url + "/session/end", json=session) as response:
            await response.read()

    async def until_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(aiohttp.ClientError):
                async with self.bench.http.post(self.url + "/session/health", json={}) as response:
                    await response.read()
                    return
            if not self.process.running:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.process.module} never listened; its output:\n{self.process.tail()}")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _reserve_all(endpoint: Any, sessions: int) -> list[tuple[Any, float]]:
    """``sessions`` sessions at once; each with the seconds it took."""

    async def one() -> tuple[Any, float]:
        started = time.monotonic()
        session = await endpoint.session(cost=SESSION_COST, lifetime=300, timeout=120)
        return session, time.monotonic() - started

    return list(await asyncio.gather(*(one() for _ in range(sessions))))


async def scaling(quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """Sessions through the real SDK and the local stand-in, with the recommended parameters."""

    from lib.standin.autoscaler import LocalConfig, serve
    from lib.standin.book import BookSettings
    from lib.standin.fleet import FleetSettings
    from lib.standin.scaling import EndpointParams

    # The recommended endpoint parameters (README: Endpoint parameters); a
    # shorter cold start and inactivity timeout in --quick keep CI short.
    params = EndpointParams(
        target_util=1.0,
        min_load=0,
        cold_workers=0,
        max_queue_time=1.0,
        target_queue_time=0.5,
        inactivity_timeout=3.0 if quick else 10.0,
    )
    settings = FleetSettings(book=BookSettings(params=params), provisioning_delay=1.0 if quick else 3.0)
    cases = []
    for sessions in (1, 3, 10):
        progress(f"scaling: {sessions} sessions through the SDK and the local stand-in")
        async with serve(LocalConfig(fleet=settings, port=0)) as standin:
            client = sdk.make_client(standin.config.api_key, "local", standin.url)
            async with client:
                endpoint = await client.get_endpoint(standin.config.endpoint_name)

                cold = await _reserve_all(endpoint, sessions)
                provisioned = len(standin.fleet.created)
                distinct = len({session.url for session, _ in cold})
                for session, _ in cold:
                    await session.close()
                # Again at once, while the workers are still up: the warm path.
                warm = await _reserve_all(endpoint, sessions)
                provisioned_warm = len(standin.fleet.created) - provisioned
                for session, _ in warm:
                    await session.close()
                released = time.monotonic()
                await standin.fleet.wait_for(lambda fleet: not fleet.instances, 120)
                to_zero = time.monotonic() - released
        cases.append(
            {
                "sessions": sessions,
                "workers_provisioned": provisioned,
                "distinct_workers": distinct,
                "workers_per_session": provisioned / sessions,
                "provisioned_for_warm_rerun": provisioned_warm,
                "reserve_cold_s": spread([t for _, t in cold]),
                "reserve_warm_s": spread([t for _, t in warm]),
                "to_zero_s": to_zero,
            }
        )
    return {
        "params": {
            name: getattr(params, name)
            for name in (
                "target_util",
                "min_load",
                "cold_workers",
                "max_queue_time",
                "target_queue_time",
                "inactivity_timeout",
            )
        },
        "provisioning_delay_s": settings.provisioning_delay,
        "cases": cases,
    }


SECTIONS = (
    "readiness", "occupancy", "contention", "control", "scaling", "footprint", "queue_loop", "planner", "fidelity",
)  # fmt: skip


async def planner(quick: bool, workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """``python -m lib.planner.speed``'s figure, in a process of its own so that its CPU time is the replay's alone.

    ``quick`` times a short day.
    """
    out = workdir / "planner.json"
    jobs = 2_000 if quick else 100_000
    argv = ["-m", "lib.planner.speed", "--jobs", str(jobs), "--json", str(out)]
    progress(f"planner: one parameter set over a generated day of {jobs} jobs")
    return await _child_figures(argv, out, wait=600, grace=5, what="the planner's speed run")


async def _child_figures(argv: list[str], out: Path, *, wait: float, grace: float, what: str) -> dict[str, Any]:
    """Runs ``python *argv``, which writes its figures to ``out`` as JSON, and reads them."""
    child = ChildProcess.python(*argv, tail_lines=None, separate_stderr=True)
    try:
        await child.start()
        code = await child.wait(wait)
    finally:
        await child.stop(grace=grace)
    if not out.is_file():
        tail = "; ".join(list(child.errors)[-3:]) or f"exit {code}"
        raise RuntimeError(f"{what} wrote no figures: {tail}")
    return json.loads(out.read_text())


async def fidelity(quick: bool, workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """``python -m lib.planner.fidelity``'s figures: its whole trace, or with ``quick`` its first ten jobs."""
    out = workdir / "fidelity.json"
    argv = ["-m", "lib.planner.fidelity", "--json", str(out), *(["--jobs", "10"] if quick else [])]
    jobs = "its first 10 jobs" if quick else "its trace"
    progress(f"fidelity: {jobs} through the real-time stand-in, then through the planner (about a minute)")
    # On SIGTERM it stops its real run first.
    return await _child_figures(argv, out, wait=300, grace=40, what="fidelity")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def render(results: dict[str, Any]) -> str:
    """The results as the table the README shows."""
    rows: list[tuple] = []
    if "readiness" in results:
        ready = results["readiness"]
        rows.append(("readiness: start -> ready report, p50", f"{ready['ready_s']['p50']:.2f} s", ""))
        rows.append(("readiness: import floor, p50", f"{ready['import_floor_s']['p50']:.2f} s", ""))
        rows.append(("readiness: ratio to the floor", f"{ready['ratio']:.2f}x", "<= 1.25x"))
    if "occupancy" in results:
        occupancy = results["occupancy"]
        for side in ("null", "framework"):
            for edge, label in (("open_s", "open -> cur_load 100"), ("close_s", "close -> cur_load 0")):
                figures = occupancy[side][edge]
                target = "p50 <= 100 ms" if side == "null" else ""
                rows.append(
                    (f"occupancy ({side}): {label}, p50 / p99", f"{ms(figures['p50'])} / {ms(figures['p99'])}", target)
                )
        rows.append(
            (
                "occupancy: null / framework p50, open / close",
                f"{occupancy['open_ratio']:.3f} / {occupancy['close_ratio']:.3f}",
                "",
            )
        )
    if "contention" in results:
        contention = results["contention"]
        rows.append(
            (
                f"contention: {contention['requests']} concurrent creates 201 / 429 / other",
                f"{contention['created_201']} / {contention['busy_429']} / {contention['other']}",
                "1 / 199 / 0",
            )
        )
        rows.append(
            (
                "contention: latency p50 / p99",
                f"{ms(contention['latency_s']['p50'])} / {ms(contention['latency_s']['p99'])}",
                "p99 <= 250 ms",
            )
        )
    if "control" in results:
        control = results["control"]
        rows.append(
            (
                "control: /release p50 / p99",
                f"{ms(control['release_s']['p50'])} / {ms(control['release_s']['p99'])}",
                "",
            )
        )
        rows.append(
            ("control: /status p50 / p99", f"{ms(control['status_s']['p50'])} / {ms(control['status_s']['p99'])}", "")
        )
    if "scaling" in results:
        for case in results["scaling"]["cases"]:
            n = case["sessions"]
            rows.append(
                (
                    f"scaling, {n} sessions: workers provisioned per session",
                    f"{case['workers_per_session']:.2f}",
                    "1.00",
                )
            )
            rows.append(
                (
                    f"scaling, {n} sessions: reserve p50 cold / warm",
                    f"{case['reserve_cold_s']['p50']:.2f} s / {case['reserve_warm_s']['p50']:.2f} s"
                    if case["reserve_warm_s"]
                    else f"{case['reserve_cold_s']['p50']:.2f} s / -",
                    "",
                )
            )
            rows.append((f"scaling, {n} sessions: last release -> zero workers", f"{case['to_zero_s']:.2f} s", ""))
    if "footprint" in results:
        footprint = results["footprint"]
        rows.append(("footprint: idle RSS", f"{footprint['rss_mib']:.1f} MiB", ""))
        rows.append(
            (f"footprint: idle CPU over {footprint['window_s']:.0f} s", f"{footprint['cpu_percent']:.2f} %", "<= 1 %")
        )
    if "queue_loop" in results:
        from lib.bench import queueloop

        rows += queueloop.rows(results["queue_loop"])
    if "planner" in results:
        planner = results["planner"]
        target = "<= 5 s" if planner["jobs"] >= 90_000 else ""
        label = f"planner: one parameter set, a day of {planner['jobs']} jobs, CPU"
        rows.append((label, f"{planner['cpu_s']:.1f} s", target))
    lines = []
    if rows:
        width = max(len(r[0]) for r in rows)
        value_width = max(len(r[1]) for r in rows)
        lines = [f"{'measure'.ljust(width)}  {'figure'.ljust(value_width)}  target", "-" * (width + value_width + 16)]
        lines += [f"{name.ljust(width)}  {value.ljust(value_width)}  {target}" for name, value, target in rows]
    if "fidelity" in results:
        from lib.planner.fidelity import format_table

        # Its own columns: the real run and the planner side by side.
        lines += ["", "fidelity: the same trace through the real-time stand-in and through the planner", ""]
        lines.append(format_table(results["fidelity"]))
    return "\n".join(lines).lstrip("\n")


async def run(quick: bool, progress: Callable[[str], None], only: Sequence[str] = SECTIONS) -> dict[str, Any]:
    results: dict[str, Any] = {
        "quick": quick,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "started_at": time.time(),
    }
    with tempfile.TemporaryDirectory(prefix="null-bench-") as workdir:
        async with Bench(quick=quick, workdir=Path(workdir), progress=progress) as bench:
            for section in only:
                if section == "scaling":
                    results[section] = await scaling(quick, progress)
                elif section == "queue_loop":
                    from lib.bench import queueloop

                    progress("queue loop: warm dispatch per hop, then throughput through warm workers")
                    results[section] = await queueloop.measure(quick)
                elif section == "planner":
                    results[section] = await planner(quick, Path(workdir), progress)
                elif section == "fidelity":
                    results[section] = await fidelity(quick, Path(workdir), progress)
                else:
                    results[section] = await getattr(bench, section)()
    results["elapsed_s"] = time.time() - results["started_at"]
    return results


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m lib.bench",
        description=(
            "Measure the null worker's readiness, occupancy signal, contention, control path, scaling and "
            "footprint, the queue loop, the planner's speed, and the planner against a real run (fidelity)."
        ),
        formatter_class=DefaultsShown,
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter windows (for CI)")
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    parser.add_argument(
        "--only",
        type=_sections,
        default=SECTIONS,
        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}",
    )
    return parser


def _sections(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or '(none)'}: give any of {', '.join(SECTIONS)}"
        )
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    problem = output_file_problem("--json", args.json)
    if problem:
        parser.exit(2, f"{parser.prog}: {problem}\n")

    def progress(message: str) -> None:
        print(f"  .. {message}", file=sys.stderr, flush=True)

    try:
        results = asyncio.run(run(args.quick, progress, args.only))
    except KeyboardInterrupt:
        print("interrupted; no figures written", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nfigures written to {args.json} ({results['elapsed_s']:.0f} s)")
    return 0
