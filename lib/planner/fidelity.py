"""The planner against the real thing: one trace through the real-time stand-in, then through the planner.

    python -m lib.planner.fidelity [--trace FILE] [--provisioning-delay S]

The real run is the local demo (``python -m lib.demo --trace FILE``): an embedded nats-server, the stand-in with
real worker processes and a consumer beside each, the real SDK; each job
sleeps its duration. Its job log gives each job's wait (handler start minus
publish), its fleet log each worker's phases. From the fleet log come the
cold start (a worker's creation to its ready report: the provisioning delay
plus the worker's own start) and the stop time; the planner then replays the
same trace with the stand-in's settings from that log and those two
measured figures. ``fidelity_table()`` returns both sides' figures;
``main`` prints them side by side.

The default trace (``tests/data/fidelity_trace.csv``) is built so that
every decision of the stand-in lies well clear of the events it races
with, for any cold start of 1 to 3 s and hops the planner does not model
(the session's way to the worker and its consumer, the job's own process,
the release) of up to 0.6 s at a job's start and as much again at its end:

- a job that finds a worker idle arrives at least 0.7 s after that
  worker's last job may have ended, and 1.5 s or more before the
  inactivity timeout could stop it;
- a job that waits for a new worker arrives a second after a long job took
  the only worker, and that job outlasts the new worker's cold start;
- no job waits for another job to end, so no wait carries another job's hops;
- one worker starts at a time (on a small machine, worker processes that
  start together slow each other down, and a cold start past 3.5 s would
  outlast the demo's 4 s route hold).

So the real run starts the same workers as the planner does (9), and each
job's wait differs by its own hops only; ``tests/unit/test_fidelity.py``
replays it so. Its last ten jobs are its first ten again, once the fleet
has scaled back to zero.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lib.planner.trace import Job, TraceError, load_trace
from lib.standin.params import BY_NAME, ENDPOINT, flag_value
from workers.null.cli import DefaultsShown, OneLineParser, output_file_problem, sigterm_as_ctrl_c

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = ROOT / "tests" / "data" / "fidelity_trace.csv"
# The demo's --cold-start: the stand-in's provisioning delay. The worker's own
# start (its imports) comes on top: together 1.5-3 s on a small machine, so a
# job waiting for a new worker (target_queue_time 0.5 s + the cold start) is
# answered within the demo's 4 s route hold, before the SDK's polling comes in.
PROVISIONING_DELAY = 0.5
# Long enough that a worker kept for the next job is still there whatever its cold start was.
INACTIVITY_TIMEOUT = 6.0
# How long the real run may take after the trace's last arrival: its last jobs, the scale back
# to zero and the demo's shutdown, on a loaded machine.
REAL_RUN_AFTER_S = 120.0
MAX_SESSIONS = 10
# What the issue holds the planner to.
WAIT_TOLERANCE_S = 1.0
BILLED_TOLERANCE = 0.10

RUNNING = ("provisioning", "loading", "ready", "stopping", "errored")


class FidelityError(RuntimeError):
    """A run that did not give figures to compare; the message says which and why."""


# -- the real run ------------------------------------------------------------------------


def run_real(trace: Path, workdir: Path, *, provisioning_delay: float = PROVISIONING_DELAY):
    """Runs the demo over ``trace``; returns (job log rows, fleet log)."""
    timeout = load_trace(trace)[-1].arrival + REAL_RUN_AFTER_S
    job_log, fleet_log = workdir / "jobs.log", workdir / "fleet.json"
    argv = [
        sys.executable, "-m", "lib.demo", "--plain",
        "--trace", str(trace), "--job-log", str(job_log), "--fleet-log", str(fleet_log),
        "--cold-start", f"{provisioning_delay:g}", "--inactivity-timeout", f"{INACTIVITY_TIMEOUT:g}",
        "--max-sessions", str(MAX_SESSIONS),
    ]  # fmt: skip
    output = workdir / "demo.out"
    with open(output, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except BaseException:
            # Ctrl-C or the deadline: the demo stops its workers on SIGINT.
            _stop(proc)
            raise
    if code != 0:
        tail = "\n".join(output.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise FidelityError(f"the real run exited {code}; its last lines:\n{tail}")
    rows = [json.loads(line) for line in job_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows, json.loads(fleet_log.read_text(encoding="utf-8"))


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def real_figures(rows: Sequence[dict[str, Any]], fleet: dict[str, Any]) -> dict[str, Any]:
    """Cold starts, billed worker-seconds, the measured cold start and stop time, and each job's wait."""
    final: dict[str, dict[str, Any]] = {}
    for row in rows:
        known = final.get(row["job_id"])
        if known is None or row["attempt"] >= known["attempt"]:
            final[row["job_id"]] = row
    waits = []
    for job_id in sorted(final):  # trace-00001, ...: the trace's order
        row = final[job_id]
        if row.get("outcome") != "done" or row.get("started") is None:
            raise FidelityError(f"job {job_id} ended {row.get('outcome')!r}: the real run lost or failed a job")
        waits.append(row["started"] - row["enqueued"])
    cold_starts = 0
    billed = 0.0
    colds: list[float] = []
    stops: list[float] = []
    # Each worker's first session, from the job log: (reserved, claimed) of the earliest reserved on it.
    first_session: dict[str, tuple[float, float]] = {}
    for row in rows:
        url, reserved, claimed = row.get("worker"), row.get("reserved"), row.get("claimed")
        if isinstance(url, str) and isinstance(reserved, (int, float)) and isinstance(claimed, (int, float)):
            if url not in first_session or reserved < first_session[url][0]:
                first_session[url] = (reserved, claimed)
    each: list[float | None] = []  # per worker in the order started: creation to its consumer's first claim
    lags: list[float] = []
    for worker in fleet["workers"]:
        phases = worker["phases"]
        for (at, phase), (until, _) in zip(phases, phases[1:], strict=False):
            if phase in RUNNING:
                billed += until - at
        if phases[-1][1] in RUNNING:
            raise FidelityError(f"worker {worker['id']} was still {phases[-1][1]} when the run ended")
        starts = [at for at, phase in phases if phase == "provisioning"]
        cold_starts += len(starts) + sum(
            1 for (_, before), (_, phase) in zip(phases, phases[1:], strict=False) if before == "cold"
        )
        seen = dict((phase, at) for at, phase in reversed(phases))  # first moment of each phase
        if "ready" in seen and "provisioning" in seen:
            colds.append(seen["ready"] - seen["provisioning"])
            # A consumer that starts beside its worker may still be starting when the worker reports
            # ready: its first session waits for it, and so does that session's job.
            lag = 0.0
            first = first_session.get(worker.get("url", ""))
            if first is not None:
                lag = max(0.0, first[1] - first[0])
                lags.append(lag)
            each.append(colds[-1] + lag)
        elif "provisioning" in seen:
            each.append(None)  # stopped while provisioning: it never got ready, in either run
        for (at, phase), (until, _) in zip(phases, phases[1:], strict=False):
            # A worker stopped while provisioning has no process: gone at once, as the planner has it.
            if phase == "stopping" and "ready" in seen:
                stops.append(until - at)
    if not colds:
        raise FidelityError("no worker of the real run reported ready: nothing to measure the cold start on")
    known = [c for c in each if c is not None]
    effective = sum(known) / len(known)
    return {
        "jobs": len(waits),
        "cold_starts": cold_starts,
        "billed_worker_s": billed,
        "waits": waits,
        "cold_start_s": sum(colds) / len(colds),
        "cold_start_range_s": [min(colds), max(colds)],
        "consumer_lag_s": sum(lags) / len(lags) if lags else 0.0,
        "effective_cold_start_s": effective,
        "cold_start_each": [effective if c is None else c for c in each],
        "stop_s": sum(stops) / len(stops) if stops else 0.0,
    }


