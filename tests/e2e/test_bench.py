from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lib.bench.measure import SECTIONS
from lib.standin.process import ChildProcess

# The sections that wait longest each run in a bench of their own, all at
# once: each mostly waits on timers (cold starts, inactivity timeouts, the
# framework's report loop), so together they take about as long as the
# longest alone. Every other section runs in one more bench.
SEPARATE = (("scaling", "planner"), ("queue_loop",), ("fidelity",))


def section_groups() -> list[tuple[str, ...]]:
    separate = {name for group in SEPARATE for name in group}
    return [*SEPARATE, tuple(name for name in SECTIONS if name not in separate)]


async def run_quick_bench(sections: tuple[str, ...], out: Path) -> tuple[int, str, str]:
    """``python -m lib.bench --quick --only SECTIONS``: its exit code, its stdout and its stderr."""
    bench = ChildProcess.python(
        "-m", "lib.bench", "--quick", "--only", ",".join(sections), "--json", str(out),
        tail_lines=None, separate_stderr=True,
    )  # fmt: skip
    try:
        await bench.start()
        code = await bench.wait(400)
    finally:
        await bench.stop()
    return code, "\n".join(bench.output), "\n".join(bench.errors)


@pytest.mark.measure
@pytest.mark.slow
async def test_quick_bench_writes_complete_figures_and_the_correctness_ones_hold(tmp_path):
    """`python -m lib.bench --quick` (its sections split over four runs at once) writes every section; one 201 in
    200 creates, one worker per session, no job lost."""
    runs = [(group, tmp_path / f"bench-{n}.json") for n, group in enumerate(section_groups())]
    assert sorted(name for group, _ in runs for name in group) == sorted(SECTIONS)
    # Every run is waited for, even when one fails, so none outlives the test.
    results = await asyncio.gather(*(run_quick_bench(group, out) for group, out in runs), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    figures: dict = {}
    stderrs: dict = {}  # the stand-in warns there of a worker that failed, which a replacement follows
    for (group, out), (code, stdout, stderr) in zip(runs, results, strict=True):
        stderrs.update(dict.fromkeys(group, stderr[-3000:]))
        assert code == 0, f"--only {','.join(group)}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        written = json.loads(out.read_text())
        assert set(group) <= set(written), (group, sorted(written))
        figures.update({name: written[name] for name in group})
    stdout = "\n".join(stdout for _, stdout, _ in results)
    assert set(SECTIONS) <= set(figures)

    assert figures["readiness"]["ready_s"]["n"] == 3 and figures["readiness"]["ratio"] > 0
    for side in ("null", "framework"):
        for edge in ("open_s", "close_s"):
            assert figures["occupancy"][side][edge]["n"] == figures["occupancy"][side]["cycles"]
    contention = figures["contention"]
    assert (contention["created_201"], contention["busy_429"], contention["other"]) == (1, 199, 0)
    assert contention["server_errors_5xx"] == 0
    assert figures["control"]["release_s"]["n"] == figures["control"]["status_s"]["n"] == 50
    cases = {case["sessions"]: case for case in figures["scaling"]["cases"]}
    assert sorted(cases) == [1, 3, 10]
    for sessions, case in cases.items():
        assert case["workers_per_session"] == 1.0, (case, stderrs["scaling"])
        assert case["distinct_workers"] == sessions, (case, stderrs["scaling"])
        assert case["provisioned_for_warm_rerun"] == 0, (case, stderrs["scaling"])
    assert figures["footprint"]["rss_mib"] > 0 and figures["footprint"]["cpu_percent"] >= 0
    planner = figures["planner"]
    assert 1_900 <= planner["jobs"] <= 2_100 and planner["cpu_s"] > 0 and planner["cold_starts"] >= 1, planner
    fidelity = figures["fidelity"]
    assert fidelity["jobs"] == 10 and len(fidelity["planner"]["waits"]) == 10, fidelity
    assert fidelity["real"]["cold_starts"] >= 1 and fidelity["planner"]["cold_starts"] >= 1, fidelity
    loop = figures["queue_loop"]
    assert loop["warm"]["runs"] == 5 and loop["warm"]["hops"]["total"]["n"] == 5
    assert loop["throughput"]["jobs"] == 30 and loop["throughput"]["jobs_per_s"] > 0
    chaos = loop["chaos"]
    assert chaos["exit_code"] == 0 and chaos["lost"] == 0, chaos
    assert chaos["done"] == chaos["jobs"] == 5 and chaos["run_twice"] <= chaos["kills"], chaos
    assert chaos["billed_worker_s"] >= chaos["busy_worker_s"] > 0, chaos

    # The table names every measure docs/performance.md shows.
    for measure in (
        "readiness",
        "occupancy (null)",
        "occupancy (framework)",
        "contention",
        "control",
        "scaling, 10 sessions",
        "footprint",
        "queue loop, warm dispatch",
        "queue loop, chaos",
        "planner: one parameter set",
        "fidelity: the same trace",
        "cold starts",
    ):
        assert measure in stdout, stdout


async def test_an_unknown_bench_section_is_one_line_and_exit_2():
    """`--only` with a section that does not exist names the ones that do, in one line, exit 2."""
    bench = ChildProcess.python("-m", "lib.bench", "--only", "readiness,nope", tail_lines=None, separate_stderr=True)
    try:
        await bench.start()
        code = await bench.wait(60)
    finally:
        await bench.stop()
    stderr = "\n".join(bench.errors)
    assert code == 2
    assert "unknown section nope" in stderr and "queue_loop" in stderr
    assert "Traceback" not in stderr


async def test_a_json_file_in_a_missing_directory_is_one_line_and_exit_2_before_measuring(tmp_path):
    """`--json` naming a directory that does not exist is refused at once, not after minutes of measuring."""
    target = tmp_path / "missing" / "bench.json"
    bench = ChildProcess.python("-m", "lib.bench", "--json", str(target), tail_lines=None, separate_stderr=True)
    try:
        await bench.start()
        code = await bench.wait(60)
    finally:
        await bench.stop()
    assert code == 2
    assert bench.errors and all("Traceback" not in line for line in bench.errors)
    assert list(bench.errors) == [f"python -m lib.bench: --json {target}: there is no directory {target.parent}; "
                                  "create it or name a file elsewhere"]  # fmt: skip
    assert not bench.output, list(bench.output)