# -- the planner -------------------------------------------------------------------------


def run_planner(
    trace: Path, workdir: Path, fleet: dict[str, Any], cold_start: float, stop: float, each: Sequence[float] = ()
) -> dict[str, Any]:
    """``python -m lib.planner`` over ``trace`` with the run's stand-in settings and measured times.

    ``each``: the cold start of each worker of the real run in the order they started, handed to the
    planner's workers in the same order (``--cold-starts``); the rest take ``cold_start``.
    """
    s = fleet["standin"]
    out, jobs_out = workdir / "plan.json", workdir / "plan-jobs.csv"
    # The stand-in's settings the fleet log names, under the planner's flags.
    settings = [*ENDPOINT, BY_NAME["scale_down_delay"], BY_NAME["route_hold"]]
    argv = [
        sys.executable, "-m", "lib.planner", "--trace", str(trace),
        *(part for param in settings for part in (param.flag, flag_value(s[param.name]))),
        "--max-sessions", str(fleet["max_sessions"]),
        "--sdk-max-poll", f"{fleet['sdk_max_poll_interval']:g}",
        "--cold-start", f"{cold_start:.3f}", "--stop-seconds", f"{stop:.3f}",
        "--json", str(out), "--jobs-out", str(jobs_out), "--processes", "1",
    ]  # fmt: skip
    if each:
        colds = workdir / "cold-starts.txt"
        colds.write_text("".join(f"{seconds:.3f}\n" for seconds in each), encoding="utf-8")
        argv[-2:-2] = ["--cold-starts", str(colds)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise FidelityError(f"the planner exited {done.returncode}: {done.stderr.strip()}")
    result = json.loads(out.read_text(encoding="utf-8"))["results"][0]
    with open(jobs_out, encoding="utf-8", newline="") as f:
        result["waits"] = [float(row["wait"]) for row in csv.DictReader(f)]
    result["argv"] = argv[3:]
    return result


# -- side by side ------------------------------------------------------------------------


def fidelity_table(trace: Path | str = DEFAULT_TRACE, *, provisioning_delay: float = PROVISIONING_DELAY) -> dict:
    """Runs ``trace`` through the real stand-in and the planner; both sides' figures and the checks."""
    trace = Path(trace).resolve()
    with tempfile.TemporaryDirectory(prefix="null-fidelity-") as tmp:
        workdir = Path(tmp)
        began = time.monotonic()
        rows, fleet = run_real(trace, workdir, provisioning_delay=provisioning_delay)
        real_s = time.monotonic() - began
        real = real_figures(rows, fleet)
        model = run_planner(
            trace, workdir, fleet, real["effective_cold_start_s"], real["stop_s"], real["cold_start_each"]
        )
    if len(model["waits"]) != len(real["waits"]):
        raise FidelityError(f"the real run has {len(real['waits'])} jobs, the planner {len(model['waits'])}")
    diffs = [m - r for m, r in zip(model["waits"], real["waits"], strict=True)]
    worst = max(range(len(diffs)), key=lambda i: abs(diffs[i]))
    billed_ratio = model["billed_worker_s"] / real["billed_worker_s"] - 1.0
    return {
        "trace": str(trace),
        "jobs": real["jobs"],
        "measured": {
            "cold_start_s": round(real["cold_start_s"], 3),
            "cold_start_range_s": [round(x, 3) for x in real["cold_start_range_s"]],
            "consumer_lag_s": round(real["consumer_lag_s"], 3),
            "cold_start_each_s": [round(x, 3) for x in real["cold_start_each"]],
            "stop_s": round(real["stop_s"], 3),
            "provisioning_delay_s": fleet["standin"]["provisioning_delay"],
        },
        "real": {
            "cold_starts": real["cold_starts"],
            "billed_worker_s": round(real["billed_worker_s"], 3),
            "waits": [round(w, 3) for w in real["waits"]],
            "run_s": round(real_s, 1),
        },
        "planner": {
            "cold_starts": model["cold_starts"],
            "billed_worker_s": model["billed_worker_s"],
            "waits": [round(w, 3) for w in model["waits"]],
            "command": "python -m lib.planner " + " ".join(model["argv"]),
        },
        "wait_diff_s": [round(d, 3) for d in diffs],
        "worst_job": worst + 1,
        "checks": {
            "cold_starts_equal": model["cold_starts"] == real["cold_starts"],
            "billed_within_10pct": abs(billed_ratio) <= BILLED_TOLERANCE,
            "waits_within_1s": abs(diffs[worst]) <= WAIT_TOLERANCE_S,
        },
        "billed_diff": round(billed_ratio, 4),
    }


def format_table(table: dict[str, Any]) -> str:
    real, model, measured = table["real"], table["planner"], table["measured"]
    waits_r, waits_m = real["waits"], model["waits"]
    low, high = measured["cold_start_range_s"]

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    rows = [
        ("", "real run", "planner", "check"),
        ("jobs", str(table["jobs"]), str(len(waits_m)), ""),
        ("cold starts", str(real["cold_starts"]), str(model["cold_starts"]), _ok(table["checks"]["cold_starts_equal"])),
        (
            "billed worker-s",
            f"{real['billed_worker_s']:.1f}",
            f"{model['billed_worker_s']:.1f}",
            f"{table['billed_diff']:+.1%} " + _ok(table["checks"]["billed_within_10pct"]),
        ),
        ("mean wait s", f"{mean(waits_r):.2f}", f"{mean(waits_m):.2f}", ""),
        ("max wait s", f"{max(waits_r):.2f}", f"{max(waits_m):.2f}", ""),
        (
            "worst job's wait s",
            f"{waits_r[table['worst_job'] - 1]:.2f}",
            f"{waits_m[table['worst_job'] - 1]:.2f}",
            f"job {table['worst_job']}: {table['wait_diff_s'][table['worst_job'] - 1]:+.2f}s "
            + _ok(table["checks"]["waits_within_1s"]),
        ),
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    trace = Path(table["trace"])
    shown = trace.relative_to(ROOT) if trace.is_relative_to(ROOT) else trace
    lines = [f"trace: {shown}, {table['jobs']} jobs; real run {real['run_s']:.0f}s"]
    lines.append(
        f"measured in the real run: cold start {measured['cold_start_s']:.2f}s (workers {low:.2f}-{high:.2f}s; "
        f"provisioning delay {measured['provisioning_delay_s']:g}s + the worker's own start), "
        f"its consumer's first claim +{measured['consumer_lag_s']:.2f}s, stop {measured['stop_s']:.2f}s"
    )
    lines += ["  ".join(cell.ljust(widths[c]) if c == 0 else cell.rjust(widths[c]) for c, cell in enumerate(r)).rstrip()
              for r in rows]  # fmt: skip
    lines.append(
        "per job (s), real / planner: " + "  ".join(f"{r:.1f}/{m:.1f}" for r, m in zip(waits_r, waits_m, strict=True))
    )
    lines.append(f"planner: {model['command']}")
    return "\n".join(lines)


def _ok(passed: bool) -> str:
    return "ok" if passed else "FAIL"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m lib.planner.fidelity",
        description="Run a short trace through the real-time stand-in and through the planner; print both.",
        formatter_class=DefaultsShown,
    )
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="CSV or JSON lines trace")
    parser.add_argument(
        "--provisioning-delay",
        type=float,
        default=PROVISIONING_DELAY,
        help="the stand-in's provisioning delay in the real run (the worker's own start comes on top)",
    )
    parser.add_argument("--jobs", type=int, metavar="N", help="replay only the first N jobs of the trace")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    return parser


def write_trace(jobs: Sequence[Job], out: Path) -> Path:
    """Writes ``jobs`` to ``out`` as a CSV trace, every time exact; returns ``out``."""
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arrival", "duration"])
        writer.writerows([repr(job.arrival), repr(job.duration)] for job in jobs)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if not args.trace.is_file():
        parser.exit(2, f"{parser.prog}: --trace {args.trace}: no such file; pass a CSV or JSON lines trace\n")
    if not (0 <= args.provisioning_delay < 60):
        parser.exit(2, f"{parser.prog}: --provisioning-delay {args.provisioning_delay:g}: give seconds in [0, 60)\n")
    if args.jobs is not None and args.jobs < 1:
        parser.exit(2, f"{parser.prog}: --jobs {args.jobs}: give a number of jobs >= 1\n")
    problem = output_file_problem("--json", args.json)
    if problem:
        parser.exit(2, f"{parser.prog}: {problem}\n")
    try:
        jobs = load_trace(args.trace)  # a bad trace is the user's to mend before anything starts
    except TraceError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    try:
        # A bench stopping it with SIGTERM ends the real run as Ctrl-C does.
        with sigterm_as_ctrl_c(), tempfile.TemporaryDirectory(prefix="null-fidelity-trace-") as tmp:
            trace = args.trace
            if args.jobs is not None:
                trace = write_trace(jobs[: args.jobs], Path(tmp) / f"first-{args.jobs}-{args.trace.stem}.csv")
            print(f"running {trace.name} through the real-time stand-in (about two minutes)...", file=sys.stderr)
            table = fidelity_table(trace, provisioning_delay=args.provisioning_delay)
    except FidelityError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(format_table(table))
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    return 0 if all(table["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
